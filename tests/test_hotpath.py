"""The training loop's hot path (issue 17): no host sync between check points, and what that must not cost.

* A micro-step that is not a check point makes no host sync: the sync points are counted by wrapping the *torch*
  methods that read a tensor on the host (``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``,
  ``cpu``, ``numpy``) and ``torch.distributed.all_reduce``, per micro-step, on the real loop (one process, and two
  gloo ranks under torchrun). The data loader reads in a worker process, so only the loop itself is counted.
* A NaN made at step k (a global forward hook that poisons the student's classifier output at that micro-step)
  never reaches a saved state: the run stops with one error naming step k, the newest checkpoint is the one written
  before step k and holds exactly the weights of an undisturbed run at that step, and no later checkpoint,
  ``last.pt``, ``results.json`` or NaN log record exists.
* The schedule's factor reads a plain copy of ``optim.*`` (no OmegaConf lookup per step) and gives the same rates.

The teachers' one-pass CAMs are tested in tests/test_hotpath_cam.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpckd.checkpoint import CheckpointStore, load_checkpoint
from hpckd.train import engine
from tests.helpers import REPO, train_config

pytestmark = pytest.mark.usefixtures("outside_slurm")
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
STEPS_PER_EPOCH = 6  # resume_data: 96 training images, batch 16


def config(data_root: Path, out: Path, *extra: str):
    # log_every=0 and no step checkpoints: the check points are the session's first micro-step and the epoch ends.
    return train_config(data_root, out, "data.index_cache=false", "data.num_workers=1", "log_every=0", *extra)


class SyncCounter:
    """Counts calls of the torch methods that read a tensor on the host (each is a device sync on a GPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return counted


def calls_between_micro_steps(counter: SyncCounter) -> tuple[list[int], engine.Hook]:
    """A hook recording the count before each micro-step; the list then holds the calls made by micro-step i and
    whatever followed it up to micro-step i + 1 (backward, optimizer step, the next batch)."""
    marks: list[int] = []

    def hook(ctx: engine.StepContext) -> None:
        assert ctx.micro == len(marks) + 1
        marks.append(len(counter.calls))

    return marks, hook


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_micro_steps_between_check_points_make_no_host_sync(resume_data, tmp_path, monkeypatch, accum):
    engine.run(config(resume_data, tmp_path / "teacher", "optim.epochs=1"), mode="train")
    teacher = tmp_path / "teacher" / "last.pt"
    counter = SyncCounter(monkeypatch)
    marks, hook = calls_between_micro_steps(counter)
    engine.run(config(resume_data, tmp_path / "student", "optim.epochs=1", f"optim.accum_steps={accum}",
                      f"teachers=[{{checkpoint: {teacher}}}, {{checkpoint: {teacher}}}]", "loss.name=ensemble_kd"),
               mode="distill", hooks=[hook])
    per_micro = [b - a for a, b in zip(marks, marks[1:])]
    assert len(marks) == STEPS_PER_EPOCH * accum
    # Micro-step 1 of a session: the loss's input checks (one sync), its loss value (one), the check point's one
    # transfer of the flags. Every later micro-step of the epoch up to the last (a check point, not in the list): 0.
    assert per_micro[0] == 3, counter.calls
    assert per_micro[1:] == [0] * (len(per_micro) - 1), per_micro


def torchrun(script: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_all_reduce_once_per_check_point_not_per_micro_step(resume_data, tmp_path):
    """Two gloo ranks under torchrun: per micro-step, the CPU all-reduces of torch.distributed and the host reads
    the loop makes (DDP's gradient all-reduce runs in its C++ reducer and is not counted)."""
    script = tmp_path / "count_rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch, torch.distributed
        from hpckd.train import engine
        from tests.helpers import train_config

        counts = {{"sync": 0, "all_reduce": 0}}
        def counting(key, original):
            def counted(*args, **kwargs):
                counts[key] += 1
                return original(*args, **kwargs)
            return counted
        for name in {SYNC_METHODS!r}:
            setattr(torch.Tensor, name, counting("sync", getattr(torch.Tensor, name)))
        torch.distributed.all_reduce = counting("all_reduce", torch.distributed.all_reduce)
        marks = []
        engine.register_hook(lambda ctx: marks.append(dict(counts)))
        cfg = train_config({str(resume_data)!r}, {str(tmp_path / "run")!r}, "data.index_cache=false",
                           "data.num_workers=1", "log_every=0", "optim.epochs=1")
        engine.run(cfg, mode="train")
        with open({str(tmp_path)!r} + f"/counts-{{os.environ['RANK']}}.json", "w") as handle:
            json.dump(marks, handle)
    """))
    torchrun(script)
    for rank in (0, 1):
        marks = json.loads((tmp_path / f"counts-{rank}.json").read_text())
        assert len(marks) == STEPS_PER_EPOCH
        reduces = [b["all_reduce"] - a["all_reduce"] for a, b in zip(marks, marks[1:])]
        syncs = [b["sync"] - a["sync"] for a, b in zip(marks, marks[1:])]
        # Micro-step 1 is a check point (one all-reduce); micro-steps 2..5 are not (none); 6 ends the epoch.
        assert reduces == [1, 0, 0, 0, 0], (rank, reduces)
        assert syncs[1:] == [0, 0, 0, 0], (rank, syncs)


def poison_step(k: int) -> engine.Hook:
    """A hook that makes the loss of micro-step ``k`` NaN: a global forward hook on every ``nn.Linear`` (the
    student's classifier, in a teacher run the only one) returns NaN logits during that micro-step only."""
    handles = []

    def nan_output(module, args, output):
        return output * float("nan") if isinstance(module, torch.nn.Linear) else None

    def hook(ctx: engine.StepContext) -> None:
        while handles:
            handles.pop().remove()
        if ctx.micro == k:
            handles.append(torch.nn.modules.module.register_module_forward_hook(nan_output))

    return hook


@pytest.mark.slow
def test_a_nan_at_step_k_stops_the_run_naming_k_and_never_reaches_a_saved_state(resume_data, tmp_path):
    k = 8  # epoch 1; check points at 5 and 10 (log records), 6 and 12 (epoch ends), 7 and 14 (checkpoints)
    extra = ("log_every=5", "train.checkpoint_every=7")
    reference = engine.run(config(resume_data, tmp_path / "ref", *extra), mode="train")
    assert reference["steps"] == 2 * STEPS_PER_EPOCH
    bad = tmp_path / "bad"
    hook = poison_step(k)
    try:
        with pytest.raises(engine.TrainingDiverged) as err:
            engine.run(config(resume_data, bad, *extra), mode="train", hooks=[hook])
    finally:
        hook(engine.StepContext(0, 0, 0))  # removes the global forward hook whatever happened
    message = str(err.value)
    assert f"training diverged at epoch 1, step {k}: loss is nan" in message, message
    assert "the student's logits hold NaN/Inf" in message
    # The newest checkpoint is step 7's, the last state before step k, and it is exactly the undisturbed run's.
    entries = CheckpointStore(bad / "checkpoints").entries()
    assert [e.step for e in entries] == [STEPS_PER_EPOCH, k - 1]
    assert str(entries[-1].path) in message
    saved = load_checkpoint(entries[-1].path)["model"]
    expected = load_checkpoint(tmp_path / "ref" / "checkpoints" / f"step-{k - 1:08d}.pt")["model"]
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], expected[name]) for name in saved)
    assert not (bad / "last.pt").exists() and not (bad / "results.json").exists()
    records = [json.loads(line) for line in (bad / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in logged] == [5]  # step 10's record would have come after the check that stopped it
    assert all(math.isfinite(r["loss"]) for r in logged)


class WeightsSeen:
    """A hook recording, at each micro-step, a copy of the weight of every ``nn.Linear`` that runs a forward then
    (the student's classifier; a teacher run has no other), and making micro-step ``k`` non-finite: ``what="loss"``
    returns NaN logits (as :func:`poison_step`), ``what="gradients"`` keeps the logits finite and puts NaN into the
    gradient that flows back into them, so only the backward pass sees it."""

    def __init__(self, k: int, what: str) -> None:
        self.k, self.what, self.micro = k, what, 0
        self.weights: dict[int, torch.Tensor] = {}
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.forward)

    def forward(self, module, args, output):
        if not isinstance(module, torch.nn.Linear) or not module.training:
            return None
        self.weights.setdefault(self.micro, module.weight.detach().clone())
        if self.micro != self.k:
            return None
        if self.what == "loss":
            return output * float("nan")
        output.register_hook(lambda grad: grad * float("nan"))
        return None

    def __call__(self, ctx: engine.StepContext) -> None:
        self.micro = ctx.micro

    def remove(self) -> None:
        self.handle.remove()


