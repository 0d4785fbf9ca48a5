"""Every user error of the CLI is one line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import assert_one_line_error, run_hpckd

SUBCOMMANDS = ("train", "distill", "distill-efficient", "eval", "demo", "data", "models", "dist-check", "sweep", "teachers",
               "tstddev", "ab-test", "normalized-accuracy")


def test_help_lists_every_subcommand():
    proc = run_hpckd("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert name in proc.stdout


@pytest.mark.slow  # three fresh `hpckd` processes: ~8 s on a 2-core machine
def test_unknown_key_and_wrong_type(tmp_path):
    assert_one_line_error(run_hpckd("train", "optim.lrr=0.1"), "unknown key 'optim.lrr'", "did you mean 'optim.lr'")
    assert_one_line_error(run_hpckd("train", "optim.epochs=3.5x"), "'optim.epochs' expects int")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("dat:\n  root: x\n")
    assert_one_line_error(run_hpckd("distill", str(cfg)), "unknown key 'dat'", "did you mean 'data'")


def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_hpckd("train", f"data.root={missing}"), "dataset folder not found", str(missing / "train"))


def test_empty_class_folder(tmp_path, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    empty = root / "train" / "class_002"
    for f in empty.iterdir():
        f.unlink()
    assert_one_line_error(run_hpckd("train", f"data.root={root}"), "empty class folder", str(empty))


def test_corrupt_image_names_the_path(tmp_path, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "val" / "class_001").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated, as by a failed copy
    assert_one_line_error(run_hpckd("train", f"data.root={root}"), "bad image", str(victim))


@pytest.mark.slow  # two fresh `hpckd` processes: ~5 s on a 2-core machine, 9 s when it is loaded
def test_distill_without_teachers_and_missing_teacher_checkpoint(synth_root, tmp_path):
    assert_one_line_error(run_hpckd("distill", f"data.root={synth_root}"), "at least one entry in 'teachers'")
    missing = tmp_path / "t.pt"
    assert_one_line_error(run_hpckd("distill", f"data.root={synth_root}", f"teachers=[{{checkpoint: {missing}}}]"),
                          "checkpoint not found", str(missing))


def test_synth_bad_size():
    assert_one_line_error(run_hpckd("data", "synth", "--out", "/tmp/x", "--size", "big"), "--size 'big'")
