"""The papers' tables and figures, each built only when the sweep's trials hold what it needs.

A view is a titled set of tables (numbers for the CSV, ``mean ± std (n=k)`` text for report.md/html) and figures
(built lazily by :mod:`hpckd.report.render`). :func:`build_views` returns the views of the sweep's ``study`` tag
(attention | augmentation | fidelity | response), or of every study when the sweep has none; the overview views
(every trial, every trial group) are always there. docs/report.md lists each view with the paper table or figure
it redraws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from hpckd.report import figures as figs
from hpckd.report.aggregate import aggregate, fmt, formatted, has
from hpckd.report.load import METRIC_KEYS, Sweep
from hpckd.report.stats import ab_pvalue, correlation, paired_ttest, welch_ttest

STUDIES = ("attention", "augmentation", "fidelity", "response")
AGG_METRICS = (*METRIC_KEYS, "affinity", "independent_agreement", "normalized_accuracy", "gpu_hours", "params",
               "macs", "total_s")
# The attention study's column names (Tables 1, 3, 4, A.4) -> results keys
ATTENTION_COLUMNS = {"Val-Acc": "accuracy", "Affinity": "affinity", "Acc-Gap": "acc_gap",
                     "Fidelity (top-1 A)": "top1_agreement", "KL": "predictive_kl", "MI": "mutual_information",
                     "IoU": "teacher_iou", "ECE": "ece"}
TRIAL_COLUMNS = ("accuracy", "top1_agreement", "predictive_kl", "teacher_iou", "mutual_information", "ece", "nll",
                 "acc_gap", "affinity")


@dataclass
class Table:
    name: str  # file stem of its CSV
    title: str
    data: pd.DataFrame  # numbers (CSV)
    shown: pd.DataFrame  # text (report.md / report.html)


@dataclass
class FigureSpec:
    name: str  # file stem of its PNG
    title: str
    make: Callable[[], Figure]
    trials: list[str]  # the trial groups it shows
    left_out: list[str] = field(default_factory=list)  # groups of the view not shown (with why)


@dataclass
class View:
    key: str
    study: str  # one of STUDIES, or "overview"
    title: str
    source: str  # the paper's table / figure it redraws
    text: str
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)


@dataclass
class Context:
    sweep: Sweep
    trials: pd.DataFrame
    groups: pd.DataFrame  # aggregate over seeds per trial group

    @property
    def study(self) -> str | None:
        return self.sweep.study

    def wants(self, study: str) -> bool:
        return self.study is None or self.study == study


def _context(sweep: Sweep) -> Context:
    trials = sweep.trials
    return Context(sweep, trials, aggregate(trials, AGG_METRICS))


def _not_done(ctx: Context, groups: Sequence[str] | None = None) -> list[str]:
    """``name (state: detail)`` of every trial (of ``groups``) that is not done: what a figure could not show."""
    t = ctx.trials
    if t.empty:
        return []
    rows = t[(t["state"] != "done") & (t["group"].isin(groups) if groups is not None else True)]
    return [f"{r.trial} ({r.state}{': ' + r.detail if r.detail else ''})" for r in rows.itertuples()]


def _numbers(agg: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    cols = [*keys, "runs", "states"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    return agg[[c for c in cols if c in agg.columns]].reset_index(drop=True)


def _shown(agg: pd.DataFrame, labels: dict[str, str], first: dict[str, str], digits: int = 4) -> pd.DataFrame:
    out = pd.DataFrame({title: agg[col].astype(str) for title, col in first.items()})
    for title, metric in labels.items():
        out[title] = formatted(agg, metric, digits).values
    out["runs"] = agg["runs"].values
    out["states"] = agg["states"].values
    return out.reset_index(drop=True)


def _metric_table(name: str, title: str, agg: pd.DataFrame, labels: dict[str, str],
                  first: dict[str, str] | None = None, digits: int = 4) -> Table:
    first = first or {"trial": "group"}
    return Table(name, title, _numbers(agg, list(first.values()), list(labels.values())),
                 _shown(agg, labels, first, digits))


# ----------------------------------------------------------------------------------------------- overview


def overview_views(ctx: Context) -> list[View]:
    t = ctx.trials
    if t.empty:
        return [View("trials", "overview", "Trials", "", "The sweep has no trials.")]
    cols = ["trial", "group", "seed", "state", "detail", "teachers", "da", "loss", *TRIAL_COLUMNS]
    data = t[[c for c in cols if c in t.columns]].copy()
    shown = data.copy()
    shown["state"] = [s if s == "done" else s.upper() for s in shown["state"]]
    for c in TRIAL_COLUMNS:
        if c in shown:
            shown[c] = [("N/A" if pd.isna(v) else f"{v:.4f}") for v in shown[c]]
    shown["seed"] = ["-" if pd.isna(v) else str(int(v)) for v in shown["seed"]]
    every = Table("trials", "Every trial (one row per trial and seed); FAILED / MISSING / BLOCKED ones marked", data,
                  shown)
    groups = _metric_table("trial_groups", "Trial groups: mean ± std over seeds (ddof 1) and the count of finished runs",
                           ctx.groups, {"accuracy": "accuracy", "top-5": "accuracy_top5", "NLL": "nll",
                                        "agreement": "top1_agreement", "KL": "predictive_kl", "ECE": "ece"})
    failed = t[t["state"] != "done"]
    text = ("Every trial of the sweep, with its state. " +
            (f"{int((t['state'] == 'failed').sum())} failed, {int((t['state'] == 'blocked').sum())} blocked, "
             f"{int((t['state'] == 'missing').sum())} missing trial(s): they are left out of every mean and "
             f"figure, and named under each figure." if len(failed) else "Every trial finished."))
    teachers = ctx.sweep.jobs[ctx.sweep.jobs["stage"] == "teachers"]
    views = [View("trials", "overview", "Trials", "", text, [every, groups])]
    if not teachers.empty:
        shown = teachers[["name", "state", "detail"]].copy()
        shown["state"] = [s if s == "done" else s.upper() for s in shown["state"]]
        views[0].tables.append(Table("teachers", "Teachers (shared by the trials that name them)",
                                     teachers[["name", "state", "detail", "folder"]], shown))
    return views


# ---------------------------------------------------------------------------------------------- attention


def _corr_rows(ctx_groups: pd.DataFrame, ys: dict[str, str], xs: dict[str, str]) -> pd.DataFrame:
    """Correlations over trial means, per data set (the papers plot each data set apart), and pooled when the
    sweep has several."""
    parts = [(str(d), sub) for d, sub in ctx_groups.groupby("dataset", sort=False)]
    if len(parts) > 1:
        parts.append(("all data sets", ctx_groups))
    rows = []
    for dataset, sub in parts:
        for xl, xm in xs.items():
            for yl, ym in ys.items():
                rows.append({"dataset": dataset, "x": xl, "y": yl,
                             **correlation(sub[f"{xm}_mean"], sub[f"{ym}_mean"])})
    return pd.DataFrame(rows)


def _corr_table(name: str, title: str, frame: pd.DataFrame) -> Table:
    shown = frame.copy()
    for c in ("pearson_r", "pearson_p", "spearman_rho", "spearman_p"):
        shown[c] = ["N/A" if pd.isna(v) else f"{v:.4g}" for v in shown[c]]
    shown["n"] = shown["n"].astype(int)
    return Table(name, title, frame, shown)


def _scatter_panels(g: pd.DataFrame, ys: dict[str, str], x_label: str, x_metric: str) -> list[figs.Scatter]:
    """One panel per y metric; points coloured by data set when the sweep has several."""
    series = list(g["dataset"].astype(str)) if g["dataset"].nunique() > 1 else None
    return [figs.Scatter(list(g[f"{x_metric}_mean"]), list(g[f"{m}_mean"]), list(g["group"]), x_label, label,
                         _r_title(g[f"{x_metric}_mean"], g[f"{m}_mean"]), list(g[f"{x_metric}_std"]),
                         list(g[f"{m}_std"]), series) for label, m in ys.items()]


def _r_title(x, y) -> str:
    r = correlation(x, y)
    if math.isnan(r["pearson_r"]):
        return f"n={int(r['n'])}"
    return f"Pearson r={r['pearson_r']:.3f} (p={r['pearson_p']:.3g}), n={int(r['n'])}"


def attention_views(ctx: Context) -> list[View]:
    g = ctx.groups
    if g.empty or not has(g, "accuracy"):
        return []
    attention_data = has(g, "teacher_iou") or has(g, "affinity") or ctx.study == "attention"
    if not attention_data:
        return []
    views = []
    table = _metric_table("attention_trials", "Per trial: the attention study's metrics (mean ± std over seeds)", g,
                          ATTENTION_COLUMNS)
    tables = [table]
    if has(g, "affinity"):
        tables.append(_pivot(g, {"Affinity": "affinity", "Val-Acc": "accuracy"}, "attention_table1",
                             "Table 1 layout: Affinity and Val-Acc per trial (columns), per data set"))
    kd = g[g["kd"] == "KD"]
    if has(kd, "acc_gap") and has(kd, "top1_agreement"):
        tables.append(_pivot(kd, {"Acc-Gap": "acc_gap", "Fidelity": "top1_agreement"}, "attention_table4",
                             "Table 4 layout: Acc-Gap and Fidelity per trial (columns), per student architecture",
                             row_key="student_arch"))
    views.append(View("attention_tables", "attention", "Attention study: per-trial metrics",
                      "attention study Tables 1, 3, 4 and A.4",
                      "Student validation accuracy (Val-Acc), Affinity (Eq. 5), train-val accuracy gap (Acc-Gap), "
                      "fidelity to the teacher ensemble (top-1 agreement, Eq. 3; predictive KL), mutual information "
                      "(MI, Eq. 4), the teachers' CAM IoU (Eq. 1) and ECE (Eq. 13). N/A: the trial has no value "
                      "(e.g. no teachers, or no evaluation pass for Affinity).", tables))
    views.extend(_attention_scatters(ctx))
    views.extend(_zscore_view(ctx))
    views.extend(_reliability_view(ctx))
    views.extend(_ab_view(ctx))
    return views


def _pivot(g: pd.DataFrame, labels: dict[str, str], name: str, title: str, row_key: str = "dataset") -> Table:
    """The paper's layout: one column per trial, rows = (row_key, metric)."""
    numbers, shown = [], []
    for key, part in g.groupby(row_key, sort=False):
        for label, metric in labels.items():
            numbers.append({row_key: key, "metric": label,
                            **{grp: v for grp, v in zip(part["group"], part[f"{metric}_mean"])}})
            shown.append({row_key: key, "metric": label,
                          **{grp: fmt(m, s, int(n)) for grp, m, s, n in
                             zip(part["group"], part[f"{metric}_mean"], part[f"{metric}_std"], part[f"{metric}_n"])}})
    return Table(name, title, pd.DataFrame(numbers), pd.DataFrame(shown).fillna("-"))