@pytest.mark.slow
def test_a_nonfinite_step_never_reaches_the_weights_in_memory(resume_data, tmp_path):
    """The finite-step gate (fused SGD, the default): after a micro-step k whose loss or only whose gradients are
    NaN, the next micro-step's forward sees exactly the weights of step k - 1 (the undisturbed run's checkpoint) and
    no weight is ever NaN; a NaN gradient under a finite loss also stops the run at the next check point naming k.
    Without the gate (optim.fused=false) the weights in memory do hold NaN after step k: the test can fail."""
    k = 8
    extra = ("log_every=5", "train.checkpoint_every=7")
    engine.run(config(resume_data, tmp_path / "ref", *extra), mode="train")
    expected = load_checkpoint(tmp_path / "ref" / "checkpoints" / f"step-{k - 1:08d}.pt")["model"]
    classifier = [name for name in expected if name.endswith(".weight") and expected[name].dim() == 2]
    assert len(classifier) == 1
    for what, fused in (("loss", "true"), ("gradients", "true"), ("gradients", "false")):
        seen = WeightsSeen(k, what)
        try:
            with pytest.raises(engine.TrainingDiverged) as err:
                engine.run(config(resume_data, tmp_path / f"{what}-{fused}", *extra, f"optim.fused={fused}"),
                           mode="train", hooks=[seen])
        finally:
            seen.remove()
        assert sorted(seen.weights) == list(range(1, 11)), sorted(seen.weights)  # check point 10 stops the run
        if fused == "false":  # no gate: the NaN gradient reached the weights, and the saved state check finds it
            assert not torch.isfinite(seen.weights[k + 1]).all()
            continue
        assert torch.equal(seen.weights[k + 1], expected[classifier[0]]), what
        assert all(torch.isfinite(w).all() for w in seen.weights.values())
        if what == "gradients":
            assert (f"training diverged at epoch 1, step {k}: the gradients hold NaN/Inf although the loss is finite"
                    in str(err.value)), str(err.value)


