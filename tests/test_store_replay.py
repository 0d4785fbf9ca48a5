"""The logit store end to end, with real teachers, real loaders (torch and DALI on the CPU), real subprocesses:
replayed views give the stored logits, a student trained from the store follows the inline run, the writer survives
kill -9, and a store that cannot serve the run is refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpckd.config import BatchOpsConfig
from hpckd.data.batchops import KeyedDraws, apply_batch_ops
from hpckd.data.datasets import load_splits
from hpckd.data.loaders import image_format, loader_class, view_policies
from hpckd.data.sharding import ShardSpec
from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.models import create
from hpckd.teachers.store import LogitStore
from tests.helpers import REPO, assert_one_line_error, run_hpckd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """4 classes x 16 training images of 32 px: 4 global micro-batches of 16 per epoch."""
    out = tmp_path_factory.mktemp("store_data") / "data"
    write_imagefolder(out, SynthSpec(classes=4, per_class=16, val_per_class=4, seed=2))
    return out


@pytest.fixture(scope="module")
def teachers(root, tmp_path_factory) -> list[Path]:
    paths = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"store_teacher{seed}")
        proc = run_hpckd("train", f"data.root={root}", f"out_dir={out}", "model.arch=resnet8", "optim.epochs=1",
                         f"seed={seed}", "data.batch_size=16", "data.num_workers=1", "data.loader=torch")
        assert proc.returncode == 0, proc.stderr
        paths.append(out / "last.pt")
    return paths


def _overrides(root: Path, teachers: list[Path], *extra: str, strong_view: bool = True) -> list[str]:
    second = f"{{checkpoint: {teachers[1]}, aug: strong}}" if strong_view else f"{{checkpoint: {teachers[1]}}}"
    return [f"data.root={root}", f"teachers=[{{checkpoint: {teachers[0]}}}, {second}]", "model.arch=resnet8",
            "optim.epochs=2", "data.batch_size=16", "data.eval_batch_size=16", "data.num_workers=1",
            "data.loader=torch", "loss.name=kd", "log_every=1", "batch_ops.scheme=cutmix", "batch_ops.mix_groups=4",
            *extra]


def _config(overrides: list[str]):
    from hpckd.train.experiment import load_experiment

    return load_experiment(None, overrides)


def _teacher_model(path: Path) -> torch.nn.Module:
    """The teacher rebuilt here from its checkpoint file (not through hpckd's serving)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = create(state["arch"], state["num_classes"], **state.get("arch_kwargs", {}))
    model.load_state_dict(state["model"])
    return model.eval()


def _fp16_close(stored: torch.Tensor, recomputed: torch.Tensor) -> None:
    # fp16 keeps 11 significant bits: a stored logit is within |x| 2^-11 of the fp32 one; 2^-10 leaves room for
    # the last bits of a forward pass over another batch composition.
    tol = 2.0 ** -10 * recomputed.abs().amax(1, keepdim=True).clamp(min=1.0) + 1e-4
    assert ((stored - recomputed).abs() <= tol).all(), (stored - recomputed).abs().max()


# ------------------------------------------------------------------------------------- replayed views


@pytest.mark.parametrize("loader,student_aug", [("torch", "weak"), ("dali", "strong")])
def test_replayed_views_and_cutmix_give_the_stored_logits(root, teachers, tmp_path, loader, student_aug):
    """weak and strong (RandAugment) student views, teacher 1 on its own strong view, CutMix rows; the views come
    from a loader built here and the teachers run here, outside hpckd's serving."""
    from hpckd.teachers.store_writer import cache

    cfg = _config(_overrides(root, teachers, f"data.loader={loader}", f"aug={student_aug}", f"out_dir={tmp_path}/r"))
    folder = cache(cfg, epochs=2, out=str(tmp_path / "store"), shard_steps=2, log=lambda line: None)
    store = LogitStore(folder)
    train, _ = load_splits(cfg.data)
    views = view_policies(cfg, [t.aug for t in cfg.teachers])
    assert set(views) == {"student", "teacher1"}
    models = [_teacher_model(p) for p in teachers]
    reader = loader_class(loader)(train.source, train.labels, views, batch_size=16, train=True,
                                  shard=ShardSpec(0, 1), seed=cfg.seed, num_threads=1, device=torch.device("cpu"),
                                  mean=cfg.data.mean, std=cfg.data.std, image_format=image_format(cfg))
    checked = 0
    for epoch, step in ((0, 1), (1, 3)):
        reader.set_epoch(epoch)
        reader.load_state_dict({"epoch": epoch, "step": step})
        batch = next(iter(reader))
        ids = batch.index.numpy()
        with torch.no_grad():
            plain = [m(batch.view(f"teacher{k}")) for k, m in enumerate(models)]
        stored = store.logits(epoch, ids, np.zeros(len(ids), np.int64))
        for k in range(2):
            _fp16_close(stored[k], plain[k])
        # CutMix rows: paste each row's recorded box from its recorded partner, per view, and run the teachers
        mixed = apply_batch_ops(batch, BatchOpsConfig(scheme="cutmix", mix_groups=4),
                                KeyedDraws(cfg.seed, epoch, 0, 1, 4))
        rec = mixed.aug["cutmix"]
        for k, m in enumerate(models):
            x = batch.view(f"teacher{k}").clone()
            for i in range(len(ids)):
                top, left, bottom, right = rec["box"][i].tolist()
                x[i, :, top:bottom, left:right] = batch.view(f"teacher{k}")[int(rec["partner"][i]), :, top:bottom,
                                                                           left:right]
            with torch.no_grad():
                again = m(x)
            _fp16_close(store.logits(epoch, ids, np.ones(len(ids), np.int64))[k], again)
            checked += len(ids)
        assert not torch.equal(plain[0], stored[1]), "the two teachers' rows are their own"
    assert checked == 64


# ------------------------------------------------------------------------------ students from the store


def _step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if r.get("event") == "step"]