def _attention_scatters(ctx: Context) -> list[View]:
    g = ctx.groups
    kd = g[(g["kd"] == "KD") & (g["accuracy_n"] > 0)]
    ys = {label: m for label, m in (("IoU", "teacher_iou"), ("Fidelity (top-1 A)", "top1_agreement"),
                                    ("MI", "mutual_information")) if has(kd, m, 2)}
    if len(kd) < 2 or not ys:
        return []
    shown = list(kd["group"])
    left = _not_done(ctx, list(g["group"]))
    specs = []
    if "IoU" in ys:
        specs.append(FigureSpec("attention_fig2_iou_vs_accuracy", "Fig. 2: teacher-CAM IoU vs student Val-Acc",
                                lambda: figs.scatter_figure(_scatter_panels(kd, {"IoU": "teacher_iou"}, "Val-Acc",
                                                                            "accuracy")), shown, left))
    fid = {k: v for k, v in ys.items() if k != "IoU"}
    if fid:
        specs.append(FigureSpec("attention_fig3_fidelity_mi_vs_accuracy", "Fig. 3: fidelity and MI vs student Val-Acc",
                                lambda: figs.scatter_figure(_scatter_panels(kd, fid, "Val-Acc", "accuracy")), shown,
                                left))
    xs = {"Val-Acc": "accuracy"}
    if has(kd, "affinity", 2):
        xs["Affinity"] = "affinity"
        specs.append(FigureSpec("attention_fig5_vs_accuracy_and_affinity",
                                "Fig. 5: fidelity, IoU and MI vs Val-Acc (top) and vs Affinity (bottom)",
                                lambda: figs.scatter_figure([*_scatter_panels(kd, ys, "Val-Acc", "accuracy"),
                                                             *_scatter_panels(kd, ys, "Affinity", "affinity")]),
                                shown, left))
    corr = _corr_table("attention_correlations", "Correlations over trial groups (scipy: Pearson, Spearman)",
                       _corr_rows(kd, ys, xs))
    return [View("attention_scatter", "attention", "Attention study: IoU, fidelity and MI against accuracy and Affinity",
                 "attention study Figs. 2, 3, 5",
                 "One point per distilled trial group (mean over seeds, bars ± std), labelled with its trial. The "
                 "study finds IoU, fidelity and MI falling as Val-Acc rises, and rising with Affinity.", [corr], specs)]


