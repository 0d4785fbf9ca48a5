"""TensorBoard scalars (``train.tensorboard=true``): what a real tiny run writes, read back with TensorBoard's own
reader, against the run's independent records (``log.jsonl`` and ``results.json``); and the one-line start-up
error when the package cannot be imported.

The run is the real loop in this process: 4 classes x 24 training images, batch 16, 2 epochs, ``log_every=1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the `test` extra has it

from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.train import engine
from tests.helpers import REPO, assert_one_line_error, train_config as config

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 24, 6
BATCH, EPOCHS = 16, 2
# drop_last: floor(96 / 16) = 6 optimizer steps per epoch, 12 in all.
STEPS = (CLASSES * PER_CLASS // BATCH) * EPOCHS


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb_data")
    write_imagefolder(root, SynthSpec(classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=2))
    return root


def overrides(data_root: Path, out: Path) -> list[str]:
    return [f"data.root={data_root}", f"out_dir={out}", "model.arch=resnet8", "data.loader=torch",
            "data.num_workers=0", f"data.batch_size={BATCH}", f"optim.epochs={EPOCHS}", "log_every=1",
            "dist.device=cpu", "train.tensorboard=true"]


@pytest.fixture(scope="module")
def tb_run(data_root, tmp_path_factory) -> tuple[Path, dict, EventAccumulator]:
    out = tmp_path_factory.mktemp("tb_run")
    results = engine.run(config(data_root, out, *overrides(data_root, out)), mode="train")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return out, results, events


def log_records(out: Path, event: str) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == event]


def f32(values) -> list[np.float32]:
    """TensorBoard stores scalars as float32; compare at that precision."""
    return [np.float32(v) for v in values]


def test_tags_are_the_numeric_fields_of_the_logged_records(tb_run):
    out, _, events = tb_run
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/val_accuracy", "epoch/train_loss"} <= tags
    # Everything numeric in a step/epoch record becomes a scalar (bookkeeping fields and None values excepted).
    def numeric(record: dict, skip: set[str]) -> set[str]:
        return {k for k, v in record.items()
                if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}

    step_keys = numeric(log_records(out, "step")[0], {"event", "step", "epoch", "time"})
    epoch_keys = numeric(log_records(out, "epoch")[0], {"event", "time", "train_s", "max_rss_gib", "gpu_mem_gib"})
    assert tags == {f"train/{k}" for k in step_keys} | {f"epoch/{k}" for k in epoch_keys}


def test_one_loss_scalar_per_optimizer_step_equal_to_the_json_log(tb_run):
    out, results, events = tb_run
    loss = events.Scalars("train/loss")
    assert results["steps"] == STEPS
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    steps = log_records(out, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert f32(e.value for e in loss) == f32(r["loss"] for r in steps)
    lr = events.Scalars("train/lr")
    assert [e.step for e in lr] == list(range(1, STEPS + 1))
    assert f32(e.value for e in lr) == f32(r["lr"] for r in steps)


def test_epoch_scalars_equal_the_results(tb_run):
    _, results, events = tb_run
    acc = events.Scalars("epoch/val_accuracy")
    assert [e.step for e in acc] == list(range(1, EPOCHS + 1))  # logged after each epoch, at the epoch count
    assert f32(e.value for e in acc) == f32(h["val_accuracy"] for h in results["history"])
    assert np.float32(acc[-1].value) == np.float32(results["metrics"]["accuracy"])
    train_loss = events.Scalars("epoch/train_loss")
    assert f32(e.value for e in train_loss) == f32(h["train_loss"] for h in results["history"])


# A process in which `tensorboard` cannot be imported (what Python does for a package that is not installed).
WITHOUT_TENSORBOARD = ("import sys; sys.modules['tensorboard'] = None; "
                       "from hpckd.cli import main; sys.exit(main(sys.argv[1:]))")


def test_missing_tensorboard_is_one_line_at_start_up(data_root, tmp_path):
    out = tmp_path / "out"
    args = ["train", *overrides(data_root, out), "data.eval_batch_size=24", "optim.lr=0.05"]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARD, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    line = assert_one_line_error(proc, "train.tensorboard=true", "pip install tensorboard",
                                 "train.tensorboard=false")
    assert proc.returncode == 2  # a user error's exit code
    assert "tensorboard" in line.split("cannot be imported (")[1]  # names what failed to import
    assert not out.exists()  # nothing started: no log, no checkpoint, no event file


def test_a_resumed_run_purges_what_the_killed_session_logged_after_its_checkpoint(tb_run, data_root, tmp_path):
    """Killed during step 6 with the last checkpoint at step 3: steps 4-5 were logged, then redone by the resumed
    run. Each step must appear once, with the uninterrupted run's values (resume is exact)."""
    _, _, reference = tb_run
    def killed_at_sixth_micro_step(ctx: engine.StepContext) -> None:
        if ctx.micro == 6:
            raise RuntimeError("killed")

    args = [*overrides(data_root, tmp_path), "train.checkpoint_every=3"]
    with pytest.raises(RuntimeError, match="killed"):
        engine.run(config(data_root, tmp_path, *args), mode="train", hooks=[killed_at_sixth_micro_step])
    assert [r["step"] for r in log_records(tmp_path, "step")] == [1, 2, 3, 4, 5]  # 4 and 5 after the checkpoint
    resumed = engine.run(config(data_root, tmp_path, *args), mode="train")
    assert [r["step"] for r in resumed["resumes"]] == [3]

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert f32(e.value for e in loss) == f32(e.value for e in reference.Scalars("train/loss"))
