"""Reliability of the training loop (issue 18): a diverged state never reaches a checkpoint, a deliberate restart
with changed optimizer settings, ``resume=never`` says what it removes, untrained teachers are refused, every count
and size of the schema is range-checked, and the evaluation of ``hpckd eval --augmented`` uses the training policy.

The runs are the real loop on a tiny data set (4 classes x 24 training images, 32x32, resnet8, batch 16 -> 6
steps per epoch), as in tests/test_train_resume.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hpckd.checkpoint import CheckpointStore, load_checkpoint, nonfinite_entries
from hpckd.cli import main
from hpckd.data.loaders import student_policy, view_policies
from hpckd.errors import CheckpointError, ConfigError
from hpckd.losses import NonFiniteError
from hpckd.losses.checks import check_logits
from hpckd.train import engine
from hpckd.train.experiment import load_experiment
from tests.helpers import train_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("outside_slurm")]
STEPS_PER_EPOCH = 6


@pytest.fixture(scope="session")
def data_root(resume_data) -> Path:
    return resume_data


def config(data_root: Path, out: Path, *extra: str):
    return train_config(data_root, out, "data.index_cache=false", *extra)


def step_lrs(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["event"] == "step"}


# From epoch 1 the rate is 1e4 times higher: BatchNorm's running variance overflows to Inf while the loss is still
# finite (the main branch then wrote that state into step-12, last.pt and results.json, and exited 0).
BLOW_UP = ("optim.schedule=multistep", "optim.milestones=[1]", "optim.step_factors=[1e4]")


def test_a_state_that_overflows_with_a_finite_loss_is_never_saved(data_root, tmp_path):
    with pytest.raises(engine.TrainingDiverged) as err:
        engine.run(config(data_root, tmp_path, *BLOW_UP), mode="train")
    message = str(err.value)
    assert "training diverged at epoch 1" in message and "running_var" in message and "NaN/Inf" in message
    good = tmp_path / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}.pt"
    assert str(good) in message and "resume_changes=[optim.lr]" in message  # the message names a real file
    assert [e.step for e in CheckpointStore(tmp_path / "checkpoints").entries()] == [STEPS_PER_EPOCH]
    assert nonfinite_entries(load_checkpoint(good)["model"]) == []
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "results.json").exists()

    # A plain re-run is refused as a config change, ...
    with pytest.raises(CheckpointError, match="optim.step_factors"):
        engine.run(config(data_root, tmp_path, "optim.schedule=multistep", "optim.milestones=[1]",
                          "optim.step_factors=[1.0]"), mode="train")
    # ... the documented override restarts from the last good checkpoint with the new factor from its first step.
    resumed = engine.run(config(data_root, tmp_path, "optim.schedule=multistep", "optim.milestones=[1]",
                                "optim.step_factors=[1.0]", "resume_changes=[optim.step_factors]"), mode="train")
    assert [r["step"] for r in resumed["resumes"]] == [STEPS_PER_EPOCH]
    assert all(math.isclose(lr, 0.05) for step, lr in step_lrs(tmp_path).items() if step > STEPS_PER_EPOCH)
    assert nonfinite_entries(load_checkpoint(tmp_path / "last.pt")["model"]) == []
    assert math.isfinite(resumed["metrics"]["accuracy"])


def test_resume_with_a_changed_learning_rate_continues_the_schedule_at_the_new_rate(data_root, tmp_path):
    engine.run(config(data_root, tmp_path, "optim.epochs=1"), mode="train")
    # Same run, now 2 epochs at a lower rate, resumed from the end of epoch 0 (epochs and lr deliberately changed).
    engine.run(config(data_root, tmp_path, "optim.lr=0.01", "resume_changes=[optim.lr,optim.epochs]"), mode="train")
    lrs = step_lrs(tmp_path)
    # Cosine over 12 steps of the new run: step t (1-based) uses 0.01 * (1 + cos(pi * (t - 1) / 12)) / 2.
    for t in range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1):
        assert math.isclose(lrs[t], 0.01 * 0.5 * (1 + math.cos(math.pi * (t - 1) / 12)), rel_tol=1e-9), t


def test_resume_never_says_what_it_removes_and_removes_it_together(data_root, tmp_path, capsys):
    engine.run(config(data_root, tmp_path, "optim.epochs=1"), mode="train")
    (tmp_path / "checkpoints" / ".step-00000099.pt.abc.tmp").write_bytes(b"half")  # a save killed long ago
    capsys.readouterr()
    fresh = engine.run(config(data_root, tmp_path, "optim.epochs=1", "resume=never", "optim.lr=0.02"), mode="train")
    err = capsys.readouterr().err
    assert "resume=never: removing the previous run's results.json, last.pt, log.jsonl, 1 checkpoint(s)" in err
    assert fresh["resumes"] == [] and fresh["config"]["optim"]["lr"] == 0.02
    assert json.loads((tmp_path / "results.json").read_text())["config"]["optim"]["lr"] == 0.02
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".discarded")]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_stale_temp_files_of_a_killed_save_are_removed_at_start(data_root, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir(parents=True)
    stale = folder / ".step-00000003.pt.k2j4.tmp"
    stale.write_bytes(b"half a checkpoint")
    engine.run(config(data_root, tmp_path, "optim.epochs=1"), mode="train")
    assert not stale.exists()
    assert [e.step for e in CheckpointStore(folder).entries()] == [STEPS_PER_EPOCH]


def test_a_checkpoint_without_a_training_step_is_not_a_teacher(data_root, tmp_path):
    engine.run(config(data_root, tmp_path / "t", "optim.epochs=1"), mode="train")
    state = load_checkpoint(tmp_path / "t" / "last.pt")
    state["meta"]["step"] = 0  # what an untrained (epochs=0) run of the main branch wrote
    torch.save(state, tmp_path / "untrained.pt")
    with pytest.raises(CheckpointError, match="before any training step"):
        engine.run(config(data_root, tmp_path / "s", "optim.epochs=1",
                          f"teachers=[{{checkpoint: {tmp_path / 'untrained.pt'}}}]"), mode="distill")


def test_augmented_eval_uses_the_training_policy_with_its_crop(data_root, tmp_path):
    """``hpckd eval --augmented`` of a run with data.cifar_crop=rrc evaluates under RandomResizedCrop, the policy
    the run trained with (the main branch built the policy without cifar_crop, i.e. pad-crop)."""
    engine.run(config(data_root, tmp_path, "optim.epochs=1", "data.cifar_crop=rrc"), mode="train")
    assert main(["eval", str(tmp_path / "last.pt"), "--augmented"]) == 0
    stored = json.loads((tmp_path / "results.json").read_text())["eval"]["val_augmented"]
    spec = stored["policy_spec"]
    assert spec["crop"] == "rrc" and spec["name"] == "cifar_weak" and spec["flip"] is True
    cfg = config(data_root, tmp_path, "data.cifar_crop=rrc")
    assert student_policy(cfg).crop == "rrc" and view_policies(cfg)["student"] == student_policy(cfg)


BAD_NUMBERS = [
    ("data.batch_size", "0"), ("data.batch_size", "-8"), ("data.eval_batch_size", "0"), ("data.image_size", "0"),
    ("data.image_size", "-32"), ("data.num_workers", "-1"), ("data.imbalance", "0.5"), ("optim.epochs", "0"),
    ("optim.epochs", "-3"), ("optim.lr", "-0.1"), ("optim.momentum", "1.5"),
    ("optim.weight_decay", "-1"), ("optim.gamma", "0"), ("optim.accum_steps", "0"), ("optim.min_lr", "-1"),
    ("optim.warmup_epochs", "-1"), ("optim.clip_grad_norm", "-1"), ("optim.lr_reference_batch", "-1"),
    ("dist.nproc_per_node", "0"), ("dist.zero_stage", "3"), ("train.keep_last", "0"),
    ("train.checkpoint_every", "-1"), ("log_every", "-1"), ("seed", "-1"), ("metrics.n_bins", "0"),
    ("metrics.kl_temperature", "0"), ("metrics.kl_scale", "0"), ("metrics.tstddev_group_size", "0"),
    ("metrics.cam_threshold", "1.5"), ("loss.tau", "0"), ("loss.label_smoothing", "2"),
    ("batch_ops.mixup_alpha", "0"), ("batch_ops.cutmix_alpha", "-1"),
]


@pytest.mark.parametrize("key, value", BAD_NUMBERS, ids=[f"{k}={v}" for k, v in BAD_NUMBERS])
def test_every_count_and_size_is_range_checked_in_one_line(key, value, tmp_path, capsys):
    with pytest.raises(ConfigError):  # the loader refuses it ...
        load_experiment(None, [f"{key}={value}"])
    code = main(["train", f"out_dir={tmp_path / 'run'}", f"{key}={value}"])  # ... and the command says one line
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hpckd: error:") and key in lines[0], lines
    assert not (tmp_path / "run").exists()  # nothing started


def test_messages_that_misled_now_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="'resume' is 'Auto'; use auto"):
        load_experiment(None, ["resume=Auto"])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "last.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match=f"{run} is a run folder, not a checkpoint: pass {run / 'last.pt'}"):
        load_checkpoint(run)
    logits, nan = torch.zeros(2, 3), torch.full((2, 3), float("nan"))
    with pytest.raises(NonFiniteError, match="the student diverged \\(lower optim.lr") as err:
        check_logits(nan, [logits], None)
    assert "logit store" not in str(err.value)  # no store is involved in an inline run
    with pytest.raises(NonFiniteError, match="teacher 1's checkpoint is broken"):
        check_logits(logits, [logits, nan], None)
