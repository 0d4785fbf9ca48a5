"""Sweep features without training: the `mini` override set (`--mini`), the `study` tag in sweep.json, the report
stage in the plan, and a sweep folder recognised by its content (spec hash) rather than its name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hpckd.sweep.spec import plan_sweep
from tests.helpers import assert_one_line_error, run_hpckd


def grid_sweep(tmp_path: Path, **extra) -> dict:
    return {"name": "g", "out_dir": str(tmp_path / "sweep"),
            "base": {"data": {"root": str(tmp_path / "data")}, "model": {"arch": "resnet20"}},
            "teachers": {"T1": {"overrides": ["seed=1"]}, "T2": {"overrides": ["seed=2"]}},
            "student_overrides": ["model.arch=resnet8"],
            "grid": {"roles": ["T1", "T2"], "letters": {"w": "weak", "s": "strong"}, "baselines": ["w", "s"]},
            "evaluate": ["val_augmented"], **extra}


MINI = {"overrides": ["optim.epochs=1", "model.arch=resnet8", "data.batch_size=8"],
        "datasets": {"tiny": {"overrides": ["data.root={sweep}/tinydata"],
                              "synth": {"classes": 3, "per_class": 4, "val_per_class": 2, "size": "16x16"}}},
        "trials": ["T1wT2?Sw", "Ss"], "evaluate": [],
        "stages": {"students": {"cpus_per_task": 2, "time_min": 5}}}


def write(tmp_path: Path, config: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_mini_keeps_the_matching_trials_and_only_their_teachers(tmp_path):
    path = write(tmp_path, grid_sweep(tmp_path, mini=MINI))
    full = plan_sweep(path)
    assert len(full.trials) == 10 and len(full.teachers) == 4  # 8 grid trials + Sw, Ss; T1w T1s T2w T2s
    mini = plan_sweep(path, mini=True)
    # T1wT2?Sw -> T1wT2wSw, T1wT2sSw; Ss (a baseline: no teachers); T1s is used by no kept trial
    assert sorted(j.name for j in mini.trials) == ["Ss", "T1wT2sSw", "T1wT2wSw"]
    assert sorted(j.name for j in mini.teachers) == ["T1w", "T2s", "T2w"]
    assert mini.root == (tmp_path / "sweep-mini").resolve()  # <out_dir>-mini
    assert mini.stage("evaluation") == []  # mini.evaluate [] replaces [val_augmented]
    (data,) = mini.stage("data")  # the mini data set replaces the sweep's
    assert data.name == "tiny" and data.extra["synth"]["classes"] == 3
    assert mini.sweep.stages.students.cpus_per_task == 2 and mini.sweep.stages.students.time_min == 5
    assert mini.sweep.stages.teachers.time_min == full.sweep.stages.teachers.time_min  # others kept
    for job in [*mini.teachers, *mini.trials]:
        c = job.config
        assert (c["optim"]["epochs"], c["model"]["arch"], c["data"]["batch_size"]) == (1, "resnet8", 8)
        assert c["data"]["root"] == str(mini.root / "tinydata") and job.deps[0] == "data/tiny"
    # the report waits for every kept trial
    assert mini.jobs["report/report"].deps == tuple(f"students/{j.name}" for j in mini.trials)


def test_mini_run_writes_the_mini_configs_and_study(tmp_path):
    config = grid_sweep(tmp_path, mini=MINI, study="attention")
    path = write(tmp_path, config)
    out = tmp_path / "given"
    proc = run_hpckd("sweep", "plan", str(path), "--mini", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"sweep g: 3 trial(s), 3 distinct teacher(s), 1 data set(s) -> {out}")
    from hpckd.sweep.runner import prepare

    plan = plan_sweep(path, out_dir=out, mini=True)
    prepare(plan)  # what `sweep run` writes before it runs anything
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["study"] == "attention" and manifest["mini"] is True
    assert sorted(e["name"] for e in manifest["jobs"] if e["stage"] == "students") == ["Ss", "T1wT2sSw", "T1wT2wSw"]
    for folder in [*(out / "teachers").iterdir(), *(out / "trials").iterdir()]:
        written = yaml.safe_load((folder / "config.yaml").read_text())
        assert (written["optim"]["epochs"], written["model"]["arch"], written["data"]["batch_size"]) == (1, "resnet8", 8)
        assert written["data"]["root"] == str(out / "tinydata")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "sweep-mini").exists()


def test_study_is_in_sweep_json_and_checked(tmp_path):
    from hpckd.sweep.runner import prepare

    prepare(plan_sweep(None, inline=grid_sweep(tmp_path)))
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["study"] is None
    bad = write(tmp_path, grid_sweep(tmp_path, study="attentoin"))
    assert_one_line_error(run_hpckd("sweep", "plan", str(bad)), "study: unknown study 'attentoin'", "attention")


def test_mini_without_a_mini_set_is_one_line(tmp_path):
    path = write(tmp_path, grid_sweep(tmp_path))
    for command in ("plan", "run"):
        proc = run_hpckd("sweep", command, str(path), "--mini", *(["--executor", "local"] if command == "run" else []))
        assert_one_line_error(proc, "has no `mini:` override set", "--mini")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "sweep-mini").exists()


def test_a_mini_pattern_that_matches_nothing_is_one_line(tmp_path):
    path = write(tmp_path, grid_sweep(tmp_path, mini={"trials": ["T9*"]}))
    assert_one_line_error(run_hpckd("sweep", "plan", str(path), "--mini"), "mini.trials: 'T9*' matches no trial")


def test_a_folder_is_recognised_by_content_not_name(tmp_path):
    from hpckd.errors import ConfigError
    from hpckd.sweep.runner import prepare

    first = write(tmp_path, grid_sweep(tmp_path))
    prepare(plan_sweep(first))
    prepare(plan_sweep(first))  # the same config again: its own folder
    # a changed resource or study tag is the same sweep (how it runs, not what it trains)
    same = write(tmp_path, grid_sweep(tmp_path, study="attention", stages={"students": {"time_min": 9}}), "same.yaml")
    prepare(plan_sweep(same))
    # same name, different grid: refused by content, nothing written
    other = grid_sweep(tmp_path)
    other["grid"] = {"roles": ["T1"], "letters": {"w": "weak"}}
    path = write(tmp_path, other, "other.yaml")
    before = (tmp_path / "sweep" / "sweep.json").read_text()
    proc = run_hpckd("sweep", "run", str(path), "--executor", "local")
    assert_one_line_error(proc, f"{tmp_path / 'sweep'} holds sweep 'g', made by another config")
    assert (tmp_path / "sweep" / "sweep.json").read_text() == before
    assert not (tmp_path / "sweep" / "trials" / "T1wSw").exists()
    try:
        prepare(plan_sweep(path))
    except ConfigError as exc:
        assert "its own out_dir" in str(exc)
    else:
        raise AssertionError("a folder of another sweep was taken over")


@pytest.mark.slow  # submitit's local executor: each job in its own process
def test_the_report_stage_runs_after_a_failed_trial(tmp_path):
    """The report stage (after the students and evaluation) runs even though a trial failed, on the local executor,
    and its report (hpckd.report.write_report) names the failed trial; a re-run tries that trial again and then
    writes the report again."""
    from hpckd.sweep.jobs import read_state
    from hpckd.sweep.runner import run_sweep, sweep_status

    config = {"name": "rep", "out_dir": str(tmp_path / "sweep"), "study": "attention", "local_parallel": 2,
              "base": {"data": {"batch_size": 16, "eval_batch_size": 8, "loader": "torch", "num_workers": 0},
                       "model": {"arch": "resnet8"}, "optim": {"epochs": 1, "lr": 0.05}},
              "datasets": {"tiny": {"overrides": ["data.root={sweep}/data"],
                                    "synth": {"classes": 4, "per_class": 8, "val_per_class": 2, "size": "32x32"}}},
              "trials": [{"name": "ok"}, {"name": "broken", "overrides": [f"data.root={tmp_path}/no-such-data"]}],
              "evaluate": ["val_augmented"]}
    plan = plan_sweep(None, inline=config)
    assert plan.jobs["report/report"].deps == ("students/ok", "students/broken", "evaluation/ok", "evaluation/broken")
    lines: list[str] = []
    run_sweep(plan, "local", echo=lines.append)
    states = {f"{r.stage}/{r.name}": r.state for r in sweep_status(plan.root)}
    assert states == {"data/tiny": "done", "students/ok": "done", "students/broken": "failed",
                      "evaluation/ok": "done", "evaluation/broken": "blocked", "report/report": "done"}, lines
    html = plan.root / "report" / "report.html"
    assert read_state(plan.root, "report", "done")["config_hash"] == plan.jobs["report/report"].config_hash
    text = html.read_text()
    assert "broken" in text and "failed" in text and "ok" in text
    written = html.stat().st_mtime_ns
    lines.clear()
    run_sweep(plan_sweep(None, inline=config), "local", echo=lines.append)  # the failed trial runs again, then the report
    assert any(line.startswith("report: running report") for line in lines), lines
    assert html.stat().st_mtime_ns != written
