"""The vertical slice: a teacher trained by `hpckd train`, then a 2-process DDP (gloo) distillation with the real
DALI CPU pipeline and the attention study's ensemble KD loss, writing results.json."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_hpckd

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NUM_CLASSES = 4
VAL_SAMPLES = 40


@pytest.fixture(scope="module")
def teacher_ckpts(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    paths = []
    for name, aug in (("t_weak", "weak"), ("t_strong", "strong")):
        proc = run_hpckd("train", f"data.root={synth_root}", f"out_dir={out / name}", f"aug={aug}", "model.arch=resnet8",
                         "optim.epochs=5", "data.batch_size=16", "data.num_workers=1")
        assert proc.returncode == 0, proc.stderr
        teacher = json.loads((out / name / "results.json").read_text())
        assert teacher["metrics"]["accuracy"] > 1.0 / NUM_CLASSES + 0.25, (name, teacher["metrics"])
        paths.append(out / name / "last.pt")
    return paths


@pytest.fixture(scope="module")
def student_out(synth_root, teacher_ckpts, tmp_path_factory):
    teachers = ",".join(f"{{checkpoint: {p}}}" for p in teacher_ckpts)
    out = tmp_path_factory.mktemp("student")
    proc = run_hpckd("distill", f"data.root={synth_root}", f"out_dir={out}", f"teachers=[{teachers}]",
                     "dist.nproc_per_node=2", "model.arch=resnet8", "optim.epochs=5", "data.batch_size=16",
                     "data.eval_batch_size=12", "data.num_workers=1", "loss.name=ensemble_kd", "loss.tau=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_two_process_ddp_distillation_beats_chance(student_out):
    out = student_out
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["launcher"] == "torchrun"
    assert results["config"]["data"]["loader"] == "dali"
    metrics = results["metrics"]
    # Exact evaluation under DDP: 40 val samples, eval batch 6 per rank -> partial batches, still counted once.
    assert metrics["count"] == VAL_SAMPLES
    assert metrics["accuracy"] > 1.0 / NUM_CLASSES + 0.25, metrics
    assert 0.0 <= metrics["top1_agreement"] <= 1.0
    assert {"ce", "kd"} <= {k.removeprefix("train_") for k in results["history"][-1]}
    for key in ("total_s", "train_s", "train_images_per_s"):
        assert results["timings"][key] > 0
    assert results["versions"]["torch"] and len(results["data"]["train_fingerprint"]) == 16
    assert not list(out.glob(".*.tmp")), "no temp files left behind"


def test_eval_reproduces_training_metrics_and_stores_affinity(student_out):
    results = json.loads((student_out / "results.json").read_text())
    proc = run_hpckd("eval", str(student_out / "last.pt"))
    assert proc.returncode == 0, proc.stderr
    proc = run_hpckd("eval", str(student_out / "last.pt"), "--augmented", "data.num_workers=1")
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((student_out / "results.json").read_text())["eval"]
    # Same weights, same clean val set, one process instead of two: the exact same metrics as training's last eval.
    for key in ("accuracy", "nll", "top1_agreement", "predictive_kl", "count"):
        assert stored["val"][key] == pytest.approx(results["metrics"][key], abs=1e-12), key
    assert stored["val_augmented"]["count"] == VAL_SAMPLES
    assert stored["val_affinity"] == pytest.approx(stored["val_augmented"]["accuracy"] / stored["val"]["accuracy"])
