"""The reproduction recipes (configs/repro/): every recipe plans (every trial's experiment config validated), with
the number of trials and teachers derived by hand from the paper, and the hyper-parameters the paper prints.

The expected numbers below are typed from the papers (/work/shared/papers, section cited next to each), not read
from the recipes, so a recipe that drifts from its paper fails here. Plans only: nothing is trained (the mini runs
are in test_recipes_mini.py). `sweep plan` does not read the data, so the placeholder roots (/path/to/...) plan.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from hpckd.sweep.spec import plan_sweep
from hpckd.sweep.stages import stage_configs

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "configs" / "repro"

# recipe -> (trials, distinct teachers, study), each derived by hand from the paper:
EXPECTED = {
    # attention study: 2^3 = 8 grid trials T1?T2?S? (Table 1), S_n, S_w, S_s and T1nT2nSn (Table 3), Ours(1T)
    # (Table 2) = 13; teachers T1, T2 x {n, w, s} = 6
    "attention/cifar100.yaml": (13, 6, "attention"),
    "attention/cifar100_imb100.yaml": (13, 6, "attention"),
    "attention/imagenet.yaml": (13, 6, "attention"),
    "attention/imagenet_lt.yaml": (13, 6, "attention"),
    # App. A.5: 2^4 = 16 trials x 2 data sets; 3 roles x 2 letters x 2 data sets = 12 teachers
    "attention/three_teachers.yaml": (32, 12, "attention"),
    # Sec. 6.3 / Fig. 4: 8 trials x {vanilla, z-score} x 3 data sets; 2 roles x 2 letters x 3 = 12 teachers
    "attention/zscore.yaml": (48, 12, "attention"),
    # App. A.3, Tables A.1-A.3: 8 trials x {vKD, hKD} x 3 data sets; 12 teachers
    "attention/ab_test.yaml": (48, 12, "attention"),
    # augmentation study Tables 3-6: 9 pairs x 9 DA schemes x 3 seeds; 5 teacher architectures
    "augmentation/tstddev_cifar100.yaml": (9 * 9 * 3, 5, "augmentation"),
    "augmentation/tstddev_tinyimagenet.yaml": (9 * 9 * 3, 5, "augmentation"),
    # Tables 1-2: 7 pairs x 5 rows (KD, +CutMix, +CutMixPick, KD_long, +CutMixPick_long) x 3 seeds
    "augmentation/boost_cifar100.yaml": (7 * 5 * 3, 5, "augmentation"),
    "augmentation/boost_tinyimagenet.yaml": (7 * 5 * 3, 5, "augmentation"),
    # fidelity study Fig. 3 / Fig. 12: k in {1, 3, 5} x 8 policies x 3 seeds; a 5-member ensemble
    "fidelity/augmentation_policies.yaml": (3 * 8 * 3, 5, "fidelity"),
    # Fig. 4: k in {1, 3, 5} x {D0, D1, D0 u D1} x tau in {1, 4} x 3 seeds
    "fidelity/data_recycling.yaml": (3 * 3 * 2 * 3, 5, "fidelity"),
    # Fig. 6b: 7 lambdas x 3 seeds, one self-distillation teacher
    "fidelity/init_interpolation.yaml": (7 * 3, 1, "fidelity"),
    # Fig. 6a: SGD 300, SGD and Adam at 1k and 5k epochs = 5 runs x 3 seeds
    "fidelity/optimizer_epochs.yaml": (5 * 3, 1, "fidelity"),
    # response-based study Figs. 5-6: (acc-, acc+, 3 replacements x 5 subsets, 3 manipulations x 5 subsets) x 3
    "response/replacement_manipulation.yaml": ((2 + 3 * 5 + 3 * 5) * 3, 2, "response"),
    # Table 1 "No Distill", advanced and 100-epoch columns
    "response/efficient_distillation.yaml": (2, 0, "response"),
}
EXPERIMENT_CONFIGS = {"response/effdstl_resnet18.yaml"}  # `hpckd distill-efficient` configs, not sweeps


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plans")
    return {name: plan_sweep(REPRO / name, out_dir=out / name.replace("/", "-")) for name in EXPECTED}


def test_every_recipe_file_is_listed():
    """A new recipe must come with its hand-derived trial count here (and docs/reproduce.md)."""
    found = {str(p.relative_to(REPRO)) for p in REPRO.rglob("*.yaml")}
    assert found == set(EXPECTED) | EXPERIMENT_CONFIGS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_plans_with_the_papers_trial_count(plans, name):
    plan = plans[name]
    trials, teachers, study = EXPECTED[name]
    assert (len(plan.trials), len(plan.teachers), plan.sweep.study) == (trials, teachers, study)
    assert plan.sweep.mini is not None, "every recipe has a mini override set (test_recipes_mini.py runs it)"
    for job in plan.trials:  # each trial distils from exactly the teachers the sweep trains for it
        assert len(job.config["teachers"]) == sum(1 for d in job.deps if d.startswith("teachers/"))
    assert "report/report" in plan.jobs


def _trial(plan, name):
    return plan.jobs[f"students/{name}"].config


def _teacher(plan, name):
    return plan.jobs[f"teachers/{name}"].config


# ------------------------------------------------------------------------------------------ attention study

# App. A.1: teacher epochs, student epochs and the lambda scheduler's steps per data set
ATTENTION_SCHEDULES = {
    "attention/cifar100.yaml": (60, [25, 40, 60], 200, [190, 195]),
    "attention/cifar100_imb100.yaml": (60, [25, 40, 60], 175, [160, 165, 170]),
    "attention/imagenet_lt.yaml": (30, [35, 50], 165, [150, 155, 160]),
}


@pytest.mark.parametrize("name", ["attention/cifar100.yaml", "attention/cifar100_imb100.yaml",
                                  "attention/imagenet.yaml", "attention/imagenet_lt.yaml"])
def test_attention_grid_and_hyper_parameters(plans, name):
    plan = plans[name]
    grid = sorted(j.name for j in plan.trials if re.fullmatch(r"T1[ws]T2[ws]S[ws]", j.name))
    assert grid == sorted(f"T1{a}T2{b}S{c}" for a in "ws" for b in "ws" for c in "ws")  # Table 1's 8 trials
    assert {"Sn", "Sw", "Ss", "T1nT2nSn", "TwSs"} <= {j.name for j in plan.trials}  # Tables 2-3
    for job in plan.trials:
        cfg = job.config
        assert cfg["model"]["arch"] == "resnet18"
        if cfg["teachers"]:
            assert (cfg["loss"]["name"], cfg["loss"]["tau"], cfg["loss"]["alpha"]) == ("ensemble_kd", 10.0, 0.2)
        else:
            assert cfg["loss"]["name"] == "ce"  # Table 3's S_n, S_w, S_s: the student trained alone
        assert (cfg["optim"]["lr"], cfg["optim"]["momentum"], cfg["data"]["batch_size"]) == (0.1, 0.9, 128)
    for job in plan.teachers:
        assert job.config["model"]["arch"] == "resnet50"
    t1s, s = _teacher(plan, "T1s"), _trial(plan, "T1sT2wSs")
    assert (t1s["aug"], _teacher(plan, "T2w")["aug"], s["aug"]) == ("strong", "weak", "strong")
    if name in ATTENTION_SCHEDULES:
        t_ep, t_ms, s_ep, s_ms = ATTENTION_SCHEDULES[name]
        assert (t1s["optim"]["epochs"], t1s["optim"]["milestones"], t1s["optim"]["schedule"]) == (t_ep, t_ms, "multistep")
        assert (s["optim"]["epochs"], s["optim"]["milestones"], s["optim"]["schedule"]) == (s_ep, s_ms, "multistep")
    else:  # ImageNet: cosine annealing, eta_min 0; 60 teacher and 60 student epochs
        assert (t1s["optim"]["epochs"], t1s["optim"]["schedule"], t1s["optim"]["min_lr"]) == (60, "cosine", 0.0)
        assert (s["optim"]["epochs"], s["optim"]["schedule"], s["optim"]["min_lr"]) == (60, "cosine", 0.0)
    assert plan.sweep.evaluate == ["val_augmented", "train"]  # Affinity and Acc-Gap


def test_attention_data_sets(plans):
    assert _trial(plans["attention/cifar100_imb100.yaml"], "Sw")["data"]["imbalance"] == 100  # Sec. 5
    lt = _trial(plans["attention/imagenet_lt.yaml"], "Sw")["data"]
    assert lt["train_list"] and lt["val_list"] and lt["family"] == "imagenet"
    assert _trial(plans["attention/cifar100.yaml"], "Sw")["data"]["format"] == "cifar100"


def test_attention_multi_dataset_recipes(plans):
    """Students get their data set's epochs (App. A.1) although the three data sets share one file."""
    epochs = {"cifar100": 200, "cifar100imb100": 175, "imagenetlt": 165}
    for name, arms in (("attention/zscore.yaml", {"kd-vanilla": "ensemble_kd", "kd-zscore": "standardized_kd"}),
                       ("attention/ab_test.yaml", {"ab-vkd": "none", "ab-hkd": "crop"})):
        plan = plans[name]
        for ds, ep in epochs.items():
            for arm, value in arms.items():
                cfg = _trial(plan, f"T1sT2wSs_{ds}_{arm}")
                assert cfg["optim"]["epochs"] == ep
                got = cfg["loss"]["name"] if "kd-" in arm else cfg["batch_ops"]["half_split"]
                assert got == value
        assert _teacher(plan, "T1s_imagenetlt")["optim"]["epochs"] == 30
        assert _teacher(plan, "T1s_cifar100")["optim"]["epochs"] == 60
    three = plans["attention/three_teachers.yaml"]
    assert len(_trial(three, "T1sT2wT3wSs_cifar100")["teachers"]) == 3  # Table 2 "Ours(3T)"
    assert _trial(three, "T1sT2wT3wSs_cifar100imb100")["optim"]["epochs"] == 175


