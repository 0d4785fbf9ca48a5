"""The vertical slice: a teacher trained by `hpckd train`, then a 2-process DDP (gloo) distillation with the real
DALI CPU pipeline and the attention study's ensemble KD loss, writing results.json."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_hpckd

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
        paths.append(out / name / "last.pt")
    return paths


def test_two_process_ddp_distillation_beats_chance(synth_root, teacher_ckpts, tmp_path):
    teachers = ",".join(f"{{checkpoint: {p}}}" for p in teacher_ckpts)
    out = tmp_path / "student"
    proc = run_hpckd("distill", f"data.root={synth_root}", f"out_dir={out}", f"teachers=[{teachers}]",
                     "dist.nproc_per_node=2", "model.arch=resnet8", "optim.epochs=5", "data.batch_size=16",
                     "data.eval_batch_size=12", "data.num_workers=1", "loss.name=ensemble_kd", "loss.tau=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
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
