"""Write a report folder: report.md, tables/<name>.csv, figures/<name>.png and a self-contained report.html.

Atomic as a whole: everything is written into a temp folder beside the destination, which then replaces the old
report by renames (old -> aside, new -> in place, aside removed). A failure while building (a figure that raises,
a full disk) removes the temp folder and leaves the previous report as it was; a reader never sees a half-written
report folder. Each file inside is also written temp-then-rename (:mod:`hpckd.io`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import html
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from hpckd.io import atomic_open, atomic_write_text, check_output_dir, temp_folder_beside
from hpckd.report.figures import png_bytes
from hpckd.report.load import Sweep, load_sweep
from hpckd.report.views import FigureSpec, Table, View, build_views

STATE_CLASS = {"done": "done", "failed": "failed", "blocked": "blocked", "missing": "missing"}
CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f0f0f0}td.state-failed,td.state-blocked{background:#fdd;font-weight:bold}
td.state-missing{background:#ffd;font-weight:bold}.warn{background:#fdd;border:1px solid #c00;padding:0.5em}
figure{margin:1em 0}figcaption{font-size:13px;color:#444}img{max-width:100%}"""


def _csv(table: Table) -> str:
    return table.data.to_csv(index=False)


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True) if len(frame.columns) else "(empty)"


def _html_table(frame: pd.DataFrame) -> str:
    """pandas' HTML table, with each ``state`` cell classed so failed / missing / blocked trials stand out."""
    escaped = frame.map(lambda v: html.escape(str(v)))
    out = escaped.to_html(index=False, escape=False, border=0, na_rep="N/A")
    if "state" not in frame.columns:
        return out
    for value in frame["state"].astype(str).unique():
        cls = STATE_CLASS.get(value.lower())
        if cls and value.isupper():  # the views write every state but done in capitals (FAILED, MISSING, ...)
            out = out.replace(f"<td>{html.escape(value)}</td>", f'<td class="state-{cls}">{html.escape(value)}</td>')
    return out


def _caption(spec: FigureSpec) -> str:
    text = f"{spec.title}. Trials: {', '.join(spec.trials) or 'none'}."
    if spec.left_out:
        text += f" Not shown: {'; '.join(spec.left_out)}."
    return text


def _header(sweep: Sweep) -> tuple[str, list[str]]:
    t = sweep.trials
    counts = t["state"].value_counts().to_dict() if len(t) else {}
    line = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "blocked", "missing") if s in counts) or "no trials"
    warnings = []
    if counts.get("failed"):
        names = t.loc[t["state"] == "failed", ["trial", "detail"]]
        warnings.append(f"{counts['failed']} trial(s) FAILED: " + "; ".join(f"{r.trial}: {r.detail}"
                                                                           for r in names.itertuples()))
    for state in ("blocked", "missing"):
        if counts.get(state):
            warnings.append(f"{counts[state]} trial(s) {state.upper()}: " +
                            ", ".join(t.loc[t["state"] == state, "trial"]))
    # teachers, data, logits, report (a failed evaluation already shows on its trial's row)
    jobs = sweep.jobs
    failed_teachers = jobs[~jobs["stage"].isin(["students", "evaluation"]) & (jobs["state"] == "failed")]
    for r in failed_teachers.itertuples():
        warnings.append(f"{r.stage} job {r.name} FAILED: {r.detail}")
    return line, warnings


def _write_figures(views: list[View], folder: Path) -> dict[str, bytes]:
    pngs = {}
    for view in views:
        for spec in view.figures:
            data = png_bytes(spec.make())
            with atomic_open(folder / "figures" / f"{spec.name}.png", "wb") as handle:
                handle.write(data)
            pngs[spec.name] = data
    return pngs


