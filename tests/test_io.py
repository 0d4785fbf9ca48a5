"""Atomic writes: a crash mid-write leaves the previous file intact and no temp file behind."""

from __future__ import annotations

import json

import pytest
import torch

from hpckd.errors import CheckpointError
from hpckd.io import atomic_save, atomic_write_json
from hpckd.checkpoint import load_checkpoint, save_checkpoint


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"acc": 0.5})

    def crash(handle):
        handle.write(b"{partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_save(target, crash)
    assert json.loads(target.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_checkpoint_roundtrip_and_clear_errors(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "arch": "resnet8", "num_classes": 4, "meta": {"val_acc": 0.7}}
    save_checkpoint(tmp_path / "a.pt", state)
    back = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(back["model"]["w"], torch.arange(3.0)) and back["meta"]["val_acc"] == 0.7
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "a.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an hpckd checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