def _pairs(g: pd.DataFrame, treated: Callable[[pd.Series], bool], control: Callable[[pd.Series], bool],
           keys: Sequence[str]) -> list[tuple[pd.Series, pd.Series]]:
    """(control, treatment) group rows that agree on ``keys`` (same data, teachers, student, ...)."""
    rows = [r for _, r in g.iterrows()]
    controls: dict[tuple, pd.Series] = {}
    for c in rows:  # the first control of each key (a dict: linear in the number of groups)
        if control(c):
            controls.setdefault(tuple(str(c[k]) for k in keys), c)
    out = []
    for t in rows:
        match = controls.get(tuple(str(t[k]) for k in keys)) if treated(t) else None
        if match is not None:
            out.append((match, t))
    return out


def _zscore_view(ctx: Context) -> list[View]:
    g = ctx.groups[ctx.groups["kd"] == "KD"]
    pairs = _pairs(g, lambda r: r["loss"] == "standardized_kd", lambda r: r["loss"] != "standardized_kd",
                   ("dataset", "teachers", "aug", "student_arch", "half_split", "epochs"))
    if not pairs:
        return []
    t = ctx.trials
    rows = []
    for c, z in pairs:
        row = {"trial": c["group"], "vanilla": c["group"], "z-score": z["group"]}
        for m in ("acc_gap", "top1_agreement"):
            a = t[(t["group"] == c["group"]) & (t["state"] == "done")][m]
            b = t[(t["group"] == z["group"]) & (t["state"] == "done")][m]
            test = welch_ttest(list(a), list(b))
            row.update({f"{m}_vanilla_mean": c[f"{m}_mean"], f"{m}_vanilla_std": c[f"{m}_std"],
                        f"{m}_vanilla_n": c[f"{m}_n"], f"{m}_zscore_mean": z[f"{m}_mean"],
                        f"{m}_zscore_std": z[f"{m}_std"], f"{m}_zscore_n": z[f"{m}_n"],
                        f"{m}_welch_t": test["t"], f"{m}_welch_p": test["p"]})
        rows.append(row)
    data = pd.DataFrame(rows)
    shown = pd.DataFrame({
        "trial (vanilla / z-score)": [f"{r['vanilla']} / {r['z-score']}" for r in rows],
        **{f"{lab} {kind}": [fmt(r[f"{m}_{k}_mean"], r[f"{m}_{k}_std"], int(r[f"{m}_{k}_n"])) for r in rows]
           for lab, m in (("Acc-Gap", "acc_gap"), ("Fidelity", "top1_agreement"))
           for kind, k in (("vanilla", "vanilla"), ("z-score", "zscore"))},
        **{f"{lab} Welch p": ["N/A" if pd.isna(r[f"{m}_welch_p"]) else f"{r[f'{m}_welch_p']:.3g}" for r in rows]
           for lab, m in (("Acc-Gap", "acc_gap"), ("Fidelity", "top1_agreement"))}})
    cats = [r["vanilla"] for r in rows]

    def make() -> Figure:
        return figs.bar_figure([
            figs.Bars(cats, {"vanilla KD": ([r[f"{m}_vanilla_mean"] for r in rows], [r[f"{m}_vanilla_std"] for r in rows]),
                             "z-score KD": ([r[f"{m}_zscore_mean"] for r in rows], [r[f"{m}_zscore_std"] for r in rows])},
                      label, title) for m, label, title in (("acc_gap", "Acc-Gap", "generalisation (lower is better)"),
                                                            ("top1_agreement", "Fidelity (top-1 A)", "fidelity"))])
    names = [n for r in rows for n in (r["vanilla"], r["z-score"])]
    return [View("attention_zscore", "attention", "Attention study: vanilla vs z-score KD", "attention study Fig. 4",
                 "Each trial under vanilla KD and under z-score logit standardisation (same teachers, data and "
                 "student); Welch's t-test over seeds where both have at least 2.",
                 [Table("attention_zscore", "Vanilla vs z-score KD", data, shown)],
                 [FigureSpec("attention_fig4_vanilla_vs_zscore", "Fig. 4: Acc-Gap (top) and fidelity (bottom)", make,
                             names, _not_done(ctx, names))])]


