"""The two entry points other layers call: :func:`write_report` and :func:`summary_table`."""

from __future__ import annotations

import os
from pathlib import Path

from hpckd.report.load import ReportError

__all__ = ["ReportError", "summary_table", "write_report"]


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write report.md, tables/*.csv, figures/*.png and report.html for ``sweep_dir`` into ``out_dir`` (default
    ``<sweep_dir>/report``), atomically (built in a temp folder, then renamed into place); returns report.html."""
    from hpckd.report.render import render_report

    return render_report(Path(sweep_dir), None if out_dir is None else Path(out_dir))


def summary_table(sweep_dir: str | os.PathLike) -> str:
    """The terminal table: one row per trial (name, state, accuracy, agreement, ...), failed and missing trials
    shown as such with their error line, and a count of the states."""
    from hpckd.report.render import terminal_table

    return terminal_table(Path(sweep_dir))
