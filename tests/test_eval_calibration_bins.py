"""A run's results.json carries the reliability-diagram bins of its last evaluation (what `hpckd report` draws as
the attention study's Fig. A.4), checked against bins computed here in numpy from the saved model's own logits."""

from __future__ import annotations

import json

import numpy as np

from hpckd.train.engine import run
from tests.helpers import train_config, val_logits

N_BINS = 15  # metrics.n_bins default (Guo et al. 2017)


def numpy_bins(logits: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[list[int], list[float], list[float]]:
    """Counts, accuracy and mean confidence per equal-width bin of the top-1 softmax probability (right-closed
    bins, a confidence of exactly 0 in the first), empty bins NaN."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = [int((idx == b).sum()) for b in range(n_bins)]
    acc = [float((pred[idx == b] == labels[idx == b]).mean()) if counts[b] else float("nan") for b in range(n_bins)]
    mean_conf = [float(conf[idx == b].mean()) if counts[b] else float("nan") for b in range(n_bins)]
    return counts, acc, mean_conf


def test_results_store_the_last_evaluations_reliability_bins(synth_root, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    run(train_config(synth_root, out, "optim.epochs=1"), mode="train")
    results = json.loads((out / "results.json").read_text())
    bins = results["reliability"]["student"]
    assert "teacher" not in results["reliability"]  # a teacher run has no teachers to bin
    logits = val_logits(out / "last.pt", synth_root)
    labels = np.repeat(np.arange(4), 10)  # synth_root: 4 classes x 10 val images, files sorted by class folder
    counts, acc, conf = numpy_bins(logits, labels, N_BINS)
    assert np.allclose(bins["edges"], np.linspace(0, 1, N_BINS + 1))
    assert bins["counts"] == counts and sum(counts) == 40
    for got, want in ((bins["accuracy"], acc), (bins["confidence"], conf)):
        assert np.allclose(np.array(got, dtype=float), np.array(want), atol=1e-5, equal_nan=True)
