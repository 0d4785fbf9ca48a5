"""Batch ops wired into the training loop: the augmentation study's doubled batch with CutMix / CutMixPick and
the KD+DA loss (CE + KD on the original half, KL only on the augmented half)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_hpckd


@pytest.fixture(scope="module")
def teacher(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bo_teacher")
    proc = run_hpckd("train", f"data.root={synth_root}", f"out_dir={out}", "model.arch=resnet8", "optim.epochs=2",
                     "data.batch_size=16", "data.num_workers=1", "data.loader=torch")
    assert proc.returncode == 0, proc.stderr
    return out / "last.pt"


@pytest.mark.parametrize("scheme", ["cutmix", "cutmix_pick"])
def test_doubled_batch_distillation_runs_kd_on_both_halves(synth_root, teacher, tmp_path, scheme):
    out = tmp_path / scheme
    proc = run_hpckd("distill", f"data.root={synth_root}", f"out_dir={out}", f"teachers=[{{checkpoint: {teacher}}}]",
                     "model.arch=resnet8", "optim.epochs=1", "data.batch_size=16", "data.num_workers=1",
                     "data.loader=torch", "loss.name=kd_da", f"batch_ops.scheme={scheme}", "log_every=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    epoch = results["history"][-1]
    # kd_da reports the augmented half's KL separately; it exists only if the batch really was doubled and marked
    assert epoch["train_kd_aug"] > 0 and epoch["train_kd"] > 0 and epoch["train_ce"] > 0
    assert results["metrics"]["count"] == 40
