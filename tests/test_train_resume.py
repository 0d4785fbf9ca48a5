"""Exact resume, preemption, keep-last-N, corrupt-checkpoint fallback, mismatched configs, divergence, accumulation.

Every run here is the real loop (:func:`hpckd.train.engine.run`) in this process on a tiny data set (4 classes x 24
training images, 32x32, resnet8, batch 16 -> 6 steps per epoch). "Exact" means bit-identical: an interrupted and
resumed run must give the very same per-epoch losses, metrics and final weights as one that ran straight through.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import train_config as config
from hpckd.errors import CheckpointError
from hpckd.train import engine
from hpckd.checkpoint import CheckpointStore, check_compatible, load_checkpoint

pytestmark = pytest.mark.usefixtures("outside_slurm")
STEPS_PER_EPOCH = 6  # 96 training images / batch 16


@pytest.fixture(scope="session")
def data_root(resume_data) -> Path:
    return resume_data


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.pt")["model"]


def assert_same_run(a: dict, b: dict, out_a: Path, out_b: Path) -> None:
    assert a["history"] == b["history"]  # per-epoch loss terms and validation metrics, exactly
    assert a["metrics"] == b["metrics"]
    wa, wb = final_weights(out_a), final_weights(out_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """One uninterrupted run that keeps a checkpoint after every other step."""
    out = tmp_path_factory.mktemp("reference")
    results = engine.run(config(data_root, out, "train.checkpoint_every=2"), mode="train")
    return out, results


def copy_checkpoint(src_out: Path, step: int, dst_out: Path) -> None:
    (dst_out / "checkpoints").mkdir(parents=True)
    shutil.copy2(src_out / "checkpoints" / f"step-{step:08d}.pt", dst_out / "checkpoints")


def test_reference_run_learns_and_keeps_its_checkpoints(reference):
    out, results = reference
    steps = [e.step for e in CheckpointStore(out / "checkpoints").entries()]
    # every 2 steps plus each epoch end (6, 12): 2, 4, 6, 8, 10, 12
    assert steps == [2, 4, 6, 8, 10, 12]
    assert results["steps"] == 2 * STEPS_PER_EPOCH
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    assert sorted(step_losses(out)) == list(range(1, 13))


@pytest.mark.parametrize("step", [4, 8])  # mid-epoch 0 and mid-epoch 1
def test_resume_mid_epoch_is_exact(reference, data_root, tmp_path, step):
    ref_out, ref = reference
    copy_checkpoint(ref_out, step, tmp_path)
    resumed = engine.run(config(data_root, tmp_path, "train.checkpoint_every=2"), mode="train")
    assert resumed["resumes"][0]["step"] == step
    assert_same_run(ref, resumed, ref_out, tmp_path)
    # The steps after the resume point have the very same losses as the uninterrupted run.
    ref_losses, got = step_losses(ref_out), step_losses(tmp_path)
    assert sorted(got) == list(range(step + 1, 13))
    assert all(got[s] == ref_losses[s] for s in got)


def test_sigusr2_checkpoints_at_the_next_step_then_resumes_exactly(reference, data_root, tmp_path):
    ref_out, ref = reference

    def signalled_at_third_micro_step(ctx: engine.StepContext) -> None:
        if ctx.micro == 3:  # as SLURM would: the signal lands while step 3 is computing
            os.kill(os.getpid(), signal.SIGUSR2)

    with pytest.raises(SystemExit) as stopped:
        engine.run(config(data_root, tmp_path), mode="train", hooks=[signalled_at_third_micro_step])
    assert stopped.value.code == 128 + signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # our handler is gone again
    assert [e.step for e in CheckpointStore(tmp_path / "checkpoints").entries()] == [3]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "last.pt").exists()

    resumed = engine.run(config(data_root, tmp_path), mode="train")  # resume=auto is the default
    assert [r["step"] for r in resumed["resumes"]] == [3]
    assert_same_run(ref, resumed, ref_out, tmp_path)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, data_root, tmp_path, capsys):
    ref_out, ref = reference
    copy_checkpoint(ref_out, 8, tmp_path)
    shutil.copy2(ref_out / "checkpoints" / "step-00000010.pt", tmp_path / "checkpoints")
    latest = tmp_path / "checkpoints" / "step-00000010.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a torn write, as on a full disk
    resumed = engine.run(config(data_root, tmp_path, "train.checkpoint_every=2"), mode="train")
    err = capsys.readouterr().err
    assert "hpckd: warning: skipping checkpoint" in err and "step-00000010.pt" in err and "corrupt" in err
    assert resumed["resumes"][0]["step"] == 8
    assert_same_run(ref, resumed, ref_out, tmp_path)
    warnings = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"warning"' in l]
    assert warnings and "step-00000010.pt" in warnings[0]["message"]


def test_checkpoint_from_another_config_is_a_clear_error(reference, data_root, tmp_path):
    ref_out, _ = reference
    copy_checkpoint(ref_out, 4, tmp_path)
    with pytest.raises(CheckpointError) as err:
        engine.run(config(data_root, tmp_path, "optim.lr=0.1"), mode="train")
    message = str(err.value)
    assert "written by another config" in message and "optim.lr: 0.05 != 0.1" in message
    assert "resume=never" in message and "\n" not in message


def test_resume_never_starts_over_and_clears_old_checkpoints(reference, data_root, tmp_path):
    ref_out, ref = reference
    copy_checkpoint(ref_out, 4, tmp_path)
    fresh = engine.run(config(data_root, tmp_path, "resume=never"), mode="train")
    assert fresh["resumes"] == [] and fresh["steps"] == 2 * STEPS_PER_EPOCH
    # Only this run's epoch-end checkpoints; the copied step 4 is gone (it must not be resumed later).
    assert [e.step for e in CheckpointStore(tmp_path / "checkpoints").entries()] == [6, 12]
    # Same seed, same data: a fresh start is the reference run again.
    assert_same_run(ref, fresh, ref_out, tmp_path)


def test_weights_only_file_is_not_a_resume_point(reference, data_root, tmp_path):
    ref_out, _ = reference
    with pytest.raises(CheckpointError, match="holds weights only.*model.weights="):
        engine.run(config(data_root, tmp_path, f"resume={ref_out / 'last.pt'}"), mode="train")


def test_other_world_size_or_backend_or_data_is_refused(reference, data_root):
    ref_out, _ = reference
    path = ref_out / "checkpoints" / "step-00000004.pt"
    state = load_checkpoint(path)
    cfg = dict(state["config"])
    fp = state["meta"]["fingerprint"]
    check_compatible(path, state, cfg, 1, "ddp", fp)  # the run that wrote it: fine
    with pytest.raises(CheckpointError, match="written by 1 processes, this run has 2"):
        check_compatible(path, state, cfg, 2, "ddp", fp)
    with pytest.raises(CheckpointError, match="dist.backend=ddp, this run uses deepspeed"):
        check_compatible(path, state, cfg, 1, "deepspeed", fp)
    with pytest.raises(CheckpointError, match="trained on other data"):
        check_compatible(path, state, cfg, 1, "ddp", "0" * 16)
    # Bookkeeping keys may differ (another out_dir, log interval, workers).
    check_compatible(path, state, {**cfg, "out_dir": "elsewhere", "log_every": 7}, 1, "ddp", fp)


def test_keep_last_prunes_to_the_newest(data_root, tmp_path):
    results = engine.run(config(data_root, tmp_path, "optim.epochs=1", "train.checkpoint_every=1", "train.keep_last=2"),
                         mode="train")
    assert results["steps"] == STEPS_PER_EPOCH
    assert [e.step for e in CheckpointStore(tmp_path / "checkpoints").entries()] == [5, 6]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    # Epoch 0 trains normally; from epoch 1 the LR is multiplied by 1e8 and the model blows up.
    cfg = config(data_root, tmp_path, "optim.schedule=multistep", "optim.milestones=[1]", "optim.step_factors=[1e8]",
                 "optim.epochs=3")
    with pytest.raises(engine.TrainingDiverged) as err:
        engine.run(cfg, mode="train")
    message = str(err.value)
    step = int(message.split("step ")[1].split(":")[0])
    assert "training diverged at epoch" in message and step > STEPS_PER_EPOCH  # in epoch 1 or later
    entries = CheckpointStore(tmp_path / "checkpoints").entries()
    assert [e.step for e in entries] == [STEPS_PER_EPOCH]  # only epoch 0's, nothing after the divergence
    weights = load_checkpoint(entries[0].path)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "last.pt").exists()


def test_accumulation_equals_one_big_batch(data_root, tmp_path):
    """LayerNorm pre-activation ResNet (no batch statistics): 4 micro-batches of 4 make the gradient of one batch
    of 16 (up to float summation order), so an epoch of SGD steps lands on the same weights."""
    common = ("model.arch=preresnet20", "model.kwargs={norm: ln}", "optim.epochs=1", "optim.schedule=constant")
    runs = {name: engine.run(config(data_root, tmp_path / name, *common, *extra), mode="train")
            for name, extra in (("whole", ()), ("accum", ("optim.accum_steps=4",)), ("init", ("optim.lr=0.0",)))}
    assert {r["steps"] for r in runs.values()} == {STEPS_PER_EPOCH}
    whole, accum, init = (final_weights(tmp_path / name) for name in ("whole", "accum", "init"))

    def distance(a, b) -> float:
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)

    # Float noise only, far below how far training moved the weights (without the 1/accum_steps scaling of the
    # micro-batch losses the distance is several times the movement).
    assert distance(accum, whole) < 1e-2 * distance(whole, init)
    assert runs["accum"]["history"][0]["train_loss"] == pytest.approx(runs["whole"]["history"][0]["train_loss"], rel=1e-5)


def test_fp16_with_scaler_and_channels_last_resumes_exactly(data_root, tmp_path):
    extra = ("train.precision=fp16", "train.channels_last=true", "train.checkpoint_every=3")
    ref = engine.run(config(data_root, tmp_path / "ref", *extra), mode="train")
    state = load_checkpoint(tmp_path / "ref" / "checkpoints" / "step-00000003.pt")
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint
    copy_checkpoint(tmp_path / "ref", 3, tmp_path / "resumed")
    resumed = engine.run(config(data_root, tmp_path / "resumed", *extra), mode="train")
    assert resumed["resumes"][0]["step"] == 3 and resumed["precision"] == "fp16"
    assert_same_run(ref, resumed, tmp_path / "ref", tmp_path / "resumed")


@pytest.mark.parametrize("overrides, fragment", [
    (["dist.sync_bn=true"], "SyncBatchNorm does not run on CPU"),
])  # a machine without TensorBoard: tests/test_tensorboard.py (the package is a test dependency now)
def test_machine_dependent_options_fail_early_with_the_fix(data_root, tmp_path, overrides, fragment):
    from hpckd.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        engine.run(config(data_root, tmp_path, "dist.device=cpu", *overrides), mode="train")
    assert not tmp_path.joinpath("log.jsonl").exists()  # nothing started


@pytest.mark.parametrize("sig, requeue_attempted", [(signal.SIGUSR2, True), (signal.SIGTERM, False)])
def test_only_sigusr2_requeues_a_slurm_job(data_root, tmp_path, monkeypatch, capsys, sig, requeue_attempted):
    """Inside a SLURM job (SLURM_JOB_ID set) SIGUSR2 makes rank 0 run `scontrol requeue`; SIGTERM never does (a
    preempted job is requeued by SLURM itself, a cancelled one must stay cancelled). Without scontrol on PATH the
    attempt shows as a failed requeue in the message."""
    def signalled(ctx: engine.StepContext) -> None:
        if ctx.micro == 2:
            os.kill(os.getpid(), sig)

    monkeypatch.setenv("SLURM_JOB_ID", "987654")
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))
    with pytest.raises(SystemExit) as stopped:
        engine.run(config(data_root, tmp_path, "optim.epochs=1"), mode="train", hooks=[signalled])
    assert stopped.value.code == 128 + sig
    err = capsys.readouterr().err
    assert f"hpckd: preempted by {signal.Signals(sig).name}: checkpoint written at epoch 0, step 2" in err
    assert ("`scontrol requeue 987654` failed" in err) is requeue_attempted
    assert ("rerun the same command to resume" in err) is not requeue_attempted
    assert [e.step for e in CheckpointStore(tmp_path / "checkpoints").entries()] == [2]


def test_a_checkpoint_from_before_an_option_existed_resumes_when_the_option_is_at_its_default(data_root, tmp_path):
    """Saved configs of older hpckd versions lack newer keys (here data.dtype, loss.mixed_labels): absent counts
    as the default, anything else is still a difference."""
    from hpckd.config import to_container
    from hpckd.checkpoint import config_differences

    current = to_container(config(data_root, tmp_path))
    old = copy.deepcopy(current)
    del old["data"]["dtype"], old["loss"]["mixed_labels"]
    assert config_differences(old, current) == []
    changed = to_container(config(data_root, tmp_path, "data.dtype=bfloat16", "train.precision=bf16"))
    assert config_differences(old, changed) == ["data.dtype: '<absent>' != 'bfloat16'",
                                                "train.precision: 'fp32' != 'bf16'"]
