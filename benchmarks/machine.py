"""What machine a benchmark ran on (kept for the scripts here; the code lives in :mod:`hpckd.bench.timing`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpckd.bench.timing import cpu_model, hardware, load_average  # noqa: E402,F401