def _reliability_view(ctx: Context) -> list[View]:
    diagrams = {name: bins for name, bins in ctx.sweep.reliability.items()
                if name in set(ctx.trials.loc[ctx.trials["state"] == "done", "trial"])}
    if not diagrams:
        return []
    ece = ctx.trials.set_index("trial")["ece"]
    data = pd.DataFrame([{"trial": n, "ece": ece.get(n), "bins": len(b["counts"]),
                          "samples": int(sum(b["counts"]))} for n, b in diagrams.items()])
    shown = data.copy()
    shown["ece"] = ["N/A" if pd.isna(v) else f"{v:.4f}" for v in shown["ece"]]
    return [View("reliability", "attention", "Calibration: reliability diagrams", "attention study Fig. A.4 (bottom)",
                 "Per finished trial (each seed), the accuracy of each confidence bin against perfect calibration.",
                 [Table("reliability", "Reliability bins per trial", data, shown)],
                 [FigureSpec("reliability_diagrams", "Reliability diagrams", lambda: figs.reliability_figure(diagrams),
                             list(diagrams), _not_done(ctx))])]


def _ab_view(ctx: Context) -> list[View]:
    g = ctx.groups[ctx.groups["kd"] == "KD"]
    pairs = _pairs(g, lambda r: r["half_split"] != "none", lambda r: r["half_split"] == "none",
                   ("dataset", "teachers", "aug", "student_arch", "loss", "epochs"))
    tables = []
    if pairs:
        rows = [{"trial": c["group"], "vKD": c["group"], "hKD": t["group"],
                 **{f"{m}_{arm}": r[f"{m}_mean"] for m in ("acc_gap", "teacher_iou", "top1_agreement")
                    for arm, r in (("vKD", c), ("hKD", t))}} for c, t in pairs]
        data = pd.DataFrame(rows)
        p = ab_pvalue(data["top1_agreement_vKD"], data["top1_agreement_hKD"])
        paired = paired_ttest(data["top1_agreement_vKD"], data["top1_agreement_hKD"])
        shown = pd.DataFrame({"Model": data["trial"],
                              **{f"{lab} {arm}": ["N/A" if pd.isna(v) else f"{v:.4f}" for v in data[f"{m}_{arm}"]]
                                 for lab, m in (("Acc Gap", "acc_gap"), ("IoU", "teacher_iou"),
                                                ("Fidelity", "top1_agreement")) for arm in ("vKD", "hKD")}})
        summary = pd.DataFrame([{"trials": len(rows), "p_value_eq9": p, "paired_t": paired["t"],
                                 "paired_t_p": paired["p"]}])
        tables += [Table("attention_ab_pairs", "A/B test: vKD (control) vs hKD (half images to each teacher)", data,
                         shown),
                   Table("attention_ab_pvalue", f"A/B-test p-value (Eq. 9) over {len(rows)} trial(s): {p:.4g}", summary,
                         summary.map(lambda v: "N/A" if pd.isna(v) else f"{v:.4g}"))]
    for name, record in ctx.sweep.extras.items():
        frame = pd.DataFrame({"control": record["control"], "treatment": record["treatment"],
                              "control_run": record.get("control_runs", [None] * len(record["control"])),
                              "treatment_run": record.get("treatment_runs", [None] * len(record["control"]))})
        tables.append(Table("attention_ab_" + name.replace("/", "_").removesuffix(".json"),
                            f"{name} (hpckd ab-test, {record.get('metric', '?')}): p-value {record['p_value']:.4g} "
                            f"over {len(frame)} pair(s)", frame, frame.astype(str)))
    if not tables:
        return []
    return [View("attention_ab", "attention", "Attention study: the hKD A/B test", "attention study Sec. 6.2, Eq. 9, "
                 "Tables A.1-A.3", "H0: lowering the teachers' IoU (hKD) raises fidelity; p = #{hKD fidelity > vKD "
                 "fidelity} / Num (trial-group means); a paired t-test over the same pairs beside it.", tables)]


