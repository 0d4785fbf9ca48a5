"""KD step throughput of the real training loop (student-only, inline 1/2 teachers, cached 2 teachers):
the ``kd-step`` suite of ``hpckd bench`` (code in hpckd/bench/kd_step.py).

    python benchmarks/kd_step.py [--size tiny|small|full] [--device auto|cpu|cuda] [--out DIR]

is ``hpckd bench kd-step ...``: results in DIR/bench.json and DIR/bench.md (default runs/bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpckd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "kd-step", *sys.argv[1:]]))
