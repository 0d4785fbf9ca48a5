"""`hpckd report`: a sweep folder's results files -> report.md, tables/*.csv, figures/*.png, report.html.

The fixtures (written into a temp folder by tests/fixtures/report/make_fixtures.py) are small sweep folders with chosen numbers:
several seeds per trial, a failed seed, a seed that never ran, a trial blocked by a failed teacher. Every expected
number here is computed from the raw fixture files (numpy / scipy called in the test), never read from hpckd.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

import hpckd.report.render as render
from hpckd.errors import UserError
from hpckd.report import ReportError, summary_table, write_report
from tests.fixtures.report.make_fixtures import write_all
from tests.helpers import assert_one_line_error, run_hpckd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGURES = {
    "attention": {"attention_fig2_iou_vs_accuracy", "attention_fig3_fidelity_mi_vs_accuracy",
                  "attention_fig4_vanilla_vs_zscore", "attention_fig5_vs_accuracy_and_affinity", "reliability_diagrams"},
    "augmentation": {"augmentation_fig4_tstddev_vs_test_loss", "augmentation_fig2_error_vs_epochs",
                     "history_test_error_vs_epoch"},
    "mixed": {"fidelity_fig3_policies", "fidelity_fig5_train_vs_test_agreement", "fidelity_agreement_vs_ensemble_size",
              "response_fig5_replace", "response_fig6_manipulate"},
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """The fixture sweeps, written once by tests/fixtures/report/make_fixtures.py."""
    return write_all(tmp_path_factory.mktemp("report-fixtures"))


@pytest.fixture(scope="module")
def reports(tmp_path_factory, fixtures) -> dict[str, Path]:
    """Each fixture sweep copied to a temp folder and reported once (the default out_dir, <sweep>/report)."""
    out = {}
    for name in EXPECTED_FIGURES:
        root = tmp_path_factory.mktemp("report") / name
        shutil.copytree(fixtures / name, root)
        write_report(root)
        out[name] = root
    return out


# ------------------------------------------------------------------------------------- raw fixture values


def students(root: Path) -> list[dict]:
    return [j for j in json.loads((root / "sweep.json").read_text())["jobs"] if j["stage"] == "students"]


def finished(root: Path, group: str) -> list[dict]:
    """results.json of every seed of ``group`` whose students job has a done record (what a finished run has)."""
    out = []
    for job in students(root):
        if re.sub(r"_seed\d+$", "", job["name"]) != group:
            continue
        folder = root / job["folder"]
        if (folder / "sweep-students.done.json").is_file():
            out.append(json.loads((folder / "results.json").read_text()))
    return out


def mean_std_n(values: list[float]) -> tuple[float, float, int]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size)


def csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / "report" / "tables" / f"{name}.csv")


# ------------------------------------------------------------------------------------------------ numbers


def test_attention_table_is_mean_and_sample_std_over_finished_seeds(reports):
    root = reports["attention"]
    table = csv(root, "attention_trials").set_index("group")
    for group in ("T1wT2sSw", "T1wT2sSs", "T1wT2sSn", "T1wT2sSw-zscore", "T1wT2sSw-hkd"):
        runs = finished(root, group)
        raw = {"accuracy": [r["metrics"]["accuracy"] for r in runs],
               "top1_agreement": [r["metrics"]["top1_agreement"] for r in runs],
               "teacher_iou": [r["metrics"]["teacher_iou"] for r in runs],
               "mutual_information": [r["metrics"]["mutual_information"] for r in runs],
               # the exact post-hoc passes (eval) win over the running values in metrics
               "acc_gap": [r["eval"]["acc_gap"] for r in runs],
               "affinity": [r["eval"]["val_affinity"] for r in runs]}
        for metric, values in raw.items():
            mean, std, n = mean_std_n(values)
            assert table.loc[group, f"{metric}_mean"] == pytest.approx(mean, abs=1e-12), (group, metric)
            assert table.loc[group, f"{metric}_n"] == n
            if n > 1:
                assert table.loc[group, f"{metric}_std"] == pytest.approx(std, abs=1e-12), (group, metric)
    # the failed third seed and the seed that never ran are not in the means, but the group says so
    assert table.loc["T1wT2sSs", "accuracy_n"] == 2 and table.loc["T1wT2sSs", "runs"] == 3
    assert table.loc["T1wT2sSs", "states"] == "2 done, 1 failed"
    assert table.loc["T1wT2sSn", "states"] == "2 done, 1 missing"
    mean, std, n = mean_std_n([r["metrics"]["accuracy"] for r in finished(root, "T1wT2sSw")])
    assert f"{mean:.4f} ± {std:.4f} (n={n})" in (root / "report" / "report.md").read_text()


def test_attention_correlations_are_scipys_on_group_means(reports):
    root = reports["attention"]
    kd = ["T1wT2sSw", "T1wT2sSs", "T1wT2sSn", "T1wT2sSw-zscore", "T1wT2sSw-hkd", "T1wT2sSs-hkd"]
    means = {g: {k: np.mean([r["metrics"][k] for r in finished(root, g)]) for k in ("accuracy", "teacher_iou")}
             for g in kd}
    for g in kd:
        means[g]["affinity"] = np.mean([r["eval"]["val_affinity"] for r in finished(root, g)])
    table = csv(root, "attention_correlations").set_index(["x", "y"])
    assert set(csv(root, "attention_correlations")["dataset"]) == {"d"}  # one data set: no pooled row
    for x_label, x in (("Val-Acc", "accuracy"), ("Affinity", "affinity")):
        r, p = stats.pearsonr([means[g][x] for g in kd], [means[g]["teacher_iou"] for g in kd])
        rho, _ = stats.spearmanr([means[g][x] for g in kd], [means[g]["teacher_iou"] for g in kd])
        row = table.loc[(x_label, "IoU")]
        assert row["pearson_r"] == pytest.approx(r, abs=1e-9)
        assert row["pearson_p"] == pytest.approx(p, abs=1e-9)
        assert row["spearman_rho"] == pytest.approx(rho, abs=1e-9)
        assert row["n"] == len(kd)


def test_ab_test_and_zscore_statistics(reports):
    root = reports["attention"]
    fid = {g: np.mean([r["metrics"]["top1_agreement"] for r in finished(root, g)])
           for g in ("T1wT2sSw", "T1wT2sSs", "T1wT2sSw-hkd", "T1wT2sSs-hkd")}
    control, treatment = [fid["T1wT2sSw"], fid["T1wT2sSs"]], [fid["T1wT2sSw-hkd"], fid["T1wT2sSs-hkd"]]
    summary = csv(root, "attention_ab_pvalue").iloc[0]
    # Eq. 9: share of trials where hKD's fidelity beats vKD's
    assert summary["p_value_eq9"] == sum(t > c for c, t in zip(control, treatment)) / 2
    assert summary["paired_t_p"] == pytest.approx(stats.ttest_rel(control, treatment).pvalue, abs=1e-9)
    pairs = csv(root, "attention_ab_pairs").set_index("vKD")
    assert pairs.loc["T1wT2sSs", "hKD"] == "T1wT2sSs-hkd"
    assert pairs.loc["T1wT2sSs", "top1_agreement_hKD"] == pytest.approx(fid["T1wT2sSs-hkd"])
    z = csv(root, "attention_zscore").iloc[0]
    vanilla = [r["metrics"]["top1_agreement"] for r in finished(root, "T1wT2sSw")]
    zscore = [r["metrics"]["top1_agreement"] for r in finished(root, "T1wT2sSw-zscore")]
    assert (z["vanilla"], z["z-score"]) == ("T1wT2sSw", "T1wT2sSw-zscore")
    assert z["top1_agreement_welch_p"] == pytest.approx(stats.ttest_ind(vanilla, zscore, equal_var=False).pvalue,
                                                        abs=1e-9)


def test_tstddev_against_test_loss_pearson_per_pair(reports):
    root = reports["augmentation"]
    table = csv(root, "augmentation_tstddev_correlation").set_index("pair")
    for pair, student in (("resnet56/resnet20", "resnet20"), ("wrn_40_2/wrn_16_2", "wrn_16_2")):
        x, y = [], []
        for scheme in ("identity", "flip", "cutout", "mixup", "cutmix"):
            group = f"{student}-KD+{scheme}"
            folders = [root / j["folder"] for j in students(root) if j["name"].startswith(group + "_seed")]
            x.append(np.mean([json.loads((f / "tstddev.json").read_text())["tstddev"] for f in folders]))
            y.append(np.mean([json.loads((f / "results.json").read_text())["metrics"]["nll"] for f in folders]))
        r, p = stats.pearsonr(x, y)
        assert table.loc[pair, "pearson_r"] == pytest.approx(r, abs=1e-9)
        assert table.loc[pair, "pearson_p"] == pytest.approx(p, abs=1e-9)
        assert table.loc[pair, "n"] == 5
    # the pooled row over both pairs
    assert "all pairs" in table.index
    # Table 1: accuracy per DA scheme (rows) and pair (columns)
    acc = csv(root, "augmentation_table1").set_index("scheme")
    values = [r["metrics"]["accuracy"] for r in finished(root, "resnet20-KD+cutmix")]
    assert acc.loc["KD+cutmix (4 ep)", "resnet56/resnet20"] == pytest.approx(np.mean(values))
    md = (root / "report" / "report.md").read_text()
    assert f"{100 * np.mean(values):.2f} ({100 * np.std(values, ddof=1):.2f}) n=2" in md


def test_fidelity_and_response_views_of_an_untagged_sweep(reports):
    root = reports["mixed"]
    ens = csv(root, "fidelity_ensemble_size").set_index("n_teachers")
    for m in (1, 3, 5):
        runs = [r for g in ([f"ens{m}-flip"] + (["ens3-mixup"] if m == 3 else [])) for r in finished(root, g)]
        mean, std, n = mean_std_n([r["metrics"]["top1_agreement"] for r in runs])
        assert ens.loc[m, "agreement_mean"] == pytest.approx(mean) and ens.loc[m, "agreement_n"] == n
        assert ens.loc[m, "agreement_std"] == pytest.approx(std)
    train = csv(root, "fidelity_train_vs_test").set_index("group")
    exact = [r["eval"]["train"]["top1_agreement"] for r in finished(root, "ens3-mixup")]
    assert train.loc["ens3-mixup", "train_top1_agreement_mean"] == pytest.approx(np.mean(exact))
    norm = csv(root, "response_normalized_accuracy").set_index(["scheme", "subset"])
    full = [json.loads((root / f"trials/resp-replace-full-all_seed{i}/results.json").read_text())
            ["normalized_accuracy"]["value"] for i in (0, 1)]
    assert norm.loc[("replace: full", "all"), "normalized_accuracy_mean"] == pytest.approx(np.mean(full))
    assert norm.loc[("replace: full", "all"), "normalized_accuracy_std"] == pytest.approx(np.std(full, ddof=1))
    eff = csv(root, "response_efficient").set_index("group")
    raw = json.loads((root / "trials/effdstl-stage2/results.json").read_text())
    assert eff.loc["effdstl-stage2", "params_m"] == pytest.approx(raw["model"]["params"] / 1e6)
    assert eff.loc["effdstl-stage2", "flops_m"] == pytest.approx(raw["model"]["macs"] / 1e6)
    assert eff.loc["effdstl-stage2", "gpu_hours_mean"] == pytest.approx(raw["timings"]["total_s"] * raw["world_size"] / 3600)
    assert eff.loc["effdstl-stage2", "accuracy_top5_mean"] == pytest.approx(raw["metrics"]["accuracy_top5"])
    # stage 1 stored no model size: counted from its architecture; the paper's Table 2 row for ResNet-18
    assert eff.loc["effdstl-stage1", "params_m"] == pytest.approx(11.69, abs=0.005)
    assert eff.loc["effdstl-stage1", "flops_m"] == pytest.approx(1814.1, abs=0.05)


# ---------------------------------------------------------------------------------------- files and html


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_every_figure_is_a_valid_png_and_embedded_in_the_html(reports, name):
    report = reports[name] / "report"
    pngs = sorted((report / "figures").glob("*.png"))
    assert {p.stem for p in pngs} == EXPECTED_FIGURES[name]  # each view the trials support, and no other
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > 0 and data.startswith(PNG_SIGNATURE), png
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    page = (report / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert "<img" in page and 'src="figures/' not in page  # self-contained: nothing to fetch
    md = (report / "report.md").read_text()
    for png in pngs:
        assert f"(figures/{png.name})" in md
    for table in (report / "tables").glob("*.csv"):
        assert f"tables/{table.name}" in md
        assert len(pd.read_csv(table)) > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_html_lists_every_trial_with_its_state(reports, name):
    root = reports[name]
    page = (root / "report" / "report.html").read_text()
    for job in students(root):
        assert f"<td>{job['name']}</td>" in page, job["name"]
    if name == "attention":
        assert '<td class="state-failed">FAILED</td>' in page
        assert '<td class="state-missing">MISSING</td>' in page
        assert '<td class="state-blocked">BLOCKED</td>' in page
        assert page.count('class="state-failed"') >= 2  # the trial and the failed teacher


def test_a_failed_trial_is_reported_as_failed(reports):
    root = reports["attention"]
    md = (root / "report" / "report.md").read_text()
    assert "1 trial(s) FAILED: T1wT2sSs_seed3: FloatingPointError: loss is nan at step 12" in md
    assert "1 trial(s) BLOCKED: T3wT2sSs_seed1" in md and "1 trial(s) MISSING: T1wT2sSn_seed3" in md
    assert "teachers job T3w FAILED: RuntimeError: CUDA out of memory" in md
    table = summary_table(root)
    row = next(line for line in table.splitlines() if line.startswith("T1wT2sSs_seed3"))
    assert "FAILED" in row and "loss is nan" in row
    assert "needs teachers/T3w, which is failed" in table
    assert table.splitlines()[-1] == "18 trials: 15 done, 1 failed, 1 blocked, 1 missing"
    figure = csv(root, "trials").set_index("trial")
    assert figure.loc["T1wT2sSs_seed3", "state"] == "failed" and math.isnan(figure.loc["T1wT2sSs_seed3", "accuracy"])


def test_without_a_study_tag_every_supported_view_is_drawn(tmp_path, fixtures):
    """The attention fixture is tagged `study: attention`, which keeps the fidelity study's train-vs-test view out
    (EXPECTED_FIGURES); untagged, the same trials also get it, since they store train agreement."""
    root = tmp_path / "untagged"
    shutil.copytree(fixtures / "attention", root)
    manifest = json.loads((root / "sweep.json").read_text())
    del manifest["study"]
    (root / "sweep.json").write_text(json.dumps(manifest))
    write_report(root)
    drawn = {p.stem for p in (root / "report" / "figures").glob("*.png")}
    assert drawn >= EXPECTED_FIGURES["attention"] | {"fidelity_fig5_train_vs_test_agreement"}
    assert "study: not tagged" in (root / "report" / "report.md").read_text()


def test_moved_sweep_folder_finds_its_jobs(tmp_path, fixtures):
    """A sweep.json written elsewhere (absolute folders that no longer exist) still reads its jobs under DIR."""
    root = tmp_path / "moved"
    shutil.copytree(fixtures / "augmentation", root)
    manifest = json.loads((root / "sweep.json").read_text())
    for job in manifest["jobs"]:
        job["folder"] = f"/gone/old-place/{job['folder']}"
    (root / "sweep.json").write_text(json.dumps(manifest))
    assert summary_table(root).splitlines()[-1] == "28 trials: 28 done"


# ------------------------------------------------------------------------------------- errors, atomicity


def test_cli_prints_table_and_report_path(tmp_path, fixtures):
    root = tmp_path / "sweep"
    shutil.copytree(fixtures / "mixed", root)
    out = tmp_path / "elsewhere"
    proc = run_hpckd("report", str(root), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "ens3-mixup_seed2" in proc.stdout and "16 trials: 16 done" in proc.stdout
    assert (out / "report.html").is_file() and not (root / "report").exists()


def test_cli_on_a_missing_folder_is_a_one_line_error(tmp_path):
    proc = run_hpckd("report", str(tmp_path / "nowhere"), timeout=120)
    assert "does not exist" in assert_one_line_error(proc, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("what", ["missing", "no-sweep-json", "bad-json", "no-jobs"])
def test_not_a_sweep_folder_is_a_one_line_user_error(tmp_path, what):
    target = tmp_path / "sweep"
    if what != "missing":
        target.mkdir()
    if what == "bad-json":
        (target / "sweep.json").write_text("{not json")
    if what == "no-jobs":
        (target / "sweep.json").write_text('{"name": "x"}')
    expected = {"missing": "does not exist", "no-sweep-json": "no sweep.json", "bad-json": "cannot read",
                "no-jobs": "no list of jobs"}[what]
    for call in (summary_table, write_report):
        with pytest.raises(ReportError, match=expected) as info:
            call(target)
        assert issubclass(info.type, UserError) and "\n" not in str(info.value)
    assert not (target / "report").exists()


def test_an_unwritable_report_folder_is_a_one_line_user_error(tmp_path, fixtures):
    root = tmp_path / "sweep"
    shutil.copytree(fixtures / "mixed", root)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="a-file") as info:
        write_report(root, tmp_path / "a-file" / "report")
    assert "\n" not in str(info.value)


def test_a_failing_figure_leaves_the_previous_report_intact(tmp_path, fixtures, monkeypatch):
    root = tmp_path / "sweep"
    shutil.copytree(fixtures / "attention", root)
    html = write_report(root)
    before = {p.relative_to(root): p.read_bytes() for p in (root / "report").rglob("*") if p.is_file()}
    calls = []

    def failing_png(fig):
        calls.append(fig)
        if len(calls) == 2:  # the first figure was written into the new report folder: the failure is mid-way
            raise RuntimeError("injected figure failure")
        return real_png(fig)

    real_png = render.png_bytes
    monkeypatch.setattr(render, "png_bytes", failing_png)
    with pytest.raises(RuntimeError, match="injected"):
        write_report(root)
    after = {p.relative_to(root): p.read_bytes() for p in (root / "report").rglob("*") if p.is_file()}
    assert after == before and html.is_file()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temp folder left
    # a first report that fails leaves no report folder at all
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        write_report(root, fresh)
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_states_read_from_the_state_files(tmp_path):
    """Each state the sweep's own status would give, from the files alone: done, failed (error record; done but
    unreadable results; a failed evaluation stage), missing (started, no result; done for another config)."""
    def job(stage, name, files):
        folder = tmp_path / "trials" / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (folder / fname).write_text(text)
        return {"key": f"{stage}/{name}", "name": name, "stage": stage, "folder": f"trials/{name}", "deps": [],
                "config_hash": "h"}

    results = json.dumps({"config": {"seed": 0}, "metrics": {"accuracy": 0.5}})
    done = json.dumps({"config_hash": "h"})
    jobs = [job("students", "ok", {"sweep-students.done.json": done, "results.json": results}),
            job("students", "torn", {"sweep-students.done.json": done, "results.json": "{trunc"}),
            job("students", "running", {"sweep-students.started.json": '{"time": "T0"}'}),
            job("students", "stale", {"sweep-students.done.json": '{"config_hash": "old"}', "results.json": results}),
            job("students", "evalfail", {"sweep-students.done.json": done, "results.json": results,
                                         "sweep-evaluation.error.json": '{"error": "DataError: no val split"}'})]
    jobs.append({**jobs[-1], "key": "evaluation/evalfail", "stage": "evaluation"})
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "states", "jobs": jobs}))
    rows = {line.split()[0]: line for line in summary_table(tmp_path).splitlines()[2:-1]}
    assert rows["ok"].split()[1:3] == ["done", "0.5000"]
    assert "FAILED" in rows["torn"] and "done, but results.json is missing or not valid JSON" in rows["torn"]
    assert "MISSING" in rows["running"] and "started T0, no result yet" in rows["running"]
    assert "MISSING" in rows["stale"] and "done for a different config" in rows["stale"]
    assert "FAILED" in rows["evalfail"] and "evaluation: DataError: no val split" in rows["evalfail"]