def _markdown_report(sweep: Sweep, views: list[View], line: str, warnings: list[str]) -> str:
    out = [f"# Report: sweep {sweep.name}", "",
           f"- folder: `{sweep.root}`", f"- study: {sweep.study or 'not tagged (every view the trials support)'}",
           f"- config: `{sweep.source}` (planned {sweep.written})", f"- trials: {line}",
           f"- written: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", ""]
    out += [f"> **{w}**" for w in warnings] + ([""] if warnings else [])
    for view in views:
        redraws = f"*Redraws: {view.source}.* " if view.source else ""
        out += [f"## {view.title}", "", redraws + view.text, ""]
        for table in view.tables:
            out += [f"**{table.title}** (`tables/{table.name}.csv`)", "", _markdown(table.shown), ""]
        for spec in view.figures:
            out += [f"![{spec.title}](figures/{spec.name}.png)", "", f"*{_caption(spec)}*", ""]
    return "\n".join(out) + "\n"


def _html_report(sweep: Sweep, views: list[View], pngs: dict[str, bytes], line: str, warnings: list[str]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>hpckd report: {e(sweep.name)}</title><style>{CSS}</style></head><body>",
           f"<h1>Report: sweep {e(sweep.name)}</h1>",
           f"<p>folder <code>{e(str(sweep.root))}</code>; study: {e(sweep.study or 'not tagged')}; "
           f"config <code>{e(sweep.source)}</code>; trials: {e(line)}</p>"]
    out += [f'<p class="warn">{e(w)}</p>' for w in warnings]
    for view in views:
        redraws = f"<em>Redraws: {e(view.source)}.</em> " if view.source else ""
        out += [f'<h2 id="{e(view.key)}">{e(view.title)}</h2>', f"<p>{redraws}{e(view.text)}</p>"]
        for table in view.tables:
            out += [f"<h3>{e(table.title)}</h3>", _html_table(table.shown)]
        for spec in view.figures:
            encoded = base64.b64encode(pngs[spec.name]).decode("ascii")
            out += [f'<figure id="fig-{e(spec.name)}"><img alt="{e(spec.title)}" src="data:image/png;base64,{encoded}">',
                    f"<figcaption>{e(_caption(spec))}</figcaption></figure>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_into(sweep: Sweep, folder: Path) -> Path:
    """Write every file of the report of ``sweep`` into ``folder`` (which is new and empty); report.html's path."""
    views = build_views(sweep)
    line, warnings = _header(sweep)
    for view in views:
        for table in view.tables:
            atomic_write_text(folder / "tables" / f"{table.name}.csv", _csv(table))
    pngs = _write_figures(views, folder)
    atomic_write_text(folder / "report.md", _markdown_report(sweep, views, line, warnings))
    atomic_write_text(folder / "report.html", _html_report(sweep, views, pngs, line, warnings))
    return folder / "report.html"


def _swap_into_place(new: Path, out: Path) -> None:
    """Replace ``out`` by ``new``: the old report goes aside (one rename), the new one takes its name (one
    rename), then the old one is removed; ``out`` is never a partial folder."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, aside / out.name)
    try:
        os.replace(new, out)
    except OSError:
        if aside is not None:  # put the old report back
            os.replace(aside / out.name, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def render_report(root: Path, out: Path | None = None) -> Path:
    """Read the sweep at ``root`` and write its report folder ``out`` (default ``root/report``) atomically."""
    sweep = load_sweep(root)
    out = Path(out) if out is not None else root / "report"
    check_output_dir(out, "report folder")  # one line, before any work, when it cannot be written
    tmp = temp_folder_beside(out, f".{out.name}.")
    try:
        build_into(sweep, tmp)
        _swap_into_place(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return out / "report.html"


def terminal_table(root: Path) -> str:
    """One row per trial: name, state, accuracy, agreement, KL, IoU and the error line of a failed trial."""
    sweep = load_sweep(root)
    t = sweep.trials
    if t.empty:
        return "no trials in sweep.json"
    shown = pd.DataFrame({
        "trial": t["trial"], "state": [s if s == "done" else s.upper() for s in t["state"]],
        **{label: ["-" if pd.isna(v) else f"{v:.4f}" for v in t[col]]
           for label, col in (("accuracy", "accuracy"), ("agreement", "top1_agreement"), ("KL", "predictive_kl"),
                              ("IoU", "teacher_iou"))},
        "detail": [d if len(d) <= 80 else d[:77] + "..." for d in t["detail"]]})
    line, _ = _header(sweep)
    return shown.to_markdown(index=False, tablefmt="simple", disable_numparse=True) + f"\n{len(t)} trials: {line}"