# ------------------------------------------------------------------------------------------- augmentation


def _pair_label(r: pd.Series) -> str:
    return f"{r['teacher_arch']}/{r['student_arch']}"


def _da_row(r: pd.Series, several_epochs: bool) -> str:
    label = f"{r['kd']}+{r['da']}"
    return f"{label} ({int(r['epochs'])} ep)" if several_epochs and not pd.isna(r["epochs"]) else label


def augmentation_views(ctx: Context) -> list[View]:
    if not ctx.wants("augmentation") or ctx.groups.empty:
        return []
    g = ctx.groups.copy()
    g["pair"] = [_pair_label(r) for _, r in g.iterrows()]
    views = []
    if has(g, "tstddev"):
        views.append(_tstddev_view(ctx, g))
    several = g["epochs"].nunique() > 1
    g["scheme"] = [_da_row(r, several) for _, r in g.iterrows()]
    if has(g, "accuracy") and (ctx.study == "augmentation" or g["da"].nunique() > 1):
        numbers = g.pivot_table(index="scheme", columns="pair", values="accuracy_mean", aggfunc="first", sort=False)
        shown = pd.DataFrame(index=numbers.index, columns=numbers.columns, dtype=object)
        for _, r in g.iterrows():
            n = int(r["accuracy_n"])
            shown.loc[r["scheme"], r["pair"]] = ("N/A" if not n else f"{100 * r['accuracy_mean']:.2f}" +
                                                 (f" ({100 * r['accuracy_std']:.2f})" if n > 1 else "") + f" n={n}")
        views.append(View("augmentation_table1", "augmentation", "Augmentation study: accuracy per DA scheme",
                          "augmentation study Tables 1-2",
                          "Student test accuracy in %, mean (std) over seeds, one row per loss + DA scheme (and epoch "
                          "budget when the sweep has several), one column per teacher/student pair.",
                          [Table("augmentation_table1", "Student test accuracy (%)", numbers.reset_index(),
                                 shown.fillna("-").reset_index())]))
    views.extend(_epoch_views(ctx, g))
    return views


def _tstddev_view(ctx: Context, g: pd.DataFrame) -> View:
    part = g[g["tstddev_n"] > 0]
    scale = 1e3  # the paper's tables give T. stddev x 10^-3
    rows, panels = [], []
    for pair, sub in part.groupby("pair", sort=False):
        r = correlation(sub["tstddev_mean"], sub["nll_mean"])
        rows.append({"pair": pair, **r})
        panels.append(figs.Scatter(list(sub["tstddev_mean"] * scale), list(sub["nll_mean"]), list(sub["group"]),
                                   "T. stddev (x1e-3)", "S. test loss", f"{pair}: " + _r_title(sub["tstddev_mean"],
                                                                                                sub["nll_mean"]),
                                   list(sub["tstddev_std"] * scale), list(sub["nll_std"])))
    if part["pair"].nunique() > 1:
        rows.append({"pair": "all pairs", **correlation(part["tstddev_mean"], part["nll_mean"])})
    table = Table("augmentation_tstddev", "T. stddev (x1e-3) and student test loss per DA scheme",
                  _numbers(part, ["pair", "group", "da"], ["tstddev", "nll"]),
                  pd.DataFrame({"pair": part["pair"], "trial": part["group"], "DA": part["da"],
                                "T. stddev (x1e-3)": [fmt(m * scale, s * scale, int(n), 3) for m, s, n in
                                                      zip(part["tstddev_mean"], part["tstddev_std"], part["tstddev_n"])],
                                "S. test loss": formatted(part, "nll").values}).reset_index(drop=True))
    corr = _corr_table("augmentation_tstddev_correlation", "Pearson / Spearman of T. stddev vs S. test loss per pair",
                       pd.DataFrame(rows))
    return View("augmentation_tstddev", "augmentation", "Augmentation study: T. stddev vs student test loss",
                "augmentation study Fig. 4, Tables 3-6",
                "T. stddev (Eq. 10, from `hpckd tstddev`: the trial's tstddev.json) against the student's test loss "
                "(NLL), one point per trial group; the study finds a significant positive correlation.",
                [table, corr], [FigureSpec("augmentation_fig4_tstddev_vs_test_loss", "Fig. 4: T. stddev vs S. test loss",
                                           lambda: figs.scatter_figure(panels), list(part["group"]),
                                           _not_done(ctx, list(g["group"])))])


