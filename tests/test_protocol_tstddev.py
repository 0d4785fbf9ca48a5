"""T. stddev over the training stream (augmentation study Eqs. 9-10, App. A.2-A.3): values against a numpy
re-computation from the teacher checkpoint and the loader's batches, and the same numbers from 2 gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpckd.checkpoint import save_checkpoint
from hpckd.models import create

from tests.helpers import assert_one_line_error, np_softmax, run_hpckd

GROUP = 24  # not a multiple of the 32 rows of a doubled step: the order inside a step matters
EPOCHS = 2


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    model = create("resnet8", 4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode outputs vary across images
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, {"model": model.state_dict(), "arch": "resnet8", "num_classes": 4, "config": {},
                           "meta": {"step": 1, "aug": "weak"}})
    return path


def overrides(root: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"out_dir={out}", "data.loader=torch", "data.num_workers=0", "data.batch_size=16",
            f"teachers=[{{checkpoint: {teacher}}}]", "batch_ops.scheme=identity", *extra]


def augmented(batch, cfg, epoch: int, step: int) -> torch.Tensor:
    """x' = scheme(x) as training draws it: the batch ops with draws keyed by (seed, epoch, sample ids) on 1 rank."""
    from hpckd.data.batchops import KeyedDraws, apply_batch_ops

    draws = KeyedDraws(cfg.seed, epoch, 0, 1, int(cfg.batch_ops.mix_groups))
    out = apply_batch_ops(batch, cfg.batch_ops, draws, family=cfg.data.family, mean=list(cfg.data.mean),
                          std=list(cfg.data.std))
    return out.views["student"][batch.size:].float()


def numpy_tstddev(cfg, teacher: Path, ddof: int) -> dict[str, float]:
    """The training stream rebuilt here: the loader's batches per epoch, x with x' = scheme(x) appended, the
    teacher (read from its file) in fp32, probabilities in numpy; consecutive groups of GROUP rows; Eq. 10 with
    ``ddof``; per step, ``np.cov`` / ``np.corrcoef`` of the 32 x C matrix, averaged (App. A.2, Eqs. 12-13)."""
    from hpckd import dist
    from hpckd.data.loaders import build_loaders

    state = torch.load(teacher, map_location="cpu", weights_only=False)
    model = create("resnet8", 4)
    model.load_state_dict(state["model"])
    model.eval()
    loaders = build_loaders(cfg, dist.init("cpu"))
    rows, v, r = [], [], []
    for epoch in range(EPOCHS):
        loaders.train.set_epoch(epoch)
        for step, batch in enumerate(loaders.train):
            x = batch.views["student"].float()
            with torch.no_grad():
                p = np_softmax(model(torch.cat([x, augmented(batch, cfg, epoch, step)])).double().numpy())
            rows.append(p)
            v.append(np.cov(p).mean())
            r.append(np.corrcoef(p).mean())
    stream = np.concatenate(rows)
    groups = len(stream) // GROUP
    means = stream[: groups * GROUP].reshape(groups, GROUP, -1).mean(axis=1)  # Eq. 9
    m = means.var(axis=0, ddof=ddof)  # Eq. 10
    return {"tstddev": float(np.sqrt(m).mean()), "groups": groups, "vbar": float(np.mean(v)), "rbar": float(np.mean(r))}


def test_tstddev_pass_matches_numpy_on_the_doubled_training_stream(synth_root, teacher_ckpt, tmp_path):
    from hpckd.train.experiment import load_experiment
    from hpckd.train.protocols import tstddev_pass

    # cutout: x' differs from x, so the order original-then-augmented inside a step matters
    cfg = load_experiment(None, overrides(synth_root, tmp_path / "run", teacher_ckpt, "batch_ops.scheme=cutout"))
    got = tstddev_pass(cfg, epochs=EPOCHS, group_size=GROUP)
    biased = tstddev_pass(cfg, epochs=EPOCHS, group_size=GROUP, unbiased=False, output=tmp_path / "biased.json")
    ref = numpy_tstddev(cfg, teacher_ckpt, ddof=1)
    assert got["tstddev_groups"] == ref["groups"] == (EPOCHS * 12 * 32) // GROUP
    assert got["tstddev"] == pytest.approx(ref["tstddev"], rel=1e-6)
    assert got["vbar"] == pytest.approx(ref["vbar"], rel=1e-9) and got["rbar"] == pytest.approx(ref["rbar"], rel=1e-9)
    assert got["vbar_batches"] == EPOCHS * 12
    assert biased["tstddev"] == pytest.approx(numpy_tstddev(cfg, teacher_ckpt, ddof=0)["tstddev"], rel=1e-6)
    stored = json.loads((tmp_path / "run" / "tstddev.json").read_text())
    assert stored["tstddev"] == got["tstddev"] and stored["group_size"] == GROUP and stored["epochs"] == EPOCHS
    assert stored["batch_ops"]["scheme"] == "cutout"


@pytest.mark.dist
def test_tstddev_is_the_same_on_two_gloo_ranks_as_on_one(synth_root, teacher_ckpt, tmp_path):
    results = {}
    for n in (1, 2):
        out = tmp_path / f"ranks{n}"
        # cutout: x' rows too, drawn per sample id (world-size-invariant batch ops)
        proc = run_hpckd("tstddev", *overrides(synth_root, out, teacher_ckpt, "dist.device=cpu", "batch_ops.scheme=cutout",
                                               f"dist.nproc_per_node={n}"),
                         "--epochs", str(EPOCHS), "--group-size", str(GROUP), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "T. stddev" in proc.stdout
        results[n] = json.loads((out / "tstddev.json").read_text())
    one, two = results[1], results[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["tstddev_groups"] == one["tstddev_groups"] == (EPOCHS * 12 * 32) // GROUP
    assert two["rows"] == one["rows"]
    assert two["tstddev"] == pytest.approx(one["tstddev"], rel=1e-6)
    assert two["vbar"] == pytest.approx(one["vbar"], rel=1e-6) and two["rbar"] == pytest.approx(one["rbar"], rel=1e-6)


def test_tstddev_without_teachers_is_one_line(synth_root, tmp_path):
    proc = run_hpckd("tstddev", f"data.root={synth_root}", f"out_dir={tmp_path / 'x'}", "data.loader=torch",
                     "--epochs", "1")
    assert_one_line_error(proc, "teachers")
    assert not (tmp_path / "x" / "tstddev.json").exists()