@pytest.mark.slow
@pytest.mark.dist
def test_a_nan_on_one_rank_stops_both_ranks_at_the_same_check_point_naming_its_step(resume_data, tmp_path):
    """Rank 1 alone makes a NaN at step 3 (not a check point): both ranks go on to the epoch's last step, agree
    there, and stop with the step of rank 1's NaN; nobody waits in a collective for a rank that left."""
    script = tmp_path / "nan_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from hpckd.train import engine
        from tests.helpers import train_config

        handles = []
        def poison_third_micro_step(ctx):  # as poison_step in the test module: NaN logits during micro-step 3
            while handles:
                handles.pop().remove()
            if ctx.micro == 3:
                handles.append(torch.nn.modules.module.register_module_forward_hook(
                    lambda m, a, out: out * float("nan") if isinstance(m, torch.nn.Linear) else None))

        if os.environ["RANK"] == "1":
            engine.register_hook(poison_third_micro_step)
        cfg = train_config({str(resume_data)!r}, {str(tmp_path / "run")!r}, "data.index_cache=false",
                           "data.num_workers=1", "log_every=0", "optim.epochs=1")
        try:
            engine.run(cfg, mode="train")
            message = "finished"
        except engine.TrainingDiverged as exc:
            message = str(exc)
        with open({str(tmp_path)!r} + f"/message-{{os.environ['RANK']}}.txt", "w") as handle:
            handle.write(message)
    """))
    torchrun(script)
    rank0, rank1 = ((tmp_path / f"message-{rank}.txt").read_text() for rank in (0, 1))
    assert rank1.startswith("training diverged at epoch 0, step 3: loss is nan"), rank1
    assert rank0.startswith("training diverged at epoch 0, step 3: a non-finite loss on another rank"), rank0
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_schedule_reads_a_plain_copy_of_the_optim_section_with_the_same_rates():
    from omegaconf import OmegaConf

    from hpckd.train.backends import plain_section
    from hpckd.train.experiment import load_experiment
    from hpckd.train.optim import lr_factor

    for overrides in (["optim.warmup_epochs=1", "optim.min_lr=0.001"],
                      ["optim.schedule=multistep", "optim.milestones=[1,3]", "optim.step_factors=[0.1,0.01]"]):
        cfg = load_experiment(None, ["optim.epochs=4", *overrides])
        plain = plain_section(cfg.optim)
        assert not OmegaConf.is_config(plain) and not OmegaConf.is_config(plain.milestones)
        assert [lr_factor(plain, t, 5) for t in range(20)] == [lr_factor(cfg.optim, t, 5) for t in range(20)]
