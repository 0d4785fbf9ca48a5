"""Sweep execution without a cluster: the ``--wait`` progress table and lines, the per-trial requeue limit, and the
local executor's rolling window (a free slot is refilled at once, never more than ``local_parallel`` jobs run).

The rendering tests use hand-made status rows; the window test runs a tiny real sweep on the local executor and
reads what its jobs wrote (their own ``started``/``done`` state files), never the clock of this test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_hpckd


def _rows(*spec: tuple[str, str]):
    from hpckd.sweep.runner import Row

    return [Row(stage, f"{stage}-{i}", state) for i, (stage, state) in enumerate(spec)]


def test_progress_table_has_a_bar_per_stage_with_done_failed_and_active_cells():
    from hpckd.sweep.runner import format_progress

    rows = _rows(("data", "done"),
                 ("teachers", "done"), ("teachers", "done"), ("teachers", "failed"), ("teachers", "running"),
                 ("students", "pending"), ("students", "requeued"), ("students", "blocked"), ("students", "done"),
                 ("students", "new"))
    assert format_progress(rows, width=20).splitlines() == [
        "stage       progress                    done  other",
        "data        [####################]       1/1",
        # 2 of 4 done = 10 cells, 1 failed = 5 cells, 1 running = 5 cells
        "teachers    [##########xxxxx>>>>>]       2/4  1 running, 1 failed",
        # 1 of 5 done = 4 cells, 1 blocked = 4, 2 active (pending, requeued) = 8; the new one is left blank
        "students    [####xxxx>>>>>>>>    ]       1/5  1 pending, 1 requeued, 1 blocked, 1 new",
    ]


def test_redraw_moves_up_over_the_previous_block_and_clears_it():
    from hpckd.sweep.runner import redraw

    assert redraw(0, "a\nb") == "a\nb\n"  # the first draw: nothing to replace
    assert redraw(3, "x") == "\x1b[3F\x1b[Jx\n"  # cursor to the start of 3 lines up, clear to the end, draw


def test_progress_line_for_logs_names_every_stage_once():
    from hpckd.sweep.runner import progress_line

    rows = _rows(("data", "done"), ("teachers", "done"), ("teachers", "requeued"))
    assert progress_line(rows) == "data [##########] 1/1 | teachers [#####     ] 1/2 (1 requeued)"


def hand_made_sweep(root: Path) -> None:
    """A finished sweep folder written by hand: one data job done, one failed."""
    from hpckd.sweep.jobs import write_state

    entries = []
    for name, kind in (("ok", "done"), ("bad", "error")):
        folder = root / "datasets" / name
        write_state(folder, "data", kind, {"time": "2026-01-01T00:00:00+00:00", "config_hash": "h", "error": "E: x"})
        entries.append({"key": f"data/{name}", "stage": "data", "name": name, "folder": str(folder), "deps": [],
                        "config_hash": "h"})
    (root / "sweep.json").write_text(json.dumps({"name": "hand", "jobs": entries}))


def test_follow_without_a_terminal_prints_one_plain_line_when_nothing_is_active(tmp_path):
    """``follow`` prints the progress line once, without escape codes, and returns at once (nothing is queued or
    running)."""
    from hpckd.sweep.runner import follow

    hand_made_sweep(tmp_path)
    lines: list[str] = []
    rows = follow(tmp_path, poll_s=0.01, echo=lines.append, live=False)
    assert [r.state for r in rows] == ["done", "failed"]
    assert lines == ["data [#####     ] 1/2 (1 failed)"]


def test_follow_on_a_terminal_draws_the_table_once_when_nothing_is_active(tmp_path, capsys):
    from hpckd.sweep.runner import follow, format_progress

    hand_made_sweep(tmp_path)
    lines: list[str] = []
    rows = follow(tmp_path, poll_s=0.01, echo=lines.append, live=True)
    assert lines == []  # the table goes to the terminal itself, redrawn in place
    table = format_progress(rows)
    assert capsys.readouterr().out == table + "\n"
    assert table.splitlines()[1] == "data        [############xxxxxxxxxxxx]       1/2  1 failed"


def test_requeue_limit_counts_every_requeue_and_refuses_past_the_limit():
    from hpckd.sweep.executor import RequeueLimit, RequeueLimitReached, with_requeue_limit
    from hpckd.sweep.jobs import DataJob
    from hpckd.train.job import TrainJob

    train = TrainJob("train", "config.yaml", [])
    wrapped = with_requeue_limit(train, 2, "stages.students.max_requeues")
    assert isinstance(wrapped, RequeueLimit) and wrapped.call is train
    first = wrapped.checkpoint()  # the first preemption: requeued as the same call, one requeue spent
    assert first.function.requeues == 1 and first.function.call is train
    second = first.function.checkpoint()
    assert second.function.requeues == 2
    with pytest.raises(RequeueLimitReached, match=r"^requeued 2 times, limit 2 \(stages\.students\.max_requeues\)"):
        second.function.checkpoint()  # a third preemption: the job fails instead
    data = DataJob("folder", "hash", None)
    assert with_requeue_limit(data, 2) is data  # not checkpointable: never requeued, nothing to limit


@pytest.mark.slow
def test_local_executor_refills_a_free_slot_at_once_and_never_runs_more_than_local_parallel(tmp_path):
    """Three student-only trials, two at a time: ``slow`` (many epochs) and ``a`` start together; ``b`` must start
    when ``a`` ends, before ``slow`` is done (chunks of two would hold it back until ``slow`` ends)."""
    cfg = {
        "name": "window", "out_dir": str(tmp_path / "sweep"), "report": False, "local_parallel": 2,
        "base": {"model": {"arch": "resnet8"}, "log_every": 1,
                 "data": {"loader": "torch", "num_workers": 0, "batch_size": 32, "eval_batch_size": 32},
                 "optim": {"epochs": 1, "lr": 0.05}},
        "datasets": {"tiny": {"overrides": ["data.root={sweep}/data/tiny"],
                              "synth": {"classes": 4, "per_class": 16, "val_per_class": 4, "seed": 0}}},
        "trials": [{"name": "slow", "overrides": ["optim.epochs=120"]}, {"name": "a"}, {"name": "b"}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_hpckd("sweep", "run", str(path), "--executor", "local", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp_path / "sweep" / "trials"

    def mtime(name: str, kind: str) -> int:  # the state files are written by rename: their mtime is the write
        return (root / name / f"sweep-students.{kind}.json").stat().st_mtime_ns

    spans = {name: (mtime(name, "started"), mtime(name, "done")) for name in ("slow", "a", "b")}
    assert spans["b"][0] > spans["a"][1], spans  # b waited for a free slot ...
    assert spans["b"][0] < spans["slow"][1], spans  # ... and got a's, while slow still ran
    events = sorted([(t0, 1) for t0, _ in spans.values()] + [(t1, -1) for _, t1 in spans.values()])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 2, spans
    order = [line for line in proc.stdout.splitlines() if line.startswith("students: running")]
    assert order == [f"students: running {n} on the local executor" for n in ("slow", "a", "b")], proc.stdout
