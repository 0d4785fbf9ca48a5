"""Files hpckd writes: the umask's permissions, no temp files left by a killed save, and one line (not a traceback)
for a full disk, a read-only disk or a file where a folder belongs -- the old file kept, nothing half-written.

Full and read-only disks are real: a tmpfs of a few KiB, or mounted read-only, in a private mount namespace."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpckd.errors import UserError
from hpckd.io import atomic_write_json, check_output_dir, current_umask, remove_stale_temp_files
from tests.helpers import REPO, assert_one_line_error, run_hpckd, run_in_tmpfs, tiny_run_args


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_umasks_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "results.json", {"acc": 0.5})
    assert mode(tmp_path / "results.json") == expected  # as open() would give; mkstemp alone gives 0600
    assert json.loads((tmp_path / "results.json").read_text()) == {"acc": 0.5}


KILLED_SAVE = ("import sys\n"
               "from hpckd.io import atomic_open\n"
               "with atomic_open(sys.argv[1], 'wb') as handle:\n"
               "    handle.write(b'half of a checkpoint')\n"
               "    handle.flush()\n"
               "    print('writing', flush=True)\n"
               "    sys.stdin.read()  # killed here, mid-save\n")


def test_temp_files_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "checkpoints"
    atomic_write_json(folder / "step-00000002.pt", {"complete": True})
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(folder / "step-00000004.pt")], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline() == "writing\n"
    os.kill(saver.pid, signal.SIGKILL)
    assert saver.wait(timeout=60) == -signal.SIGKILL
    left = [p for p in folder.iterdir() if p.name.startswith(".step-00000004.pt.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and not (folder / "step-00000004.pt").exists()  # what a kill mid-save leaves
    (folder / "notes.tmp").write_text("not ours: no leading dot")

    assert remove_stale_temp_files(folder) == left
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp", "step-00000002.pt"]
    assert remove_stale_temp_files(folder) == [] and remove_stale_temp_files(tmp_path / "missing") == []


def test_check_output_dir_file_in_the_way(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=f"^out_dir {afile} is a file, not a folder"):
        check_output_dir(afile)
    with pytest.raises(UserError, match=f"^--out {afile / 'a/b'} is under {afile}, which is a file"):
        check_output_dir(afile / "a" / "b", "--out")
    check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # and leaves no probe behind


def test_out_dir_that_is_a_file_fails_before_the_data_is_read(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "no-data"  # the data error would come first if the data were read first
    assert_one_line_error(run_hpckd("train", f"data.root={missing}", f"out_dir={afile / 'run'}"),
                          f"out_dir {afile / 'run'} is under {afile}, which is a file")


def test_data_synth_and_shard_out_that_is_a_file(tmp_path, tiny_root):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(run_hpckd("data", "synth", "--out", str(afile), "--classes", "2", "--per-class", "1",
                                    "--val-per-class", "1"), f"--out {afile} is a file")
    assert_one_line_error(run_hpckd("data", "shard", "--src", str(tiny_root / "train"), "--out", str(afile)),
                          f"--out {afile} is a file")
    assert afile.read_text() == "x"


def test_read_only_disk_one_line_before_any_data_is_read(tmp_path, tiny_root):
    mount = tmp_path / "ro"
    run = run_in_tmpfs(mount, [sys.executable, "-m", "hpckd", "train", *tiny_run_args(tiny_root, mount / "run")],
                       read_only=True)
    assert_one_line_error(run, f"out_dir {mount / 'run'} is not writable", "read-only")
    synth = run_in_tmpfs(mount, [sys.executable, "-m", "hpckd", "data", "synth", "--out", str(mount / "d"),
                                 "--classes", "2", "--per-class", "1", "--val-per-class", "1"], read_only=True)
    assert_one_line_error(synth, f"--out {mount / 'd'} is not writable", "read-only")


FILL_AND_OVERWRITE = ("import json, sys\n"
                      "from hpckd.errors import UserError\n"
                      "from hpckd.io import atomic_write_text\n"
                      "target = sys.argv[1]\n"
                      "atomic_write_text(target, 'old results')\n"
                      "try:\n"
                      "    atomic_write_text(target, 'x' * 10**6)\n"
                      "except UserError as exc:\n"
                      "    print(json.dumps({'error': str(exc), 'cause': type(exc.__cause__).__name__,\n"
                      "                      'errno': exc.__cause__.errno, 'kept': open(target).read()}))\n")


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    mount = tmp_path / "small"
    target = mount / "results.json"
    proc = run_in_tmpfs(mount, [sys.executable, "-c", FILL_AND_OVERWRITE, str(target)], size="256k")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["error"] == f"cannot write {target}: no space left on the device; free some space or write elsewhere"
    assert result["cause"] == "OSError" and result["errno"] == 28  # ENOSPC, kept as the cause
    assert result["kept"] == "old results"  # atomic: the old file, whole
    assert proc.stdout.splitlines()[-1].split() == ["LEFT:", "results.json"]  # the temp file is gone


def test_data_synth_on_a_full_disk_one_line_and_no_partial_set(tmp_path):
    mount = tmp_path / "small"
    proc = run_in_tmpfs(mount, [sys.executable, "-m", "hpckd", "data", "synth", "--out", str(mount / "d"),
                                "--classes", "4", "--per-class", "200", "--val-per-class", "10"], size="96k")
    lines = proc.stdout.splitlines()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr),
                          f"cannot write {mount / 'd' / 'train'}", "no space left on the device")
    assert lines[-1].strip() == "LEFT:"  # neither a partial set nor its temp folder
