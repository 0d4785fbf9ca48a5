"""Shared fixtures: small generated data sets and the torch thread settings. Plain helper functions (running the
real `hpckd` command, numpy references, ...) live in ``tests/helpers.py``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpckd.data.synth import SynthSpec, write_imagefolder

# Re-exported for tests written against the older `from tests.conftest import run_hpckd`; new code imports them
# from tests.helpers.
from tests.helpers import REPO, assert_one_line_error, run_hpckd  # noqa: F401


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """4 classes x 48 train / 10 val images of 32x32 (session-wide, read-only for tests)."""
    root = tmp_path_factory.mktemp("synth")
    write_imagefolder(root, SynthSpec(classes=4, per_class=48, val_per_class=10, seed=0))
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors on a loaded 2-core machine are much faster on one thread (no OpenMP hand-off)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for this test, whatever an earlier test in the process set (an in-process demo job sets
    its own share), restored afterwards. Tiny tensors: more threads only add contention on a 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ reliability helpers (real processes, real files)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 classes x 8 train / 2 val images of 32x32: the smallest set a run trains on (session-wide, read-only)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_imagefolder(root, SynthSpec(classes=2, per_class=8, val_per_class=2, seed=0))
    return root


def tiny_run_args(data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    """Overrides of a run that takes a few seconds: resnet8, the torch loader, one worker, batch 8."""
    return [f"data.root={data_root}", f"out_dir={out_dir}", "model.arch=resnet8", "data.loader=torch",
            "data.num_workers=1", "data.batch_size=8", "data.eval_batch_size=4", "optim.epochs=1", *extra]


def make_undecodable(jpeg: Path) -> None:
    """Rewrite a JPEG in place so that its header, markers and end-of-image marker stay valid (hpckd's index-time
    check passes it) but decoding fails: the start-of-scan segment names a component the frame does not have."""
    data = jpeg.read_bytes()
    sos = data.index(b"\xff\xda")
    with open(jpeg, "r+b") as handle:  # in place: the folder's mtime stays, as with an edit by another tool
        handle.seek(sos + 4)
        handle.write(bytes([9]))


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy (a file appeared, a log line was written) and return
    it; fail after ``timeout`` seconds, or as soon as ``proc`` exits, naming ``what`` was awaited."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes (not zombies) whose command line contains ``text`` (Linux ``/proc``)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def log_events(log: Path, event: str) -> list[dict]:
    """The records of one event type in a run's ``log.jsonl`` (an empty list while it does not exist)."""
    import json

    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # the line being written right now
    return [r for r in records if r.get("event") == event]


def run_in_tmpfs(mount: Path, command: list[str], *, size: str = "1m", read_only: bool = False,
                 env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``command`` in a private mount namespace (``unshare``: no root needed where user namespaces are
    allowed) where ``mount`` is a fresh tmpfs of ``size`` -- full after ``size`` bytes, or read-only: the real
    ENOSPC and EROFS of a full or read-only disk. The mount vanishes with the command. The shell then lists what
    is left on the mount (``ls -A``) on a last stdout line ``LEFT: ...``."""
    import os
    import subprocess

    mount.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; shift 2; "$@"; rc=$?; '
              'echo "LEFT: $(ls -A "$OLDPWD_MOUNT" | tr "\\n" " ")"; exit $rc')
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OLDPWD_MOUNT": str(mount), **(env or {})}
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", options, str(mount),
                           *command], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode == 97:
        pytest.fail(f"cannot mount a tmpfs in a user namespace here (unshare -rm): {proc.stderr}")
    return proc