def _epoch_views(ctx: Context, g: pd.DataFrame) -> list[View]:
    views = []
    family = ["pair", "kd", "da"]
    budgets = g[g["accuracy_n"] > 0].copy()
    budgets = budgets[budgets.groupby(family)["epochs"].transform("nunique") > 1]
    if not budgets.empty:
        series = {}
        for key, sub in budgets.sort_values("epochs").groupby(family, sort=False):
            series[" ".join(key)] = (list(sub["epochs"]), list(1 - sub["accuracy_mean"]), list(sub["accuracy_std"]))
        table = _metric_table("augmentation_error_vs_budget", "Final test error vs number of training epochs",
                              budgets.assign(error_mean=1 - budgets["accuracy_mean"], error_std=budgets["accuracy_std"],
                                             error_n=budgets["accuracy_n"]), {"test error": "error"},
                              {"trial": "group", "pair": "pair", "loss": "kd", "DA": "da", "epochs": "epochs"})
        views.append(View("augmentation_budget", "augmentation", "Augmentation study: test error vs training epochs",
                          "augmentation study Figs. 2, 7",
                          "Each point a trial group trained for that many epochs (mean ± std over seeds), CE and KD, "
                          "with and without the DA scheme.", [table],
                          [FigureSpec("augmentation_fig2_error_vs_epochs", "Figs. 2/7: test error vs epochs",
                                      lambda: figs.line_figure([figs.Lines(series, "training epochs", "test error")]),
                                      list(budgets["group"]), _not_done(ctx, list(budgets["group"])))]))
    curves = _history_curves(ctx)
    if curves:
        names = sorted({n for panel in curves.values() for n in panel})
        views.append(View("history", "augmentation", "Test error during training", "augmentation study Figs. 2, 7 "
                          "(per-epoch form)", "Validation error (1 - val accuracy) after each epoch, mean ± std over "
                          "the seeds of each trial group, CE and KD trials side by side, one panel per "
                          "teacher/student pair.", [],
                          [FigureSpec("history_test_error_vs_epoch", "Test error vs epoch",
                                      lambda: figs.line_figure([figs.Lines(s, "epoch", "test error", pair)
                                                                for pair, s in curves.items()]),
                                      names, _not_done(ctx))]))
    return views


def _history_curves(ctx: Context) -> dict[str, dict[str, tuple[list, list, list]]]:
    """pair -> "group (CE|KD)" -> (epochs, mean error, std error) over the finished seeds' histories."""
    t = ctx.trials[ctx.trials["state"] == "done"]
    out: dict[str, dict[str, tuple[list, list, list]]] = {}
    for group, sub in t.groupby("group", sort=False):
        frames = []
        for name in sub["trial"]:
            hist = pd.DataFrame(ctx.sweep.histories.get(name, []))
            if {"epoch", "val_accuracy"} <= set(hist.columns):
                frames.append(hist[["epoch", "val_accuracy"]].assign(trial=name))
        if not frames:
            continue
        curve = pd.concat(frames).groupby("epoch")["val_accuracy"].agg(["mean", "std"]).reset_index()
        first = sub.iloc[0]
        label = f"{group} ({first['kd']})"
        out.setdefault(_pair_label(first), {})[label] = (list(curve["epoch"] + 1), list(1 - curve["mean"]),
                                                         list(curve["std"]))
    return out


# ------------------------------------------------------------------------------------------------- fidelity


