"""Sweep configs without a cluster: every shipped sweep plans; the grid's trial names and its shared teachers are
exactly the ones computed by hand; axes, seeds and data sets multiply as written; bad configs are one line and
write or submit nothing."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import yaml

from hpckd.errors import ConfigError
from hpckd.sweep.runner import expand_array_id, format_plan, stage_groups
from hpckd.sweep.spec import plan_sweep
from tests.helpers import REPO, assert_one_line_error, run_hpckd

SHIPPED = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def grid_sweep(tmp_path: Path, **extra) -> dict:
    return {"name": "g", "out_dir": str(tmp_path / "sweep"),
            "base": {"data": {"root": str(tmp_path / "data")}, "model": {"arch": "resnet8"}},
            "teachers": {"T1": {"overrides": ["seed=1", "model.arch=resnet20"]},
                         "T2": {"overrides": ["seed=2", "model.arch=resnet20"]}},
            "grid": {"roles": ["T1", "T2"], "baselines": ["w", "s"]}, **extra}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_sweep_plans(path, tmp_path):
    proc = run_hpckd("sweep", "plan", str(path), f"out_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"sweep {path.stem}: ") and "estimate: " in proc.stdout
    assert not (tmp_path / "out").exists()  # plan writes and submits nothing


def test_shipped_sweeps_have_the_studies_shapes():
    counts = {p.stem: plan_sweep(p) for p in SHIPPED}
    shapes = {name: (len(plan.trials), len(plan.teachers)) for name, plan in counts.items()}
    # attention: (27 grid + 2 baselines) x 2 data sets x 3 seeds; teachers 2 roles x 3 policies x 2 x 3
    # augmentation: 9 schemes x 2 epoch budgets, one teacher; fidelity: 3 ensembles x 2 x 2 x 2 x 2, 5 teachers
    # demo: the 8 trials of a 2-teacher grid over {w, s} + Sw, Ss; teachers T1w, T1s, T2w, T2s
    assert shapes == {"attention": (174, 36), "augmentation": (18, 1), "demo": (10, 4), "fidelity": (48, 5)}


def test_the_grid_names_every_assignment_and_shares_teachers(tmp_path):
    plan = plan_sweep(None, inline=grid_sweep(tmp_path))
    letters = "nws"
    expected = [f"T1{a}T2{b}S{c}" for a, b, c in itertools.product(letters, letters, letters)] + ["Sw", "Ss"]
    assert [j.name for j in plan.trials] == expected
    assert [j.name for j in plan.teachers] == ["T1n", "T2n", "T2w", "T2s", "T1w", "T1s"]  # first use order
    policies = {"n": "none", "w": "weak", "s": "strong"}
    for t in plan.teachers:
        assert (t.config["aug"], t.config["seed"], t.config["model"]["arch"]) == (policies[t.name[2]],
                                                                                  int(t.name[1]), "resnet20")
        assert t.config["out_dir"] == str(tmp_path / "sweep" / "teachers" / t.name)
    trial = plan.jobs["students/T1sT2wSn"]
    assert trial.deps == ("data/default", "teachers/T1s", "teachers/T2w") and trial.mode == "distill"
    assert trial.config["aug"] == "none"
    assert [t["checkpoint"] for t in trial.config["teachers"]] == [
        str(tmp_path / "sweep" / "teachers" / name / "last.pt") for name in ("T1s", "T2w")]
    baseline = plan.jobs["students/Sw"]
    assert baseline.mode == "train" and baseline.config["teachers"] == [] and baseline.deps == ("data/default",)
    # each array of students waits for exactly its two teachers: 9 teacher pairs, one array each, plus baselines
    groups = stage_groups(plan, "students")
    assert len(groups) == 10 and sorted(len(m) for _, m in groups) == [2] + [3] * 9


def test_identical_teachers_are_trained_once(tmp_path):
    # T1 and T2 with the same config: T1w and T2w are one teacher (arch, aug, seed and data all equal)
    sweep = grid_sweep(tmp_path, teachers={"T1": {"overrides": ["seed=1"]}, "T2": {"overrides": ["seed=1"]}})
    sweep["grid"] = {"roles": ["T1", "T2"], "letters": {"w": "weak", "s": "strong"}}
    plan = plan_sweep(None, inline=sweep)
    # named after the first trial that uses it: T1wT2wSw (T1w), T1wT2sSw (T2s)
    assert [j.name for j in plan.teachers] == ["T1w", "T2s"]
    assert plan.jobs["students/T1sT2wSw"].deps == ("data/default", "teachers/T2s", "teachers/T1w")
    assert len(plan.trials) == 8


def test_data_sets_seeds_and_axes_multiply_and_name_trials(tmp_path):
    sweep = grid_sweep(tmp_path, seeds=[0, 1], axes=[{"name": "tau", "key": "loss.tau", "values": [1, 4]}],
                       datasets={"a": {"overrides": [f"data.root={tmp_path}/a"]},
                                 "b": {"overrides": [f"data.root={tmp_path}/b"]}},
                       teachers={"T1": {"overrides": ["model.arch=resnet20"], "seed_offset": 10}})
    sweep["grid"] = {"roles": ["T1"], "letters": {"w": "weak"}}
    plan = plan_sweep(None, inline=sweep)
    assert [j.name for j in plan.trials] == [f"T1wSw_{d}_seed{s}_tau{t}" for d in "ab" for s in (0, 1) for t in (1, 4)]
    # tau changes students only: one teacher per (data set, seed), seeded seed + 10
    assert [(j.name, j.config["seed"], j.config["data"]["root"]) for j in plan.teachers] == [
        (f"T1w_{d}_seed{s}", s + 10, f"{tmp_path}/{d}") for d in "ab" for s in (0, 1)]
    trial = plan.jobs["students/T1wSw_b_seed1_tau4"]
    assert (trial.config["loss"]["tau"], trial.config["seed"], trial.deps) == (4.0, 1, ("data/b", "teachers/T1w_b_seed1"))
    assert [j.name for j in plan.stage("data")] == ["a", "b"]


def test_named_axes_explicit_trials_and_per_trial_overrides(tmp_path):
    sweep = {"name": "aug", "out_dir": str(tmp_path / "s"), "base": {"data": {"root": str(tmp_path)}},
             "teachers": {"big": {"overrides": ["model.arch=resnet20"]}},
             "trials": [{"name": "kd", "teachers": ["big"], "overrides": ["loss.name=kd_da"]}],
             "axes": [{"name": "da-", "named": {"mix": ["batch_ops.scheme=mixup"], "cut": ["batch_ops.scheme=cutmix"]}},
                      {"name": "ep", "key": "optim.epochs", "values": [2, 8]}],
             "trial_overrides": {"*_ep8": ["optim.lr=0.5"]}}
    plan = plan_sweep(None, inline=sweep)
    got = [(j.name, j.config["batch_ops"]["scheme"], j.config["optim"]["epochs"], j.config["optim"]["lr"])
           for j in plan.trials]
    assert got == [("kd_da-mix_ep2", "mixup", 2, 0.1), ("kd_da-mix_ep8", "mixup", 8, 0.5),
                   ("kd_da-cut_ep2", "cutmix", 2, 0.1), ("kd_da-cut_ep8", "cutmix", 8, 0.5)]
    assert [j.name for j in plan.teachers] == ["big"]


def test_a_bad_axis_value_names_the_trial(tmp_path):
    sweep = grid_sweep(tmp_path, axes=[{"name": "loader", "key": "data.loader", "values": ["torch", "pytorch"]}])
    with pytest.raises(ConfigError) as info:
        plan_sweep(None, inline=sweep)
    message = str(info.value)  # the first trial's first value is valid; its second is not
    assert message.startswith("sweep g: trial T1nT2nSn_loaderpytorch: ") and "'pytorch'" in message
    assert "\n" not in message


def test_array_ids_as_sacct_shows_pending_tasks():
    assert expand_array_id("12_[0-3%2]") == ["12_0", "12_1", "12_2", "12_3"]
    assert expand_array_id("7_[1,4-5]") == ["7_1", "7_4", "7_5"]
    assert expand_array_id("9_2") == ["9_2"] and expand_array_id("15") == ["15"]


def test_max_array_size_splits_a_stage(tmp_path):
    sweep = grid_sweep(tmp_path, stages={"students": {"max_array_size": 2}})
    sweep["grid"] = {"roles": ["T1"], "letters": {"w": "weak", "s": "strong"}, "teacher_letters": {"T1": ["w"]}}
    sweep["axes"] = [{"name": "tau", "key": "loss.tau", "values": [1, 2, 3]}]
    plan = plan_sweep(None, inline=sweep)
    assert [len(m) for _, m in stage_groups(plan, "students")] == [2, 2, 2]  # 6 trials, one teacher, arrays of 2
    assert "students        6      3" in format_plan(plan)


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("change, fragments", [
    ({"gird": {}}, ["gird"]),  # a typo'd top-level key
    ({"grid": {"roles": ["T1", "T9"]}}, ["grid.roles", "'T9'"]),
    ({"axes": [{"name": "tau", "key": "loss.tau", "values": ["hot"]}]}, ["trial T1nT2nSn_tauhot", "loss.tau"]),
    ({"trial_overrides": {"nothing*": ["seed=1"]}}, ["'nothing*' matches no trial"]),
])
def test_bad_sweep_configs_are_one_line_and_submit_nothing(tmp_path, change, fragments):
    path = write(tmp_path, {**grid_sweep(tmp_path), **change})
    for command in (["plan", str(path)], ["run", str(path), "--executor", "local"]):
        proc = run_hpckd("sweep", *command)
        assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "sweep").exists()


def test_slurm_without_sbatch_is_one_line_and_writes_nothing(tmp_path):
    path = write(tmp_path, grid_sweep(tmp_path))
    proc = run_hpckd("sweep", "run", str(path), "--executor", "slurm",
                     env={"PATH": str(Path(sys.executable).parent)})  # a PATH without the SLURM tools
    assert_one_line_error(proc, "executor 'slurm' needs the SLURM client tools")
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_folder_of_another_sweep_is_refused(tmp_path):
    first = write(tmp_path, grid_sweep(tmp_path))
    from hpckd.sweep.runner import prepare

    prepare(plan_sweep(first))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**grid_sweep(tmp_path), "name": "other"}))
    proc = run_hpckd("sweep", "run", str(other), "--executor", "local")
    assert_one_line_error(proc, f"{tmp_path / 'sweep'} holds sweep 'g', made by another config")


def test_status_of_a_folder_that_is_no_sweep_is_one_line(tmp_path):
    assert_one_line_error(run_hpckd("sweep", "status", str(tmp_path)), "is not a sweep folder")
    assert os.listdir(tmp_path) == []
