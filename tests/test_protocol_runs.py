"""Run-level protocols of the studies: training metrics and Acc-Gap per epoch (attention study), Efficient
Distillation's text and code schedules (response-based study), initialisation interpolation and the
independent-student baseline (fidelity study), the A/B test and normalised accuracy files; each against an
independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpckd.checkpoint import save_checkpoint
from hpckd.errors import ConfigError
from hpckd.models import create

from tests.helpers import assert_one_line_error, np_log_softmax, run_hpckd, train_config, val_logits


def fake_checkpoint(path: Path, seed: int, cfg=None) -> Path:
    """A resnet8 of 4 classes with seeded weights and BatchNorm statistics, saved as hpckd writes checkpoints."""
    from hpckd.config import to_container

    torch.manual_seed(seed)
    model = create("resnet8", 4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "arch": "resnet8", "num_classes": 4,
                           "config": to_container(cfg) if cfg is not None else {}, "meta": {"step": 1}})
    return path


# ------------------------------------------------------------------------ Acc-Gap and training-set metrics


def test_training_accuracy_agreement_and_acc_gap_per_epoch(synth_root, tmp_path):
    """optim.lr=0 keeps the weights at their initialisation, so the epoch's training accuracy is that of the saved
    student run in train mode (batch statistics) on the loader's batches, recomputed here; agreement with the
    teacher likewise (Tables 3-4: Acc-Gap = train - val accuracy)."""
    from hpckd import dist
    from hpckd.data.loaders import build_loaders
    from hpckd.train import engine

    teacher = fake_checkpoint(tmp_path / "t" / "last.pt", seed=7)
    cfg = train_config(synth_root, tmp_path / "s", f"teachers=[{{checkpoint: {teacher}}}]", "optim.epochs=1",
                       "optim.lr=0.0", "optim.weight_decay=0.0")
    results = engine.run(cfg, mode="distill")
    record = results["history"][0]

    student = create("resnet8", 4)
    student.load_state_dict(torch.load(tmp_path / "s" / "last.pt", weights_only=False)["model"])
    student.train()
    t_model = create("resnet8", 4)
    t_model.load_state_dict(torch.load(teacher, weights_only=False)["model"])
    t_model.eval()
    loaders = build_loaders(cfg, dist.init("cpu"))
    loaders.train.set_epoch(0)
    rows = correct = agree = 0
    with torch.no_grad():
        for batch in loaders.train:
            s = student(batch.views["student"]).argmax(1)
            t = t_model(batch.views["student"]).argmax(1)
            rows += len(s)
            correct += int((s == batch.labels).sum())
            agree += int((s == t).sum())
    assert rows == 192
    assert record["train_accuracy"] == pytest.approx(correct / rows, abs=1e-12)
    assert record["train_top1_agreement"] == pytest.approx(agree / rows, abs=1e-12)
    assert record["acc_gap"] == pytest.approx(record["train_accuracy"] - record["val_accuracy"], abs=1e-12)
    stored = json.loads((tmp_path / "s" / "results.json").read_text())
    assert stored["metrics"]["acc_gap"] == pytest.approx(record["acc_gap"], abs=1e-12)


# --------------------------------------------------------------------------------- Efficient Distillation


def test_efficient_distillation_code_form_switches_at_239_with_the_codes_floors():
    from hpckd.losses.recipes import efficient_distillation_stages
    from hpckd.train.experiment import load_experiment
    from hpckd.train.optim import lr_factor

    text = efficient_distillation_stages(300)
    code = efficient_distillation_stages(300, form="code")
    assert [s.epochs for s in text] == [240, 60] and [s.epochs for s in code] == [239, 61]
    cfgs = {(form, s.name): load_experiment(None, [*s.overrides, f"optim.epochs={s.epochs}"]).optim
            for form, stages in (("text", text), ("code", code)) for s in stages}
    assert cfgs["text", "stage1"].min_lr == 0.0 and cfgs["code", "stage1"].min_lr == 1e-5
    assert cfgs["code", "stage2"].min_lr == 5e-4 and cfgs["code", "stage2"].schedule_epochs == 62
    assert all(c.lr_reference_batch == 1024 for c in cfgs.values())  # the rates are for batch 1024
    # SGDR Eq. 5: eta = eta_min + (eta_max - eta_min) (1 + cos(pi t / T)); the code's stage 2 has T = 62 epochs
    two = cfgs["code", "stage2"]
    for epoch in (0, 30, 60):
        floor = 5e-4 / 0.05
        expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / 62))
        assert lr_factor(two, epoch * 10, 10) == pytest.approx(expected, abs=1e-12)
    text_two = cfgs["text", "stage2"]
    assert lr_factor(text_two, 60 * 10, 10) == pytest.approx(5e-4 / 0.05, abs=1e-12)  # the text reaches its floor
    assert lr_factor(two, 61 * 10, 10) > 5e-4 / 0.05 + 1e-4  # the code stops one epoch short of it
    with pytest.raises(ConfigError):
        efficient_distillation_stages(300, form="other")


def test_stage_configs_keep_user_loss_overrides_and_refuse_a_config_loss_section(tmp_path):
    from hpckd.sweep.stages import stage_configs

    args = ["teachers=[{checkpoint: weak.pt}]", f"out_dir={tmp_path / 'eff'}", "loss.targets.smoothing_form=code",
            "loss.tau=3.0"]
    one, two = stage_configs(None, args, "strong.pt", 10)
    assert one.loss.name == "wsl" and two.loss.name == "ckm"  # the stage recipes
    assert one.loss.targets.smoothing_form == "code" and two.loss.targets.smoothing_form == "code"  # merged on top
    assert one.loss.tau == 3.0 and two.loss.tau == 3.0
    assert two.loss.teacher_tau == 0.7 and two.loss.targets.smoothing == 0.99  # the rest of the recipe stays
    assert one.optim.lr_reference_batch == 1024 and two.optim.min_lr == 5e-4
    yaml_cfg = tmp_path / "with_loss.yaml"
    yaml_cfg.write_text("loss:\n  name: kd\n")
    with pytest.raises(ConfigError, match="sets a 'loss' section"):
        stage_configs(str(yaml_cfg), args[:2], "strong.pt", 10)


def test_code_label_smoothing_divides_by_the_codes_1000():
    from hpckd.losses.targets import label_smoothing_target

    y = label_smoothing_target(torch.tensor([1]), 10, 0.9, "code", torch.float64)
    expected = np.full(10, 0.1 / 1000)
    expected[1] += 0.9
    np.testing.assert_allclose(y.numpy()[0], expected, atol=1e-15)


# ------------------------------------------------------------------------------------ the fidelity study


def test_init_interpolation_is_lambda_teacher_plus_one_minus_lambda_random(tmp_path):
    from hpckd.train import rng
    from hpckd.train.build import build_student
    from hpckd.train.experiment import load_experiment

    teacher = fake_checkpoint(tmp_path / "t.pt", seed=11)
    t_state = torch.load(teacher, weights_only=False)["model"]
    rng.seed_everything(3)
    random = build_student(load_experiment(None, ["model.arch=resnet8"]), 4).state_dict()
    rng.seed_everything(3)
    mixed = build_student(load_experiment(None, ["model.arch=resnet8", f"model.init_from_teacher={teacher}",
                                                 "model.init_lambda=0.25"]), 4).state_dict()
    for key, value in mixed.items():
        if value.is_floating_point():  # Fig. 6b: theta_s = lambda theta_t + (1 - lambda) theta_r
            expected = 0.25 * t_state[key].double().numpy() + 0.75 * random[key].double().numpy()
            np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=key)
        else:
            assert torch.equal(value, t_state[key])
    with pytest.raises(ConfigError, match="init_lambda"):
        build_student(load_experiment(None, ["model.arch=resnet8", f"model.init_from_teacher={teacher}",
                                             "model.init_lambda=1.5"]), 4)


def test_eval_against_an_independent_student_gives_their_agreement_and_kl(synth_root, tmp_path):
    """Sec. 3.2's baseline: two students compared through `hpckd eval --against`; Eqs. 2-3 recomputed from both
    checkpoint files in numpy (the other student plays the teacher)."""
    from hpckd.train.experiment import load_experiment

    cfg = load_experiment(None, [f"data.root={synth_root}", "data.loader=torch", "data.num_workers=0",
                                 "model.arch=resnet8", "data.eval_batch_size=8"])
    a = fake_checkpoint(tmp_path / "student" / "last.pt", seed=1, cfg=cfg)
    b = fake_checkpoint(tmp_path / "independent" / "last.pt", seed=2, cfg=cfg)
    proc = run_hpckd("eval", str(a), "--against", str(b))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = json.loads((tmp_path / "student" / "results.json").read_text())["eval"]["val_vs_independent"]
    za, zb = val_logits(a, synth_root), val_logits(b, synth_root)
    la, lb = np_log_softmax(za), np_log_softmax(zb)
    assert stored["top1_agreement"] == pytest.approx(np.mean(za.argmax(1) == zb.argmax(1)), abs=1e-12)
    assert stored["predictive_kl"] == pytest.approx(np.mean((np.exp(lb) * (lb - la)).sum(1)), abs=1e-6)
    assert stored["count"] == 40


# -------------------------------------------------------------------------- A/B test, normalised accuracy


def fake_run(folder: Path, **metrics: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"metrics": metrics}))
    return folder


def test_ab_test_command_writes_the_eq9_p_value(tmp_path):
    control = [fake_run(tmp_path / f"v{i}", top1_agreement=a, teacher_iou=0.6) for i, a in enumerate((0.80, 0.82, 0.79))]
    treat = [fake_run(tmp_path / f"h{i}", top1_agreement=a) for i, a in enumerate((0.78, 0.83, 0.70))]
    out = tmp_path / "ab.json"
    proc = run_hpckd("ab-test", "--control", *map(str, control), "--treatment", *map(str, treat), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["p_value"] == pytest.approx(1 / 3)  # Eq. 9: one trial of three has hKD > vKD
    assert result["control_teacher_iou"] == [0.6, 0.6, 0.6] and result["treatment_teacher_iou"] == [None] * 3
    bad = run_hpckd("ab-test", "--control", str(control[0]), "--treatment", *map(str, treat), "--output",
                    str(tmp_path / "bad.json"))
    assert_one_line_error(bad, "pairs runs")
    assert not (tmp_path / "bad.json").exists()


def test_normalized_accuracy_is_stored_in_the_run(tmp_path):
    from hpckd.train.protocols import store_normalized_accuracy

    run = fake_run(tmp_path / "run", accuracy=0.66)
    weak, strong = fake_run(tmp_path / "weak", accuracy=0.60), fake_run(tmp_path / "strong", accuracy=0.70)
    assert store_normalized_accuracy(run, weak, strong) == pytest.approx(0.6)
    stored = json.loads((run / "results.json").read_text())
    assert stored["normalized_accuracy"]["value"] == pytest.approx(0.6) and stored["metrics"]["accuracy"] == 0.66


def test_normalized_accuracy_command_stores_the_figs_5_6_value(tmp_path):
    """(acc - acc-) / (acc+ - acc-) of the response-based study, by hand: (0.62 - 0.50) / (0.70 - 0.50) = 0.6."""
    runs = {}
    for name, acc in (("replaced", 0.62), ("weak", 0.50), ("strong", 0.70)):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "results.json").write_text(json.dumps({"metrics": {"accuracy": acc}}))
    proc = run_hpckd("normalized-accuracy", str(runs["replaced"]), "--weak", str(runs["weak"]),
                     "--strong", str(runs["strong"]))
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((runs["replaced"] / "results.json").read_text())["normalized_accuracy"]
    assert stored["value"] == pytest.approx(0.6, abs=1e-12) and stored["acc_minus"] == 0.50
    assert_one_line_error(run_hpckd("normalized-accuracy", str(runs["replaced"]), "--weak", str(runs["weak"]),
                                    "--strong", str(runs["weak"])), "weak")