def fidelity_views(ctx: Context) -> list[View]:
    if not ctx.wants("fidelity") or ctx.groups.empty:
        return []
    g = ctx.groups
    kd = g[(g["kd"] == "KD") & (g["top1_agreement_n"] > 0)]
    base = g[(g["n_teachers"] == 0) | (g["kd"] == "CE")]
    views = []
    if len(kd) and (ctx.study == "fidelity" or kd["da"].nunique() > 1):
        hl_acc = {f"independent {r['group']}": r["accuracy_mean"] for _, r in base.iterrows() if r["accuracy_n"]}
        hl_agree = {f"independent {r['group']}": r["independent_agreement_mean"] for _, r in base.iterrows()
                    if r["independent_agreement_n"]}
        hl_agree |= {f"independent {r['group']}": r["independent_agreement_mean"] for _, r in kd.iterrows()
                     if r["independent_agreement_n"]}
        cats = [f"{r['group']} [{r['da']}]" for _, r in kd.iterrows()]
        table = _metric_table("fidelity_policies", "Accuracy and agreement per augmentation policy",
                              pd.concat([kd, base]), {"test accuracy": "accuracy", "test agreement": "top1_agreement",
                                                      "predictive KL": "predictive_kl", "NLL": "nll",
                                                      "independent agreement": "independent_agreement"},
                              {"trial": "group", "policy": "da", "loss": "kd"})
        views.append(View("fidelity_policies", "fidelity", "Fidelity study: augmentation policies",
                          "fidelity study Fig. 3 (and Fig. 12)",
                          "Test accuracy and teacher-student top-1 agreement of each distilled trial (its policy in "
                          "brackets), mean ± std over seeds; dashed lines: the independent students (trained without "
                          "the teacher; their agreement from `hpckd eval --against`).", [table],
                          [FigureSpec("fidelity_fig3_policies", "Fig. 3: accuracy and agreement per policy",
                                      lambda: figs.bar_figure([
                                          figs.Bars(cats, {"accuracy": (list(kd["accuracy_mean"]), list(kd["accuracy_std"]))},
                                                    "test accuracy", "accuracy", hl_acc),
                                          figs.Bars(cats, {"agreement": (list(kd["top1_agreement_mean"]),
                                                                         list(kd["top1_agreement_std"]))},
                                                    "test agreement", "agreement", hl_agree)]),
                                      [*kd["group"], *base["group"]], _not_done(ctx))]))
    both = kd[kd["train_top1_agreement_n"] > 0]
    if len(both):
        names = list(both["group"])
        table = _metric_table("fidelity_train_vs_test", "Train vs test agreement", both,
                              {"train agreement": "train_top1_agreement", "test agreement": "top1_agreement"})
        views.append(View("fidelity_train_test", "fidelity", "Fidelity study: train vs test agreement",
                          "fidelity study Fig. 5",
                          "Top-1 agreement with the teacher on the distillation (training) data and on the test data. "
                          "Train agreement is the exact `hpckd eval --split train` value when stored, else the "
                          "running value of the last epoch.", [table],
                          [FigureSpec("fidelity_fig5_train_vs_test_agreement", "Fig. 5: train vs test agreement",
                                      lambda: figs.bar_figure([figs.Bars(names, {
                                          "train": (list(both["train_top1_agreement_mean"]), list(both["train_top1_agreement_std"])),
                                          "test": (list(both["top1_agreement_mean"]), list(both["top1_agreement_std"]))},
                                          "top-1 agreement")]), names, _not_done(ctx, names))]))
    sizes = kd[kd["n_teachers"] > 0]
    if sizes["n_teachers"].nunique() > 1:
        by = sizes.groupby(["n_teachers"], sort=True)
        ens = by.agg(groups=("group", ", ".join)).reset_index()
        t = ctx.trials[(ctx.trials["state"] == "done") & ctx.trials["group"].isin(sizes["group"])]
        runs = t.groupby("n_teachers").agg(agreement_mean=("top1_agreement", "mean"),
                                           agreement_std=("top1_agreement", "std"), agreement_n=("top1_agreement", "count"),
                                           accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                                           accuracy_n=("accuracy", "count")).reset_index()
        data = ens.merge(runs, on="n_teachers")
        shown = pd.DataFrame({"ensemble size": data["n_teachers"], "trials": data["groups"],
                              "agreement": [fmt(m, s, int(n)) for m, s, n in zip(data["agreement_mean"],
                                                                                  data["agreement_std"], data["agreement_n"])],
                              "accuracy": [fmt(m, s, int(n)) for m, s, n in zip(data["accuracy_mean"],
                                                                                 data["accuracy_std"], data["accuracy_n"])]})
        x = list(data["n_teachers"])
        views.append(View("fidelity_ensemble", "fidelity", "Fidelity study: agreement vs ensemble size",
                          "fidelity study Figs. 4 (top), 10",
                          "Every finished distilled run, grouped by the number of teachers in its ensemble (mean ± "
                          "std over runs).", [Table("fidelity_ensemble_size", "Agreement and accuracy vs ensemble size",
                                                    data, shown)],
                          [FigureSpec("fidelity_agreement_vs_ensemble_size", "Agreement and accuracy vs ensemble size",
                                      lambda: figs.line_figure([
                                          figs.Lines({"agreement": (x, list(data["agreement_mean"]), list(data["agreement_std"]))},
                                                     "teachers in the ensemble", "test agreement"),
                                          figs.Lines({"accuracy": (x, list(data["accuracy_mean"]), list(data["accuracy_std"]))},
                                                     "teachers in the ensemble", "test accuracy")]),
                                      list(sizes["group"]), _not_done(ctx, list(sizes["group"])))]))
    return views


# ------------------------------------------------------------------------------------------------- response


def _scheme(r) -> str:
    if r["replace"] != "none":
        return f"replace: {r['replace']}"
    if r["manipulate"] != "none":
        return f"manipulate: {r['manipulate']}"
    return "none"


