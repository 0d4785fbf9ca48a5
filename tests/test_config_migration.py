"""The loss/batch_ops layout change: old keys are refused with the new key's name, and checkpoints written with the
old layout (a fixture written by main at 86646eb) still migrate, resume and evaluate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hpckd.checkpoint import flatten
from hpckd.config import Experiment, load_config, to_container
from hpckd.config.migrate import MOVED, check_renamed_keys, migrate_config
from hpckd.errors import ConfigError
from tests.helpers import assert_one_line_error, run_hpckd

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "main_86646eb"
# The run's settings as `hpckd train` was given them at 86646eb, the method keys written in the new layout.
SETTINGS = ("data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=1", "optim.lr=0.05", "optim.epochs=2",
            "model.arch=resnet8", "train.keep_last=2", "data.index_cache=false")
NEW_KEYS = ("batch_ops.pick_ratio=0.25", "loss.wsl.weight_tau=one", "loss.targets.smoothing=0.9",
            "loss.targets.subset=correct", "loss.da.aug_kd_weight=0.5")
SHARED_LOSS_KEYS = {"name", "tau", "teacher_tau", "ce_weight", "kd_weight", "kd_form", "alpha", "check_finite",
                    "label_smoothing", "mixed_labels", "ensemble"}


def stored_config() -> dict:
    return torch.load(FIXTURE / "run" / "checkpoints" / "step-00000003.pt", map_location="cpu",
                      weights_only=False)["config"]


def copy_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture's data (with the mtimes its fingerprint hashed) and run folder, copied to ``tmp_path``."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(FIXTURE / "data", data)
    shutil.copytree(FIXTURE / "run", run)
    mtimes = json.loads((FIXTURE / "data_mtimes.json").read_text())
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert files == sorted(mtimes), "data_mtimes.json must list every fixture image"
    for rel, ns in mtimes.items():
        os.utime(data / rel, ns=(ns, ns))
    return data, run


# ---------------------------------------------------------------------------------------- stored configs


def test_migrate_moves_the_fixture_checkpoints_old_keys_to_their_new_places():
    stored = stored_config()
    before = json.dumps(stored, sort_keys=True)
    new = migrate_config(stored)
    assert json.dumps(stored, sort_keys=True) == before, "the stored config itself is left as it was"
    # The values the fixture run was given with the old keys, each at its new key:
    assert new["batch_ops"]["pick_ratio"] == 0.25
    assert new["loss"]["wsl"] == {"weight_tau": "one"}
    assert new["loss"]["targets"]["smoothing"] == 0.9
    assert new["loss"]["targets"]["subset"] == "correct"
    assert new["loss"]["da"] == {"aug_kd_weight": 0.5}
    # ... and the old defaults it stored, moved too:
    assert (new["batch_ops"]["pick_criterion"], new["batch_ops"]["pick_order"], new["batch_ops"]["pick_pool"]) == (
        "teacher_entropy", "highest", 2)
    assert new["loss"]["targets"] == {"replace": "none", "manipulate": "none", "subset": "correct",
                                      "amplify_delta": 0.1, "smoothing": 0.9, "smoothing_form": "eq3"}
    assert set(new["loss"]) == SHARED_LOSS_KEYS | {"da", "wsl", "targets"}
    assert "pick_tau" not in new["batch_ops"], "teacher_entropy never used the temperature: nothing to carry"
    # Everything left is a key of today's schema, and the result loads as a config.
    schema_keys = set(flatten(to_container(OmegaConf.structured(Experiment))))
    assert set(flatten(new)) <= schema_keys, set(flatten(new)) - schema_keys
    cfg = load_config(base=stored)
    assert (cfg.batch_ops.pick_ratio, cfg.loss.wsl.weight_tau, cfg.loss.targets.smoothing) == (0.25, "one", 0.9)
    assert migrate_config(new) == new, "a config in the current layout comes back unchanged"


def test_migrate_carries_the_kl_criterions_temperature_and_lets_a_new_key_win():
    old = {"loss": {"name": "kd_da", "tau": 10.0, "pick_criterion": "kl", "smoothing": 0.5,
                    "targets": {"smoothing": 0.7}}, "batch_ops": {"scheme": "cutmix_pick"}}
    new = migrate_config(old)
    # The old layout scored the kl criterion at loss.tau; the new one at batch_ops.pick_tau (default 4).
    assert new["batch_ops"] == {"scheme": "cutmix_pick", "pick_criterion": "kl", "pick_tau": 10.0}
    assert new["loss"] == {"name": "kd_da", "tau": 10.0, "targets": {"smoothing": 0.7}}


# ------------------------------------------------------------------------------------------ user input


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_every_old_key_on_the_command_line_names_its_new_key(old, new):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["optim.lr=0.05", f"{old}=1"])
    assert str(info.value) == f"command line: '{old}' moved to '{new}'"


def test_old_key_nested_in_a_yaml_file_names_its_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  name: soft_target_kd\n  target_subset: correct\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: 'loss.target_subset' moved to 'loss.targets.subset'"
    check_renamed_keys(OmegaConf.create({"loss": {"targets": {"subset": "correct"}}}), "x")  # the new key passes
    with pytest.raises(ConfigError, match=r"unknown key 'loss.smoothin' \(did you mean"):
        load_config(overrides=["loss.smoothin=0.9"])  # a typo is not a move: the usual unknown-key line


@pytest.mark.slow  # two fresh `hpckd` processes: ~5 s on a 2-core machine (every key is checked in-process above)
def test_old_keys_through_the_cli_are_one_line_errors(tmp_path):
    proc = run_hpckd("train", "loss.pick_ratio=0.3", f"out_dir={tmp_path / 'a'}")
    assert proc.returncode == 2
    assert_one_line_error(proc, "hpckd: error: command line: 'loss.pick_ratio' moved to 'batch_ops.pick_ratio'")
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  name: wsl\n  wsl_weight_tau: one\n")
    proc = run_hpckd("train", str(path), f"out_dir={tmp_path / 'b'}")
    assert proc.returncode == 2
    assert_one_line_error(proc, f"hpckd: error: {path}: 'loss.wsl_weight_tau' moved to 'loss.wsl.weight_tau'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "nothing is written for a bad config"


# --------------------------------------------------------------------------------- old checkpoints, for real


@pytest.mark.slow
def test_a_run_checkpointed_by_the_old_layout_resumes_and_finishes(tmp_path):
    data, run = copy_fixture(tmp_path)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003.pt"]  # the end of epoch 1
    # The stored config is compared in the new layout: a differing method option is named by its new key.
    # The fixture was trained with the `weak` of its day, now `weak_legacy` (the policies issue made `weak` follow
    # the attention study's App. A.1): the stored config is migrated to that name, so resuming names it.
    proc = run_hpckd("train", f"data.root={data}", f"out_dir={run}", "resume=auto", *SETTINGS, "aug=weak_legacy",
                     *NEW_KEYS[:-1])
    assert_one_line_error(proc, "step-00000003.pt was written by another config (loss.da.aug_kd_weight: 0.5 != 1.0)")
    proc = run_hpckd("train", f"data.root={data}", f"out_dir={run}", "resume=auto", *SETTINGS, "aug=weak_legacy",
                     *NEW_KEYS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert len(results["resumes"]) == 1 and Path(results["resumes"][0]["from"]).name == "step-00000003.pt"
    assert results["resumes"][0]["epoch"] == 1 and results["steps"] == 6
    assert [h["epoch"] for h in results["history"]] == [0, 1]
    config = results["config"]
    assert config["batch_ops"]["pick_ratio"] == 0.25 and config["loss"]["wsl"]["weight_tau"] == "one"
    # Exact resume: epoch 2 from the old checkpoint ends where main's uninterrupted run ended.
    old = json.loads((FIXTURE / "run" / "results.json").read_text())
    assert results["metrics"]["accuracy"] == old["metrics"]["accuracy"]
    assert results["metrics"]["nll"] == pytest.approx(old["metrics"]["nll"], rel=1e-5)
    assert results["history"][1]["train_loss"] == pytest.approx(old["history"][1]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_hpckd_eval_reads_an_old_layout_checkpoint(tmp_path):
    data, run = copy_fixture(tmp_path)
    proc = run_hpckd("eval", str(run / "last.pt"), f"data.root={data}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = json.loads((run / "results.json").read_text())["eval"]["val"]
    old = json.loads((FIXTURE / "run" / "results.json").read_text())["metrics"]  # last.pt's own final evaluation
    assert stored["count"] == 8 and stored["accuracy"] == old["accuracy"]
    assert stored["nll"] == pytest.approx(old["nll"], rel=1e-5)