def _cache(root, teachers, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_hpckd("teachers", "cache", *_overrides(root, teachers, f"out_dir={out}/unused", *extra),
                     "--out", str(out), "--shard-steps", "2")


@pytest.mark.dist
def test_student_from_the_store_follows_the_inline_run_on_1_and_2_ranks(root, teachers, tmp_path):
    two = ("dist.nproc_per_node=2", "dist.device=cpu")
    store1 = tmp_path / "store1"
    store2 = tmp_path / "store2"
    assert _cache(root, teachers, store1).returncode == 0
    proc = _cache(root, teachers, store2, *two)  # the same store, written by 2 gloo ranks
    assert proc.returncode == 0, proc.stderr
    assert "worker 1 of 2" in proc.stdout
    for shard in sorted((store1 / "shards").iterdir()):
        assert shard.read_bytes() == (store2 / "shards" / shard.name).read_bytes()
    runs = {}
    for name, extra in {"inline": (), "cached": ("serving.mode=cached", f"serving.store={store2}"),
                        "inline2": two, "cached2": (*two, "serving.mode=cached", f"serving.store={store1}")}.items():
        proc = run_hpckd("distill", *_overrides(root, teachers, f"out_dir={tmp_path / name}", *extra))
        assert proc.returncode == 0, proc.stderr
        runs[name] = _step_losses(tmp_path / name)
    assert len(runs["inline"]) == 8 and len(runs["inline2"]) == 8
    # fp16 teacher logits move the KD loss (tau^2-scaled) by far less than 1e-3 here; different students would not
    np.testing.assert_allclose(runs["cached"], runs["inline"], atol=2e-3, rtol=0)
    np.testing.assert_allclose(runs["cached2"], runs["inline2"], atol=2e-3, rtol=0)
    assert max(abs(a - b) for a, b in zip(runs["inline"][1:], runs["inline"][:-1])) > 1e-2, "the loss moves"


@pytest.mark.parametrize("half_split", ["crop", "none"])
def test_cutmix_pick_scores_its_pool_from_the_store(root, teachers, tmp_path, half_split):
    """CutMixPick's pool is scored with the stored teacher logits (rows POOL_VARIANT + run). With a half split the
    kept rows and each teacher's half image are read back; without one the kept rows' logits are the stored pool
    rows' (the store holds no kept rows: its rows per epoch say so). Either way the student follows the inline
    run."""
    extra = ("batch_ops.scheme=cutmix_pick", f"batch_ops.half_split={half_split}", "optim.epochs=1")
    store = tmp_path / "store"
    proc = run_hpckd("teachers", "cache", *_overrides(root, teachers, f"out_dir={tmp_path}/unused", *extra,
                                                      strong_view=False), "--out", str(store))
    assert proc.returncode == 0, proc.stderr
    # 4 micro-batches of 16 rows in 4 mixing groups: pool 2 x 16, originals 16, kept rows 4 x round(0.5 x 8) = 16
    kept = 16 if half_split != "none" else 0
    assert LogitStore(store).manifest["layout"]["rows_per_epoch"] == 4 * (2 * 16 + 16 + kept)
    losses = {}
    for name, more in {"inline": (), "cached": ("serving.mode=cached", f"serving.store={store}")}.items():
        proc = run_hpckd("distill", *_overrides(root, teachers, f"out_dir={tmp_path / name}", *extra, *more,
                                                strong_view=False))
        assert proc.returncode == 0, proc.stderr
        losses[name] = _step_losses(tmp_path / name)
    assert len(losses["inline"]) == 4
    np.testing.assert_allclose(losses["cached"], losses["inline"], atol=2e-3, rtol=0)
    # Evaluating a cached run runs its teachers: it needs no store (the store may be gone by then).
    shutil.rmtree(store)
    proc = run_hpckd("eval", str(tmp_path / "cached" / "last.pt"))
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((tmp_path / "cached" / "results.json").read_text())["eval"]["val"]
    assert 0.0 <= stored["top1_agreement"] <= 1.0


# ------------------------------------------------------------------------------------------ kill -9


def test_writer_killed_mid_way_reruns_to_a_store_that_verifies(root, teachers, tmp_path):
    out = tmp_path / "store"
    args = ["teachers", "cache", *_overrides(root, teachers, f"out_dir={tmp_path}/unused"), "--out", str(out),
            "--shard-steps", "1", "--epochs", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "hpckd", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout:  # synchronised on the writer's own report of a finished shard
        if line.startswith("hpckd: wrote shard"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    written = sorted((out / "shards").glob("*.shard"))
    assert 1 <= len(written) < 16 and not (out / "index.json").exists()
    first = written[0].stat().st_mtime_ns
    assert run_hpckd("distill", *_overrides(root, teachers, f"out_dir={tmp_path}/early", "serving.mode=cached",
                                            f"serving.store={out}")).stderr.count("incomplete") == 1
    again = run_hpckd(*args, "--verify", "6")
    assert again.returncode == 0, again.stderr
    assert "verified 6 stored entries" in again.stdout
    assert len(list((out / "shards").glob("*.shard"))) == 16 and (out / "index.json").exists()
    assert written[0].stat().st_mtime_ns == first, "a finished shard is kept, not rewritten"
    assert not list((out / "shards").glob(".*")), "no temp file left"


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def store(root, teachers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store_ok") / "store"
    proc = _cache(root, teachers, out, "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "fp16 full logits" in proc.stdout and "per epoch" in proc.stdout
    return out


def _distill_from(root, teachers, store: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_hpckd("distill", *_overrides(root, teachers, f"out_dir={tmp_path}/run", "optim.epochs=1",
                                            "serving.mode=cached", f"serving.store={store}", *extra))


def test_a_store_of_another_run_is_refused_naming_the_difference(root, teachers, store, tmp_path):
    assert_one_line_error(_distill_from(root, teachers, store, tmp_path, "seed=1"), "seed: the run has 1, the store has 0")
    assert_one_line_error(_distill_from(root, teachers, store, tmp_path, "batch_ops.scheme=mixup"),
                          "batch_ops.scheme")
    assert_one_line_error(run_hpckd("distill", *_overrides(root, teachers[::-1], f"out_dir={tmp_path}/x",
                                                           "optim.epochs=1", "serving.mode=cached",
                                                           f"serving.store={store}")), "teachers[0]")


def test_a_corrupt_or_missing_shard_is_one_line_each(root, teachers, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    shard = sorted((bad / "shards").glob("*.shard"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert_one_line_error(_distill_from(root, teachers, bad, tmp_path), "corrupt (checksum mismatch)", shard.name)
    shard.unlink()
    assert_one_line_error(_distill_from(root, teachers, bad, tmp_path), "is missing", shard.name)


def test_epochs_beyond_the_store_are_an_error_by_default(root, teachers, store, tmp_path):
    assert_one_line_error(_distill_from(root, teachers, store, tmp_path, "optim.epochs=2"),
                          "holds 1 epoch(s) but the run reached epoch 1", "serving.store_epochs=cycle")


def test_student_criteria_of_cutmix_pick_cannot_be_cached(root, teachers, store, tmp_path):
    proc = _distill_from(root, teachers, store, tmp_path, "batch_ops.scheme=cutmix_pick", "batch_ops.pick_criterion=kl")
    assert_one_line_error(proc, "pick_criterion=kl", "serving.mode=inline")


def test_a_store_larger_than_the_free_space_is_refused_before_writing(root, teachers, tmp_path):
    from tests.helpers import run_in_tmpfs

    mount = tmp_path / "small"
    proc = run_in_tmpfs(mount, [sys.executable, "-m", "hpckd", "teachers", "cache",
                                *_overrides(root, teachers, f"out_dir={tmp_path}/unused"), "--out", str(mount / "store"),
                                "--epochs", "500"], size="256k")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("hpckd: logit store")]
    assert len(lines) == 1 and "for 500 epoch(s)" in lines[0], proc.stdout  # the sizes come first
    assert_one_line_error(proc, "the logit store needs", "free", "--topk")
    assert proc.stdout.splitlines()[-1].strip() == "LEFT:", "nothing was written"
