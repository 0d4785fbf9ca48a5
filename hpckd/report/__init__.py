"""Reports: a sweep folder's results files turned into the papers' tables and figures (L8).

Reads files only (``sweep.json``, each job's ``results.json`` and ``sweep-<stage>.*.json`` state files); never
recomputes a metric and never imports :mod:`hpckd.sweep` (which sits above it and calls it as its last stage).
"""

from __future__ import annotations

from hpckd.report.api import ReportError, summary_table, write_report

__all__ = ["ReportError", "summary_table", "write_report"]