# ------------------------------------------------------------------------------------------ augmentation study

NINE_SCHEMES = {"identity", "flip", "flip_crop", "cutout", "autoaugment", "mixup", "cutmix"}  # + 2 CutMixPicks
TABLE34_PAIRS = {("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "vgg8"), ("resnet56", "resnet20"),
                 ("resnet56", "shufflenetv2_cifar"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2_cifar"),
                 ("resnet32x4", "resnet8x4"), ("resnet32x4", "shufflenetv2_cifar"), ("resnet50_cifar", "vgg8")}
TABLE1_PAIRS = TABLE34_PAIRS - {("wrn_40_2", "vgg8"), ("resnet56", "shufflenetv2_cifar")}


def _pairs(plan) -> set:
    return {(plan.jobs[next(d for d in j.deps if d.startswith("teachers/"))].config["model"]["arch"],
             j.config["model"]["arch"]) for j in plan.trials}


@pytest.mark.parametrize("ds", ["cifar100", "tinyimagenet"])
def test_augmentation_hyper_parameters(plans, ds):
    tst, boost = plans[f"augmentation/tstddev_{ds}.yaml"], plans[f"augmentation/boost_{ds}.yaml"]
    assert _pairs(tst) == TABLE34_PAIRS and _pairs(boost) == TABLE1_PAIRS
    schemes = {(j.config["batch_ops"]["scheme"], j.config["batch_ops"]["pick_criterion"]) for j in tst.trials}
    assert {s for s, _ in schemes} == NINE_SCHEMES | {"cutmix_pick"}
    assert {c for s, c in schemes if s == "cutmix_pick"} == {"student_entropy", "teacher_entropy"}  # S./T. ent.
    assert len(schemes) == 9
    long, milestones = (960, [600, 720, 840]) if ds == "cifar100" else (480, [300, 360, 420])  # Sec. 5, Tables 1-2
    for plan in (tst, boost):
        for job in plan.trials:
            cfg = job.config
            assert (cfg["loss"]["tau"], cfg["loss"]["alpha"]) == (4.0, 0.1)  # tau 4; alpha_paper 0.9 on the KD term
            assert (cfg["data"]["batch_size"], cfg["optim"]["lr"], cfg["optim"]["gamma"]) == (64, 0.05, 0.1)
            assert (cfg["optim"]["epochs"], cfg["optim"]["milestones"]) in ((240, [150, 180, 210]), (long, milestones))
            assert cfg["data"]["image_size"] == (32 if ds == "cifar100" else 64)
            assert cfg["seed"] in (0, 1, 2)
    rows = {(j.config["loss"]["name"], j.config["batch_ops"]["scheme"], j.config["optim"]["epochs"]) for j in boost.trials}
    assert rows == {("kd", "none", 240), ("kd_da", "cutmix", 240), ("kd_da", "cutmix_pick", 240),
                    ("kd", "none", long), ("kd_da", "cutmix_pick", long)}


# ------------------------------------------------------------------------------------------ fidelity study


@pytest.mark.parametrize("name", ["fidelity/augmentation_policies.yaml", "fidelity/data_recycling.yaml",
                                  "fidelity/init_interpolation.yaml", "fidelity/optimizer_epochs.yaml"])
def test_fidelity_hyper_parameters(plans, name):
    plan = plans[name]
    for job in plan.teachers:  # App. A.3 (teachers)
        o = job.config["optim"]
        assert (o["epochs"], job.config["data"]["batch_size"], o["lr"], o["schedule"], o["min_lr"]) == (200, 256, 0.1, "cosine", 0.0)
        assert (o["momentum"], o["weight_decay"], job.config["aug"]) == (0.9, 1e-4, "flip_crop")
    for job in plan.trials:  # App. A.3 (students)
        o, loss = job.config["optim"], job.config["loss"]
        assert (job.config["data"]["batch_size"], o["nesterov"], o["momentum"]) == (128, True, 0.9)
        assert (loss["name"], loss["alpha"], loss["ensemble"]) == ("pure_kd", 0.0, "mean_probs")
        if not job.name.startswith(("sgd1k", "sgd5k", "adam")):
            assert (o["epochs"], o["lr"], o["min_lr"], o["weight_decay"]) == (300, 0.05, 1e-4, 1e-4)
    arch = {"fidelity/augmentation_policies.yaml": "preresnet56", "fidelity/data_recycling.yaml": "preresnet56"}
    want = arch.get(name, "preresnet20_ln")  # Sec. 6.1: ResNet-20 with LayerNorm for the optimisation study
    assert {j.config["model"]["arch"] for j in [*plan.trials, *plan.teachers]} == {want}


def test_fidelity_grids(plans):
    pol = plans["fidelity/augmentation_policies.yaml"]
    assert {len(j.config["teachers"]) for j in pol.trials} == {1, 3, 5}  # Fig. 12: k = 1, 3, 5
    assert {(_trial(pol, f"k5_pol-baseline-t{t}_seed0")["loss"]["tau"]) for t in (1, 4)} == {1.0, 4.0}
    assert {j.config["aug"] for j in pol.trials} >= {"fidelity_rotate", "fidelity_vflip", "fidelity_jitter", "fidelity_combined"}
    rec = plans["fidelity/data_recycling.yaml"]
    assert {j.config["data"]["subset"]["split"] for j in rec.teachers} == {"d0"}  # Sec. 5.2: teachers see D0
    assert {j.config["data"]["subset"]["split"] for j in rec.trials} == {"d0", "d1", "all"}
    init = plans["fidelity/init_interpolation.yaml"]
    lambdas = sorted({j.config["model"]["init_lambda"] for j in init.trials})
    assert 0.0 in lambdas and 0.25 in lambdas and 0.375 in lambdas and 1.0 in lambdas  # Sec. 6.2's values
    teacher = init.teachers[0].folder / "last.pt"
    assert {j.config["model"]["init_from_teacher"] for j in init.trials} == {str(teacher)}
    opt = plans["fidelity/optimizer_epochs.yaml"]
    runs = {(j.config["optim"]["name"], j.config["optim"]["epochs"], j.config["optim"]["weight_decay"]) for j in opt.trials}
    assert runs == {("sgd", 300, 1e-4), ("sgd", 1000, 0.0), ("sgd", 5000, 0.0), ("adamw", 1000, 0.0), ("adamw", 5000, 0.0)}


# ------------------------------------------------------------------------------------------ response-based study


def test_response_replacement_manipulation(plans):
    plan = plans["response/replacement_manipulation.yaml"]
    changed = [j for j in plan.trials if j.name.startswith(("rep-", "man-"))]
    kinds = {(j.config["loss"]["targets"]["replace"], j.config["loss"]["targets"]["manipulate"],
              j.config["loss"]["targets"]["subset"]) for j in changed}
    subsets = {"all", "correct", "reg", "reg_correct", "not_correct"}  # Fig. 4's sample groups
    assert kinds == ({(r, "none", s) for r in ("full", "partial", "confidence") for s in subsets}
                     | {("none", m, s) for m in ("label_smoothing", "teacher_amplification", "student_amplification")
                        for s in subsets})
    for job in plan.trials:  # Sec. 3: MEAL V2's lambda = 1 (no CE), tau = 1
        loss = job.config["loss"]
        assert (loss["name"], loss["ce_weight"], loss["kd_weight"], loss["tau"]) == ("soft_target_kd", 0.0, 1.0, 1.0)
        replace = loss["targets"]["replace"] != "none"
        assert len(job.config["teachers"]) == (2 if replace else 1)
    assert _trial(plan, "rep-full-regcor_seed0")["loss"]["targets"]["smoothing"] == 0.99


def test_efficient_distillation_stages_follow_sec_5_2():
    """The experiment config for `hpckd distill-efficient` gives the paper's two stages (Sec. 5.2, Table 1)."""
    stage1, stage2 = stage_configs(str(REPRO / "response/effdstl_resnet18.yaml"), [], "/strong/resnet34d.pt", 300)
    for cfg in (stage1, stage2):
        assert (cfg.model.arch, cfg.aug, cfg.data.image_size, cfg.data.batch_size) == ("resnet18", "rrc_flip", 224, 1024)
        assert cfg.optim.schedule == "cosine" and cfg.optim.lr_reference_batch == 1024
    assert (stage1.optim.epochs, stage1.optim.lr, stage1.optim.weight_decay) == (240, 0.5, 4e-5)
    assert (stage1.loss.name, stage1.loss.tau) == ("wsl", 2.0)
    assert (stage2.optim.epochs, stage2.optim.lr, stage2.optim.weight_decay) == (60, 0.05, 0.0)
    assert math.isclose(stage2.optim.min_lr, 5e-4)
    assert (stage2.loss.name, stage2.loss.teacher_tau, stage2.loss.tau) == ("ckm", 0.7, 1.0)
    assert stage2.teachers[0].checkpoint == "/strong/resnet34d.pt"
    assert stage2.model.weights.endswith("stage1/last.pt")


def test_efficient_distillation_baselines(plans):
    plan = plans["response/efficient_distillation.yaml"]
    adv, short = _trial(plan, "nodistill-advanced"), _trial(plan, "nodistill-100ep")
    assert (adv["optim"]["epochs"], adv["optim"]["schedule"]) == (300, "cosine")  # Table 1 "Advanced"
    assert short["optim"]["epochs"] == 100  # Table 1 "(100-epochs)"
    assert adv["teachers"] == [] and adv["model"]["arch"] == "resnet18"


# ------------------------------------------------------------------------------------------ the mini sets


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mini_plan_is_tiny(tmp_path, name):
    """`--mini` keeps 1-3 trials, 1-epoch runs of small models on one generated data set of 4 classes."""
    plan = plan_sweep(REPRO / name, mini=True, out_dir=tmp_path)
    assert 1 <= len(plan.trials) <= 3
    assert len(plan.stage("data")) == 1 and plan.stage("data")[0].extra["synth"]["classes"] == 4
    for job in [*plan.trials, *plan.teachers]:
        assert job.config["optim"]["epochs"] == 1
        assert job.config["model"]["arch"] in ("resnet8", "preresnet20", "preresnet20_ln")
        assert job.config["data"]["image_size"] == 32 and job.config["data"]["root"].startswith(str(tmp_path))


# ------------------------------------------------------------------------------------------ docs/reproduce.md

DOCS = ROOT / "docs" / "reproduce.md"


def test_docs_name_every_recipe():
    text = DOCS.read_text()
    for name in [*EXPECTED, *EXPERIMENT_CONFIGS]:
        assert f"`{name}`" in text, name
    for name, (trials, teachers, _) in EXPECTED.items():  # the overview table's counts
        assert f"| `{name}` |" in text and f"| {trials} | {teachers} |" in text.split(f"| `{name}` |")[1].split("\n")[0]


@pytest.mark.slow  # counting every recipe's MACs takes about 40 s on 2 cores
def test_docs_quote_the_plan_estimates(plans):
    """docs/reproduce.md quotes each recipe's `sweep plan` estimate line verbatim; a changed recipe must update it."""
    from hpckd.sweep.runner import format_plan

    text = DOCS.read_text()
    for name, plan in plans.items():
        line = next(x for x in format_plan(plan).splitlines() if x.startswith("estimate"))
        assert f"    $ hpckd sweep plan configs/repro/{name}\n    {line}\n" in text, name
        assert f"| {line.split()[1]} |" in text.split(f"| `{name}` |")[1].split("\n")[0], name  # the table column
