"""One live run per out_dir: a second run fails at once with one line naming the holder; a killed holder's lock
blocks nobody. The holders here are real processes (``python -c`` holding :class:`hpckd.runlock.RunLock`), in step
with the test through the line they print once they hold the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpckd.runlock import LOCK_NAME, RunLock, RunLocked, check_lock_free
from tests.helpers import REPO, assert_one_line_error, run_hpckd, tiny_run_args

HOLD = ("import sys; from hpckd.runlock import RunLock\n"
        "with RunLock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()  # hold until the test closes our stdin\n")


def start_holder(out_dir: Path, **env: str) -> subprocess.Popen:
    """A process holding ``out_dir``'s lock; returns once it has said so."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**clean, **env})
    assert proc.stdout.readline() == "locked\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("env, job", [({"SLURM_JOB_ID": "4242"}, "SLURM job 4242"),
                                      ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242",
                                        "SLURM_ARRAY_TASK_ID": "7"}, "SLURM job 4242_7")])
def test_a_second_holder_gets_one_line_naming_the_first(tmp_path, env, job):
    out = tmp_path / "run"
    holder = start_holder(out, **env)
    try:
        with pytest.raises(RunLocked) as taken:
            with RunLock(out):
                pytest.fail("took a lock that a live process holds")
        message = str(taken.value)
        assert "\n" not in message
        assert message.startswith(f"out_dir {out} is in use by a running hpckd job (host {socket.gethostname()}, "
                                  f"pid {holder.pid}, {job}, started ")
        assert message.endswith("); wait for it or use another out_dir")
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            check_lock_free(out)  # the torchrun wrapper's probe sees it too
    finally:
        release(holder)
    check_lock_free(out)  # released on a clean exit
    with RunLock(out):
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()


def test_the_lock_of_a_killed_run_blocks_nobody(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out, SLURM_JOB_ID="99")
    os.kill(holder.pid, signal.SIGKILL)  # as the OOM killer or a node failure would: no cleanup runs
    assert holder.wait(timeout=60) == -signal.SIGKILL
    # Its record is still there (nothing removed it) ...
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    # ... but the kernel dropped its lock with the process: a resume goes ahead.
    check_lock_free(out)
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_free_folder_without_a_lock_file_is_free_and_left_alone(tmp_path):
    check_lock_free(tmp_path / "never-used")
    assert not (tmp_path / "never-used").exists()  # the probe creates nothing


def test_the_lock_file_honours_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with RunLock(tmp_path / "run"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "run" / LOCK_NAME).stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("dist.nproc_per_node=2",)], ids=["one-process", "torchrun-wrapper"])
def test_hpckd_train_into_a_held_out_dir_fails_at_once(tmp_path, tiny_root, extra):
    """`hpckd train` into a folder another run holds: one line naming the holder, exit 2, and the holder's folder
    untouched (no log, no checkpoint of the second run). The 2-process command fails in the wrapper, before
    torchrun starts any rank."""
    out = tmp_path / "run"
    holder = start_holder(out, SLURM_JOB_ID="4242")
    try:
        proc = run_hpckd("train", *tiny_run_args(tiny_root, out, *extra), timeout=300)
        assert_one_line_error(proc, f"out_dir {out} is in use by a running hpckd job", f"pid {holder.pid}",
                              "SLURM job 4242", "wait for it or use another out_dir")
        assert proc.returncode == 2
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        release(holder)
