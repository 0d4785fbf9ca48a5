"""Numbers over seeds: mean, sample standard deviation and count per trial group (pandas).

The papers report "mean (std)" over random runs (augmentation study Tab. 1: 3 runs; fidelity study: mu +- sigma
over 3 trials); the report does the same over the seeds of a trial: ``std`` with ``ddof=1`` (the sample standard
deviation, NaN for a single run, shown without a +- part), ``n`` the number of finished runs that stored the value.
Only finished (``done``) trials enter an aggregate; the others are listed, with their state, never dropped
silently (``runs`` / ``states`` columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

STD_DDOF = 1  # sample standard deviation over seeds
DESCRIPTORS = ("dataset", "teachers", "n_teachers", "teacher_arch", "student_arch", "aug", "da", "loss", "kd",
               "half_split", "replace", "manipulate", "subset", "epochs")


def state_summary(states: Sequence[str]) -> str:
    """``"2 done, 1 failed"`` for a list of trial states (in the order done, failed, blocked, missing)."""
    counts = pd.Series(list(states), dtype=object).value_counts()
    order = ["done", "failed", "blocked", "missing"]
    return ", ".join(f"{int(counts[s])} {s}" for s in [*order, *sorted(set(counts.index) - set(order))] if s in counts)


def aggregate(trials: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = ("group",)) -> pd.DataFrame:
    """One row per ``by`` group: its descriptors (from its first trial), ``runs`` (trials in any state),
    ``states``, and for each metric ``<m>_mean``, ``<m>_std`` (ddof 1) and ``<m>_n`` over its finished trials."""
    by = list(by)
    if trials.empty:
        return pd.DataFrame(columns=[*by, "runs", "states"])
    keys = trials[by].drop_duplicates()
    done = trials[trials["state"] == "done"]
    present = [m for m in metrics if m in trials.columns]
    stats = done.groupby(by, sort=False)[present].agg(["mean", lambda s: s.std(ddof=STD_DDOF), "count"])
    stats.columns = [f"{m}_{'std' if f.startswith('<lambda') else ('n' if f == 'count' else f)}" for m, f in stats.columns]
    info = trials.groupby(by, sort=False).agg(runs=("trial", "size"), states=("state", state_summary))
    first = trials.groupby(by, sort=False)[[c for c in DESCRIPTORS if c in trials.columns and c not in by]].first()
    out = keys.merge(first.reset_index(), on=by, how="left").merge(info.reset_index(), on=by, how="left")
    out = out.merge(stats.reset_index(), on=by, how="left")
    for m in present:
        out[f"{m}_n"] = out[f"{m}_n"].fillna(0).astype(int)
    for m in metrics:
        if m not in present:
            out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_n"] = math.nan, math.nan, 0
    return out.reset_index(drop=True)


def fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    """``0.8123 ± 0.0040 (n=3)``; one run: ``0.8123 (n=1)``; no run: ``N/A``."""
    if not n or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "N/A"
    text = f"{mean:.{digits}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {std:.{digits}f}"
    return f"{text} (n={n})"


def formatted(agg: pd.DataFrame, metric: str, digits: int = 4) -> pd.Series:
    """The ``mean ± std (n)`` text of ``metric`` for every row of an :func:`aggregate` table."""
    return pd.Series([fmt(r[f"{metric}_mean"], r[f"{metric}_std"], int(r[f"{metric}_n"]), digits)
                      for _, r in agg.iterrows()], index=agg.index, dtype=object)


def has(agg: pd.DataFrame, metric: str, at_least: int = 1) -> bool:
    """Whether at least ``at_least`` groups have a value of ``metric``."""
    column = f"{metric}_n"
    return column in agg.columns and int((agg[column] > 0).sum()) >= at_least
