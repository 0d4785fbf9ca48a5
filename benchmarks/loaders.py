"""Loader throughput (DALI, hpckd's torch loader, torchvision; weak/strong; DALI's input preparation):
the ``loaders`` suite of ``hpckd bench`` (code in hpckd/bench/loaders.py).

    python benchmarks/loaders.py [--size tiny|small|full] [--device auto|cpu|cuda] [--out DIR]

is ``hpckd bench loaders ...``: results in DIR/bench.json and DIR/bench.md (default runs/bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpckd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "loaders", *sys.argv[1:]]))
