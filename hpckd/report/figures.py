"""The report's plot kinds, drawn headless with matplotlib's object API (no pyplot state, no display needed).

Every function returns a :class:`matplotlib.figure.Figure`; :func:`png_bytes` renders it. Every figure names its
trials: scatter points carry their trial's label, bars and lines are labelled by trial group in the axis or legend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # headless: a cluster node or CI has no display

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

DPI = 100


@dataclass
class Scatter:
    """One scatter panel: a point per trial group with its label, optional +- std error bars."""

    x: Sequence[float]
    y: Sequence[float]
    labels: Sequence[str]
    xlabel: str
    ylabel: str
    title: str = ""
    xerr: Sequence[float] | None = None
    yerr: Sequence[float] | None = None
    series: Sequence[str] | None = None  # colour by series (e.g. teacher/student pair), legend


@dataclass
class Bars:
    """One bar panel: categories on the x axis, one bar per series, +- std error bars, optional reference lines."""

    categories: Sequence[str]
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (means, stds)
    ylabel: str
    title: str = ""
    hlines: Mapping[str, float] = field(default_factory=dict)  # label -> y (e.g. the independent-student baseline)


@dataclass
class Lines:
    """One line panel: per series, x values and mean with a shaded +- std band."""

    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]  # label -> (x, mean, std)
    xlabel: str
    ylabel: str
    title: str = ""


def _nan_to_zero(values: Sequence[float] | None) -> list[float] | None:
    if values is None:
        return None
    return [0.0 if (v is None or math.isnan(v)) else float(v) for v in values]


def _grid(n: int, width: float = 4.6, height: float = 3.8) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def scatter_figure(panels: Sequence[Scatter], title: str = "") -> Figure:
    """Scatter panels with every point labelled by its trial (attention study Figs. 2, 3, 5; augmentation study
    Fig. 4)."""
    fig, axes = _grid(len(panels))
    for ax, p in zip(axes, panels):
        series = list(p.series) if p.series is not None else [""] * len(p.x)
        for name in dict.fromkeys(series):
            idx = [i for i, s in enumerate(series) if s == name]
            ax.errorbar([p.x[i] for i in idx], [p.y[i] for i in idx],
                        xerr=None if p.xerr is None else _nan_to_zero([p.xerr[i] for i in idx]),
                        yerr=None if p.yerr is None else _nan_to_zero([p.yerr[i] for i in idx]),
                        fmt="o", capsize=3, label=name or None)
        for x, y, label in zip(p.x, p.y, p.labels):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title, fontsize=9)
        ax.grid(alpha=0.3)
        if any(series):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def bar_figure(panels: Sequence[Bars], title: str = "") -> Figure:
    """Grouped bars with +- std error bars (attention study Fig. 4, fidelity study Figs. 3, 5)."""
    fig, axes = _grid(len(panels), width=max(4.6, 0.55 * max(len(p.categories) for p in panels) + 2.5))
    for ax, p in zip(axes, panels):
        k = max(1, len(p.series))
        width = 0.8 / k
        positions = list(range(len(p.categories)))
        for j, (label, (means, stds)) in enumerate(p.series.items()):
            xs = [x - 0.4 + width * (j + 0.5) for x in positions]
            ax.bar(xs, _nan_to_zero(means), width, yerr=_nan_to_zero(stds), capsize=3, label=label)
        for label, y in p.hlines.items():
            ax.axhline(y, linestyle="--", color="k", linewidth=1, label=label)
        ax.set_xticks(positions)
        ax.set_xticklabels(list(p.categories), rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if len(p.series) > 1 or p.hlines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def line_figure(panels: Sequence[Lines], title: str = "") -> Figure:
    """Lines with a shaded +- std band (augmentation study Figs. 2, 7: test error against epochs)."""
    fig, axes = _grid(len(panels), width=5.5)
    for ax, p in zip(axes, panels):
        for label, (xs, means, stds) in p.series.items():
            ax.plot(xs, means, marker="o", markersize=3, label=label)
            lo = [m - (0.0 if math.isnan(s) else s) for m, s in zip(means, stds)]
            hi = [m + (0.0 if math.isnan(s) else s) for m, s in zip(means, stds)]
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def reliability_figure(diagrams: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """Reliability diagrams (attention study Fig. A.4, after Guo et al. 2017): per trial, the accuracy of each
    confidence bin against the bin's mean confidence, with the diagonal of perfect calibration."""
    fig, axes = _grid(len(diagrams), width=3.6, height=3.6)
    for ax, (name, d) in zip(axes, diagrams.items()):
        n = len(d["accuracy"])
        edges = list(d.get("edges") or [i / n for i in range(n + 1)])
        lefts = edges[:-1]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(lefts, _nan_to_zero(d["accuracy"]), widths, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def strip_figure(categories: Sequence[str], points: Sequence[tuple[str, str, float, str]], ylabel: str,
                 title: str = "") -> Figure:
    """Every run as one point (response-based study Figs. 5-6): ``points`` are (category, colour group, value,
    trial); categories on the x axis, colours by group, small horizontal offsets per group so they do not hide."""
    fig = Figure(figsize=(max(5.0, 1.2 * len(categories) + 2), 4.0), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    groups = list(dict.fromkeys(p[1] for p in points))
    for j, group in enumerate(groups):
        offset = (j - (len(groups) - 1) / 2) * 0.12
        mine = [p for p in points if p[1] == group]
        ax.plot([categories.index(p[0]) + offset for p in mine], [p[2] for p in mine], "o", label=group)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(list(categories), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="samples")
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