def response_views(ctx: Context) -> list[View]:
    if not ctx.wants("response") or ctx.trials.empty:
        return []
    views = []
    t = ctx.trials[(ctx.trials["state"] == "done") & ctx.trials["normalized_accuracy"].notna()].copy()
    if len(t):
        t["scheme"] = [_scheme(r) for _, r in t.iterrows()]
        agg = aggregate(t.assign(group=t["scheme"] + " | " + t["subset"]), ["normalized_accuracy"])
        agg["scheme"] = [g.split(" | ")[0] for g in agg["group"]]
        table = _metric_table("response_normalized_accuracy", "Normalised accuracy per scheme and sample subset", agg,
                              {"normalised accuracy": "normalized_accuracy"}, {"scheme": "scheme", "subset": "subset"})
        specs = []
        for fig_no, kind in (("fig5", "replace"), ("fig6", "manipulate")):
            part = t[t[kind] != "none"]
            if len(part):
                cats = list(dict.fromkeys(part["scheme"]))
                pts = [(r["scheme"], r["subset"], r["normalized_accuracy"], r["trial"]) for _, r in part.iterrows()]
                specs.append(FigureSpec(f"response_{fig_no}_{kind}", f"Fig. {fig_no[-1]}: {kind}ment schemes",
                                        lambda cats=cats, pts=pts, kind=kind: figs.strip_figure(
                                            cats, pts, "normalised accuracy", f"{kind} (0: weak teacher only, 1: strong)"),
                                        list(part["trial"]), _not_done(ctx)))
        other = t[(t["replace"] == "none") & (t["manipulate"] == "none")]
        if len(other):
            pts = [("none", r["subset"], r["normalized_accuracy"], r["trial"]) for _, r in other.iterrows()]
            specs.append(FigureSpec("response_normalized_other", "Normalised accuracy (no replacement/manipulation)",
                                    lambda pts=pts: figs.strip_figure(["none"], pts, "normalised accuracy"),
                                    list(other["trial"]), _not_done(ctx)))
        views.append(View("response_normalized", "response", "Response-based study: normalised accuracy",
                          "response-based study Figs. 5-6",
                          "(acc - acc-) / (acc+ - acc-) against the students of the weak-only and strong-only teacher "
                          "(stored by `hpckd normalized-accuracy`); each point one run, colour = sample subset.",
                          [table], specs))
    efficient = _efficient_view(ctx)
    if efficient is not None:
        views.append(efficient)
    return views


def _complexity(arch: str, classes: float, size: float) -> tuple[float, float]:
    """Parameters and MACs of an architecture (meta tensors, no weights), when results.json does not store them."""
    try:
        from hpckd.models.complexity import describe_models

        row = describe_models([arch], num_classes=None if pd.isna(classes) else int(classes),
                              input_size=None if pd.isna(size) else int(size))[0]
        return float(row.params), float(row.macs)
    except Exception:  # noqa: BLE001  an unknown or unbuildable arch: the table says N/A
        return math.nan, math.nan


def _efficient_view(ctx: Context) -> View | None:
    g = ctx.groups
    if ctx.study == "response":
        part = g[(g["kd"] == "KD") | (g["n_teachers"] == 0)]
    else:
        part = g[g["loss"].isin(["wsl", "ckm"])]
    part = part[part["accuracy_n"] > 0].copy()
    if part.empty:
        return None
    first = ctx.trials.groupby("group").first()
    sizes = {}
    for grp in part["group"]:
        r = first.loc[grp]
        params, macs = part.loc[part["group"] == grp, ["params_mean", "macs_mean"]].iloc[0]
        if pd.isna(params) or pd.isna(macs):
            params, macs = _complexity(str(r["student_arch"]), r["num_classes"], r["image_size"])
        sizes[grp] = (params, macs)
    part["params_m"] = [sizes[grp][0] / 1e6 for grp in part["group"]]
    part["flops_m"] = [sizes[grp][1] / 1e6 for grp in part["group"]]
    data = _numbers(part, ["group", "student_arch", "teacher_arch", "loss", "params_m", "flops_m"],
                    ["accuracy", "accuracy_top5", "gpu_hours"])
    shown = pd.DataFrame({"trial": part["group"], "student": part["student_arch"], "teacher": part["teacher_arch"],
                          "loss": part["loss"], "Top-1 (%)": formatted(part.assign(
                              a_mean=100 * part["accuracy_mean"], a_std=100 * part["accuracy_std"],
                              a_n=part["accuracy_n"]), "a", 2).values,
                          "Top-5 (%)": formatted(part.assign(
                              a_mean=100 * part["accuracy_top5_mean"], a_std=100 * part["accuracy_top5_std"],
                              a_n=part["accuracy_top5_n"]), "a", 2).values,
                          "Params (M)": ["N/A" if pd.isna(v) else f"{v:.2f}" for v in part["params_m"]],
                          "FLOPs (M)": ["N/A" if pd.isna(v) else f"{v:.1f}" for v in part["flops_m"]],
                          "GPU-hours": formatted(part, "gpu_hours", 3).values}).reset_index(drop=True)
    return View("response_efficient", "response", "Response-based study: Efficient Distillation",
                "response-based study Tables 1-3",
                "Top-1 / top-5 accuracy (%), parameters and FLOPs (multiply-accumulates, the paper's convention) of "
                "the student, and device-hours of the run (wall time x world size / 3600; mean over seeds). Stage runs "
                "of `distill-efficient` (WSL, then CKM) are separate rows.", [Table("response_efficient",
                                                                                    "Efficient Distillation", data, shown)])


def build_views(sweep: Sweep) -> list[View]:
    """Every view the sweep's trials support (only its study's when it has a ``study`` tag)."""
    ctx = _context(sweep)
    views = overview_views(ctx)
    if ctx.trials.empty:
        return views
    if ctx.wants("attention"):
        views += attention_views(ctx)
    views += augmentation_views(ctx)
    views += fidelity_views(ctx)
    views += response_views(ctx)
    return views
