"""Every recipe's `mini:` version runs end to end (data, teachers, students, evaluation, report) with the debug
executor, so a recipe cannot rot: the same grid, trial names, losses, batch ops and evaluations as the full study,
on 4 generated classes, small models and 1 epoch.

Real runs, no mocks: the data stage writes the JPEGs, every teacher and student trains, and the report stage
writes report.html from the results files. Each test checks what it can tell independently of the sweep code:
every kept trial's results.json exists, names the trial, trained the mini epochs on the mini data, carries the
evaluations the recipe asks for, and distilled from exactly the teachers the recipe names for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hpckd.sweep.runner import run_sweep
from hpckd.sweep.spec import plan_sweep

REPRO = Path(__file__).resolve().parents[1] / "configs" / "repro"
RECIPES = sorted(str(p.relative_to(REPRO)) for p in REPRO.rglob("*.yaml") if p.name != "effdstl_resnet18.yaml")
HAS_REPORT = importlib.util.find_spec("hpckd.report.api") is not None

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", RECIPES)
def test_mini_recipe_runs_end_to_end(tmp_path, name, one_torch_thread):
    plan = plan_sweep(REPRO / name, mini=True, out_dir=tmp_path / "sweep")
    rows = run_sweep(plan, "debug", echo=lambda line: None)
    failed = [(r.stage, r.name, r.detail) for r in rows if r.state != "done"]
    assert not failed, failed
    data = plan.stage("data")[0].config["data"]["root"]
    assert len(list(Path(data, "train").iterdir())) == 4  # the generated 4-class set, not the study's data
    for job in plan.trials:
        results = json.loads((job.folder / "results.json").read_text())
        assert results["name"] == job.name
        assert results["config"]["optim"]["epochs"] == 1 and results["config"]["data"]["root"] == data
        assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
        teachers = [t["checkpoint"] for t in results["config"]["teachers"]]
        assert teachers == [str(plan.jobs[d].folder / "last.pt") for d in job.deps if d.startswith("teachers/")]
        assert all(Path(t).is_file() for t in teachers)
        if teachers:
            assert 0.0 <= results["metrics"]["top1_agreement"] <= 1.0
        for evaluation in plan.sweep.evaluate:  # val_augmented -> Affinity; train -> train metrics / Acc-Gap
            assert evaluation in results["eval"], (evaluation, sorted(results["eval"]))
    if HAS_REPORT:
        html = (plan.root / "report" / "report.html").read_text()
        for job in plan.trials:
            assert job.name in html


def test_efficient_distillation_config_runs_both_stages(tmp_path, synth_root, one_torch_thread):
    """configs/repro/response/effdstl_resnet18.yaml through `hpckd distill-efficient`'s code path: two tiny teachers
    trained here, then the WSL stage from the first and the CKM stage from the second, continuing the student."""
    from hpckd.sweep.stages import run_efficient_distillation
    from hpckd.train.engine import run
    from hpckd.train.experiment import load_experiment

    tiny = [f"data.root={synth_root}", "data.image_size=32", "data.batch_size=16", "data.eval_batch_size=32",
            "data.num_workers=1", "model.arch=resnet8", "dist.nproc_per_node=1", "metrics.topk=[1,2]"]
    teachers = []
    for seed in (1, 2):
        out = tmp_path / f"teacher{seed}"
        run(load_experiment(None, [*tiny, "optim.epochs=1", f"seed={seed}", f"out_dir={out}"]), mode="train")
        teachers.append(out / "last.pt")
    config = str(REPRO / "response" / "effdstl_resnet18.yaml")
    results = run_efficient_distillation(config, [*tiny, f"out_dir={tmp_path / 'effdstl'}",
                                                  f"teachers=[{{checkpoint: {teachers[0]}}}]"], str(teachers[1]), 2)
    assert [r["config"]["loss"]["name"] for r in results] == ["wsl", "ckm"]  # Sec. 5.2's two stages
    assert [r["config"]["teachers"][0]["checkpoint"] for r in results] == [str(teachers[0]), str(teachers[1])]
    assert results[1]["config"]["model"]["weights"] == str(tmp_path / "effdstl" / "stage1" / "last.pt")
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in results)
