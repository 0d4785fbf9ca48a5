"""``hpckd bench``: the statistics helpers against numpy (fast), the command's errors, and one tiny CPU run of every
suite whose JSON and markdown are checked against numbers recomputed here from the JSON's raw samples (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpckd.bench import SUITES, timing
from tests.helpers import assert_one_line_error, run_hpckd

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 25])
def test_percentiles_and_summary_match_numpy(n):
    values = list(RNG.exponential(100.0, size=n))
    for q in (0, 10, 25, 50, 75, 90, 100):
        assert timing.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    s = timing.summarize(values)
    assert s["median"] == pytest.approx(float(np.median(values)), rel=1e-12)
    assert (s["min"], s["max"], s["n"]) == (min(values), max(values), n)
    assert s["q1"] == pytest.approx(float(np.percentile(values, 25)))
    assert s["q3"] == pytest.approx(float(np.percentile(values, 75)))


def test_window_rates_are_images_over_seconds_of_contiguous_windows():
    durations = list(RNG.uniform(0.01, 0.2, size=10))
    counts = list(RNG.integers(1, 64, size=10))
    rates = timing.window_rates(durations, counts, 3)
    splits = np.split(np.arange(10), [3, 7])  # round(10/3)=3, round(20/3)=7: windows of 3, 4, 3 steps
    expected = [sum(counts[i] for i in idx) / sum(durations[i] for i in idx) for idx in splits]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert timing.window_rates([0.5, 0.5], 8, 5) == pytest.approx([16.0, 16.0])  # fewer steps than windows
    with pytest.raises(ValueError):
        timing.window_rates([], 8, 3)


def test_step_clock_drops_intervals_across_epoch_ends_and_the_warmup():
    clock = timing.StepClock()
    clock.stamps = [(0, 0.0), (0, 1.0), (0, 3.0), (1, 10.0), (1, 10.5), (1, 11.5)]
    assert clock.durations(0) == [1.0, 2.0, 0.5, 1.0]  # 3.0 -> 10.0 spans the evaluation: dropped
    assert clock.durations(1) == [2.0, 0.5, 1.0]


def test_ratios_divide_each_median_by_its_baseline_median():
    rows = [timing.row("a", [10.0, 20.0, 30.0], baseline="a"), timing.row("b", [5.0, 45.0], baseline="a")]
    timing.add_ratios(rows)
    assert [r["ratio"] for r in rows] == pytest.approx([1.0, 25.0 / 20.0])


def test_unknown_suite_is_one_line_error(tmp_path):
    proc = run_hpckd("bench", "loaders", "nope", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "b"))
    assert_one_line_error(proc, "unknown suite(s) nope", "end-to-end")
    assert not (tmp_path / "b" / "bench.json").exists()


@pytest.mark.slow
def test_tiny_bench_runs_every_suite_on_cpu(tmp_path):
    out = tmp_path / "bench"
    proc = run_hpckd("bench", "--size", "tiny", "--device", "cpu", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["size"] == "tiny" and report["device"] == "cpu"
    assert sorted(report["suites"]) == sorted(SUITES)  # every suite
    hw = report["hardware"]
    assert hw["cpu"] and hw["cores"] >= 1 and hw["usable_cores"] >= 1 and "gpu" in hw
    assert report["versions"]["torch"] and report["versions"]["python"]
    md = (out / "bench.md").read_text()
    assert hw["cpu"] in md
    for name, suite in report["suites"].items():
        assert f"## {name}" in md
        rows = {r["name"]: r for r in suite["rows"]}
        assert len(rows) >= 2, name  # a baseline and at least one row against it
        for r in rows.values():
            stats = r["images_per_s"]
            samples = stats["samples"]
            assert len(samples) >= 2 and all(v > 0 for v in samples), (name, r["name"])  # several repetitions
            assert stats["median"] == pytest.approx(float(np.median(samples)))
            assert stats["min"] <= stats["median"] <= stats["max"]
            base = rows[r["baseline"]]["images_per_s"]["median"]
            assert r["ratio"] == pytest.approx(stats["median"] / base, rel=1e-9), (name, r["name"])
            assert r["peak_host_rss_mib"] > 0
            assert f"| {r['name']} | {stats['median']:.1f} |" in md
    loaders = {r["name"] for r in report["suites"]["loaders"]["rows"]}
    for policy in ("weak", "strong"):
        assert {f"{policy}/torchvision", f"{policy}/hpckd-torch", f"{policy}/dali-inputs"} <= loaders
    assert {r["name"] for r in report["suites"]["kd-step"]["rows"]} == {
        "student-only", "inline 1 teacher", "inline 2 teachers", "cached 2 teachers"}
    overhead = report["suites"]["overhead"]
    rounds = overhead["round_step_ms"]  # per round, paired: the loop's cost is the median of the differences
    diffs = np.subtract(rounds["hpckd engine"], rounds["bare PyTorch loop"])
    assert overhead["summary"]["loop overhead per step, ms"] == pytest.approx(float(np.median(diffs)))
    for r in overhead["rows"]:
        assert r["step_ms"] == pytest.approx(1000 * overhead["setup"]["batch"] / r["images_per_s"]["median"])
    scaling = {r["processes"]: r for r in report["suites"]["scaling"]["rows"]}
    assert set(scaling) == {1, 2}
    assert scaling[2]["efficiency"] == pytest.approx(scaling[2]["ratio"] / 2)


def test_cuda_without_a_gpu_and_unknown_names_are_bench_errors(tmp_path):
    import torch

    from hpckd.bench import BenchError, resolve_device, run_suites

    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(BenchError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    for names, size, device, fragment in ((["teacher"], "tiny", "cpu", "unknown suite"),
                                          (["teachers"], "huge", "cpu", "unknown size"),
                                          (["teachers"], "tiny", "tpu", "unknown device")):
        with pytest.raises(BenchError, match=fragment):
            run_suites(names, size, device, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing written before the arguments are checked
