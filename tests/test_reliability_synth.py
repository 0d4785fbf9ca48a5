"""Generated data sets are complete or absent: a `data synth` killed half-way leaves nothing that counts as a data
set, and `hpckd demo` generates its set again instead of training on what a killed demo left behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from hpckd.data.synth import SynthSpec, is_complete, write_imagefolder
from hpckd.sweep.demo import prepare_data
from tests.helpers import REPO, assert_one_line_error, run_hpckd, wait_for

SMALL = SynthSpec(classes=2, per_class=6, val_per_class=3, seed=5)


def images(root: Path) -> dict[str, bytes]:
    """Every image of a set, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_a_killed_data_synth_leaves_no_data_set_and_the_next_run_completes_it(tmp_path):
    out = tmp_path / "data"
    writer = subprocess.Popen([sys.executable, "-m", "hpckd", "data", "synth", "--out", str(out), "--classes", "2",
                               "--per-class", "100000", "--val-per-class", "1"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Killed once it has written some images (wherever it writes them).
    wait_for(lambda: any(tmp_path.rglob("*.jpg")), 120, "the first generated image", writer)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=60) == -signal.SIGKILL
    assert any(tmp_path.rglob("*.jpg")) and not out.exists()  # only a temp folder, never `out` itself
    assert not is_complete(out, SynthSpec(classes=2, per_class=100000, val_per_class=1))

    assert prepare_data(out, SMALL).startswith("generated 12 train / 6 val JPEGs")
    assert is_complete(out, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the killed writer's temp folder is gone
    reference = tmp_path / "reference"
    write_imagefolder(reference, SMALL)
    assert images(out) == images(reference)
    assert prepare_data(out, SMALL) == "already there"


def test_the_demo_regenerates_a_half_written_set_instead_of_using_a_subset(tmp_path):
    """What an older demo killed while writing left: train/ and part of val/, no completion marker."""
    reference = tmp_path / "reference"
    write_imagefolder(reference, SMALL)
    partial = tmp_path / "data"
    for path, data in list(images(reference).items())[:-2]:  # the last two val images never got written
        (partial / path).parent.mkdir(parents=True, exist_ok=True)
        (partial / path).write_bytes(data)
    assert (partial / "val").is_dir() and not is_complete(partial, SMALL)

    assert prepare_data(partial, SMALL).startswith("generated")
    assert images(partial) == images(reference)  # all 18, not 16
    # A complete set of another spec is not this one: generated again too.
    other = SynthSpec(classes=2, per_class=4, val_per_class=3, seed=5)
    assert not is_complete(partial, other)
    assert prepare_data(partial, other).startswith("generated 8 train / 6 val")
    assert len(images(partial)) == 14 and is_complete(partial, other) and not is_complete(partial, SMALL)


def test_synth_refuses_a_folder_that_holds_other_things(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert_one_line_error(run_hpckd("data", "synth", "--out", str(out), "--classes", "2", "--per-class", "1",
                                    "--val-per-class", "1"), f"--out {out} is not empty", "thesis.tex")
    assert (out / "thesis.tex").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_generated_images_and_folders_honour_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_imagefolder(tmp_path / "data", SMALL)
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").rglob("*.jpg")}
    folders = {stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "data", *(tmp_path / "data").rglob("*")] if p.is_dir()}
    assert modes == {0o640} and folders == {0o750}


def test_shard_src_that_is_a_data_root_says_so(tmp_path, tiny_root):
    proc = run_hpckd("data", "shard", "--src", str(tiny_root), "--out", str(tmp_path / "shards"))
    assert_one_line_error(proc, f"--src {tiny_root} is a data root (it holds train/ and val/)",
                          f"e.g. {tiny_root / 'train'}")
    assert not (tmp_path / "shards").exists()
