"""Batch ops wired into the training loop: the augmentation study's doubled batch with CutMix / CutMixPick and
the KD+DA loss (CE + KD on the original half, KL only on the augmented half)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import np_log_softmax, run_hpckd, val_logits

pytestmark = pytest.mark.slow  # every test trains or distils through the real `hpckd` command


@pytest.fixture(scope="module")
def teacher(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bo_teacher")
    proc = run_hpckd("train", f"data.root={synth_root}", f"out_dir={out}", "model.arch=resnet8", "optim.epochs=2",
                     "data.batch_size=16", "data.num_workers=1", "data.loader=torch")
    assert proc.returncode == 0, proc.stderr
    return out / "last.pt"


@pytest.fixture(scope="module")
def strong_teacher(synth_root, tmp_path_factory):
    """Same architecture as ``teacher``, another seed and twice the epochs: other weights, other predictions."""
    out = tmp_path_factory.mktemp("bo_strong_teacher")
    proc = run_hpckd("train", f"data.root={synth_root}", f"out_dir={out}", "model.arch=resnet8", "optim.epochs=4",
                     "seed=1", "data.batch_size=16", "data.num_workers=1", "data.loader=torch")
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


def test_efficient_distillation_runs_two_stages_with_the_swapped_teacher(synth_root, teacher, strong_teacher,
                                                                       tmp_path):
    """Response-based study Sec. 5.2: stage 1 WSL from the weak teacher; stage 2 starts from stage 1's student,
    distils the strong teacher with consistent knowledge mining, lr 0.05 -> 5e-4, weight decay 0.

    Which teacher each stage distilled from is read twice: from its stored config, and from the fidelity metrics
    of its final evaluation, recomputed here from the checkpoint files (the stage's student against its own
    teacher, and not against the other one)."""
    out = tmp_path / "eff"
    proc = run_hpckd("distill-efficient", f"data.root={synth_root}", f"out_dir={out}", f"teachers=[{{checkpoint: {teacher}}}]",
                     "model.arch=resnet8", "data.batch_size=16", "data.num_workers=1", "data.loader=torch",
                     "--strong-teacher", str(strong_teacher), "--epochs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {stage: json.loads((out / stage / "results.json").read_text()) for stage in ("stage1", "stage2")}
    one, two = results["stage1"]["config"], results["stage2"]["config"]
    assert one["loss"]["name"] == "wsl" and one["optim"]["lr"] == 0.5 and one["optim"]["weight_decay"] == 4e-5
    assert two["loss"]["name"] == "ckm" and two["loss"]["teacher_tau"] == 0.7 and two["loss"]["tau"] == 1.0
    assert one["loss"]["wsl"]["weight_tau"] == "tau" and two["loss"]["targets"]["smoothing"] == 0.99  # subsections
    assert two["optim"]["lr"] == 0.05 and two["optim"]["weight_decay"] == 0.0 and two["optim"]["min_lr"] == 5e-4
    assert two["model"]["weights"] == str(out / "stage1" / "last.pt")
    assert one["optim"]["epochs"] + two["optim"]["epochs"] == 2
    assert [t["checkpoint"] for t in one["teachers"]] == [str(teacher)]
    assert [t["checkpoint"] for t in two["teachers"]] == [str(strong_teacher)]

    # Fidelity study Eq. 2 (top-1 agreement) and Eq. 3 (predictive KL, KL(p_t || p_s) at tau 1), and the teacher's
    # mean predictive entropy, in float64 numpy from each checkpoint's own val logits.
    teachers = {"weak": val_logits(teacher, synth_root), "strong": val_logits(strong_teacher, synth_root)}
    log_p = {name: np_log_softmax(z) for name, z in teachers.items()}
    kl_apart = np.mean(np.sum(np.exp(log_p["weak"]) * (log_p["weak"] - log_p["strong"]), axis=1))
    assert kl_apart > 1e-2, "the two teachers must predict differently for this test to tell them apart"
    for stage, own, other in (("stage1", "weak", "strong"), ("stage2", "strong", "weak")):
        student = val_logits(out / stage / "last.pt", synth_root)
        log_s = np_log_softmax(student)
        metrics = results[stage]["metrics"]
        assert metrics["count"] == len(student) == 40

        def fidelity(name: str) -> tuple[float, float, float]:
            lp = log_p[name]
            agreement = float(np.mean(teachers[name].argmax(1) == student.argmax(1)))
            kl = float(np.mean(np.sum(np.exp(lp) * (lp - log_s), axis=1)))
            return agreement, kl, float(np.mean(-np.sum(np.exp(lp) * lp, axis=1)))

        agreement, kl, entropy = fidelity(own)
        assert metrics["top1_agreement"] == agreement, (stage, own)
        assert metrics["predictive_kl"] == pytest.approx(kl, abs=1e-4), (stage, own)
        assert metrics["teacher_entropy"] == pytest.approx(entropy, abs=1e-4), (stage, own)
        _, other_kl, other_entropy = fidelity(other)  # what the metrics would be, had the stage used the other one
        assert (metrics["predictive_kl"], metrics["teacher_entropy"]) != pytest.approx((other_kl, other_entropy),
                                                                                       abs=1e-3), (stage, other)


def test_bf16_channels_last_dali_images_through_cutmix_pick_distillation(synth_root, teacher, tmp_path):
    """bf16 channels-last images from DALI, scored by teacher and student for CutMixPick (under autocast)."""
    out = tmp_path / "bf16"
    proc = run_hpckd("distill", f"data.root={synth_root}", f"out_dir={out}", f"teachers=[{{checkpoint: {teacher}}}]",
                     "model.arch=resnet8", "optim.epochs=1", "data.batch_size=16", "data.num_workers=1",
                     "data.loader=dali", "data.dtype=bfloat16", "train.precision=bf16", "train.channels_last=true",
                     "loss.name=kd_da", "batch_ops.scheme=cutmix_pick", "batch_ops.pick_criterion=kl", "log_every=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data"]["dtype"] == "bfloat16"
    assert results["history"][-1]["train_kd_aug"] > 0 and results["metrics"]["count"] == 40


def _first_step(out) -> dict:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(rec for rec in lines if rec["event"] == "step")


def test_teacher_training_with_mixup_uses_the_mixed_labels_unless_turned_off(synth_root, tmp_path):
    """Same seed, same first batch, same lambda: only the hard-label target differs between the two runs."""
    common = (f"data.root={synth_root}", "model.arch=resnet8", "optim.epochs=1", "data.batch_size=16",
              "data.num_workers=1", "data.loader=torch", "batch_ops.scheme=mixup", "batch_ops.doubled=false",
              "log_every=1")
    firsts = {}
    for mixed in ("true", "false"):
        out = tmp_path / f"mixed_{mixed}"
        proc = run_hpckd("train", *common, f"out_dir={out}", f"loss.mixed_labels={mixed}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        firsts[mixed] = _first_step(out)
    assert firsts["true"]["lr"] == firsts["false"]["lr"]
    assert firsts["true"]["ce"] != pytest.approx(firsts["false"]["ce"], rel=1e-4)
