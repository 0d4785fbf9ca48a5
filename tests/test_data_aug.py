"""Policies against independent expectations: flips flip, crops take the recorded window, Cutout erases the
recorded square, automatic-augmentation programs follow their tables, and DALI and torch give the same view for
the same parameters (which also makes the recorded parameters a faithful replay record)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpckd.data.aug import Policy
from hpckd.data.autoaug import RANDAUGMENT, draw_program
from hpckd.data.dali import DaliLoader
from hpckd.data.params import params_from_uniforms, rrc_windows, sample_params, view_key
from hpckd.data.render_torch import render, row
from hpckd.data.sharding import ShardSpec
from hpckd.data.torch_loader import TorchLoader

CPU = torch.device("cpu")
RAW = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # output = pixel values, easy to reason about
LOADERS = [DaliLoader, TorchLoader]


def loader(cls, files, views, batch, seed=0, train=False, epoch=0):
    out = cls(files, [0] * len(files), views, batch_size=batch, shard=ShardSpec(), train=train, seed=seed,
              num_threads=1 if cls is DaliLoader else 0, device=CPU, **RAW)
    out.set_epoch(epoch)
    return out


@pytest.fixture(scope="module")
def ramp_files(tmp_path_factory) -> list[str]:
    """Lossless 64x96 images whose red channel is the column and green channel the row (scaled to 0..255)."""
    folder = tmp_path_factory.mktemp("ramp")
    yy, xx = np.mgrid[0:64, 0:96]
    img = np.stack([xx * 255.0 / 95, yy * 255.0 / 63, np.full_like(xx, 128.0)], axis=-1).round().astype(np.uint8)
    files = []
    for i in range(16):
        path = folder / f"{i:02d}.png"
        Image.fromarray(img).save(path)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[str]:
    """Real photographs (scikit-learn's sample images), shifted copies, as JPEGs."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photo")
    files = []
    for i in range(8):
        img = load_sample_images().images[i % 2][::4, ::4]
        path = folder / f"{i}.jpg"
        Image.fromarray(np.ascontiguousarray(np.roll(img, 13 * i, axis=1))).save(path, quality=95)
        files.append(str(path))
    return files


@pytest.mark.parametrize("cls", LOADERS)
def test_flip_really_flips(synth_root, cls):
    files = sorted(str(p) for p in (synth_root / "val").rglob("*.jpg"))[:16]
    plain = Policy("plain", size=32, crop="resize")
    batch = next(iter(loader(cls, files, {"plain": plain, "flipped": replace(plain, flip=True)}, batch=16, train=True)))
    flags = batch.aug["flipped"]["flip"].reshape(-1).bool()
    a, b = batch.views["plain"], batch.views["flipped"]
    assert 0 < int(flags.sum()) < 16, "a fair coin flips some images, not all"
    assert torch.equal(b[flags], a[flags].flip(-1))
    assert torch.equal(b[~flags], a[~flags])


@pytest.mark.parametrize("cls", LOADERS)
def test_random_resized_crop_shows_the_recorded_window(ramp_files, cls):
    policy = Policy("rrc", size=16, crop="rrc")
    batch = next(iter(loader(cls, ramp_files, {"v": policy}, batch=16, train=True, seed=2)))
    windows = batch.aug["v"]["crop"].numpy()
    for img, (top, left, h, w) in zip(batch.views["v"].numpy(), windows):
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 96
        assert 0.08 * 64 * 96 * 0.9 <= h * w <= 64 * 96 and 0.7 <= w / h <= 1.45
        # output pixel j samples source column left + (j + 0.5) * w / 16 - 0.5 (pixel centres), same for rows
        cols = left + (np.arange(16) + 0.5) * w / 16 - 0.5
        rows = top + (np.arange(16) + 0.5) * h / 16 - 0.5
        assert np.abs(img[0].mean(axis=0) - cols * 255 / 95).max() < 3.0
        assert np.abs(img[1].mean(axis=1) - rows * 255 / 63).max() < 3.0


@pytest.mark.parametrize("cls", LOADERS)
def test_pad_crop_shifts_by_the_recorded_offset_with_zero_padding(ramp_files, cls):
    policy = Policy("pad", size=32, crop="pad_crop", pad=4)
    batch = next(iter(loader(cls, ramp_files, {"v": policy, "base": Policy("b", 32, "resize")}, batch=16, train=True)))
    offsets = batch.aug["v"]["crop"].numpy()[:, :2]
    assert set(np.unique(offsets)) <= set(range(-4, 5)) and len(np.unique(offsets)) > 3
    base = batch.views["base"].numpy()
    for img, ref, (top, left) in zip(batch.views["v"].numpy(), base, offsets):
        expected = np.zeros_like(ref)
        src = ref[:, max(0, top):32 + min(0, top), max(0, left):32 + min(0, left)]
        expected[:, max(0, -top):max(0, -top) + src.shape[1], max(0, -left):max(0, -left) + src.shape[2]] = src
        assert np.array_equal(img, expected)


@pytest.mark.parametrize("cls", LOADERS)
def test_cutout_erases_exactly_the_recorded_square(tmp_path, cls):
    files = []
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    batch = next(iter(loader(cls, files, {"v": Policy("c", 32, "resize", cutout=16)}, batch=8, train=True, seed=5)))
    for img, (top, left) in zip(batch.views["v"].numpy(), batch.aug["v"]["erase"].numpy().astype(int)):
        mask = np.zeros((32, 32), bool)
        mask[max(0, top):max(0, top + 16), max(0, left):max(0, left + 16)] = True
        assert np.array_equal(img[0] == 0, mask), (top, left)
        assert np.abs(img[:, ~mask] - 200).max() < 1e-3


def test_rrc_falls_back_to_a_central_crop_at_the_nearest_allowed_ratio():
    # A 10 x 400 image cannot hold a 3/4..4/3 window of >= 90 % of its area: torchvision's fallback crops the
    # centre at ratio 4/3 and full height: width round(10 * 4/3) = 13, left (400 - 13) // 2 = 193.
    u = np.random.default_rng(0).random((3, 40))
    windows = rrc_windows(u, np.array([[10, 400]] * 3), (0.9, 1.0))
    assert windows.tolist() == [[0, 193, 10, 13]] * 3


def test_randaugment_programs_are_uniform_over_the_suite_at_magnitude_m():
    u = np.random.default_rng(1).random((14000, 4))
    prog = draw_program("randaugment", u, ra_n=2, ra_m=9)
    counts = np.bincount(prog["ops"].ravel(), minlength=14)
    assert len(RANDAUGMENT.ops) == 14 and counts.min() > 1700 and counts.max() < 2300  # 28000 / 14 = 2000
    assert (prog["mags"] == 9).all() and abs(prog["signs"].mean() - 0.5) < 0.02


def test_autoaugment_programs_follow_the_policy_table():
    from torchvision.transforms import v2

    table = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies  # the paper's table, read independently
    expected_run = np.mean([sub[0][1] for sub in table])  # P(stage 0 runs) with sub-policies uniform
    u = np.random.default_rng(2).random((40000, 5))
    prog = draw_program("autoaugment_cifar", u)
    ran = prog["ops"][:, 0] != 0  # op 0 is identity, which the table never names
    assert abs(ran.mean() - expected_run) < 0.01
    sub = np.minimum((u[:, 0] * 25).astype(int), 24)
    for k in (0, 7, 24):
        rows = (sub == k) & ran
        assert (prog["mags"][rows, 0] == (table[k][0][2] or 0)).all()


def test_parameters_are_a_pure_function_of_the_key():
    policy = Policy("s", 32, "rrc", flip=True, rotate=15.0, jitter=0.4, auto="randaugment", cutout=8)
    ids, sizes = np.array([5, 9, 11]), np.array([[40, 60], [64, 64], [33, 90]])
    a = sample_params(policy, view_key(0, 3, "student"), ids, sizes)
    b = sample_params(policy, view_key(0, 3, "student"), ids[::-1], sizes[::-1])
    for k in a:
        assert np.array_equal(a[k], b[k][::-1]), "a sample's parameters do not depend on its batch"
    c = sample_params(policy, view_key(0, 4, "student"), ids, sizes)
    assert not np.array_equal(a["crop"], c["crop"]), "another epoch, other parameters"
    assert set(params_from_uniforms(policy, np.zeros((1, 60)), sizes[:1])) == set(a)


def test_dali_and_torch_render_the_same_parameters_alike(photo_files):
    """Same window, flip, angle, jitter and op program: pictures agree to about a grey level (different
    resampling filters), and the loaders record identical parameters."""
    base = Policy("b", size=48, crop="rrc", flip=True)
    views = {"crop": base, "rotate": replace(base, rotate=20.0), "jitter": replace(base, jitter=0.4),
             "randaugment": replace(base, auto="randaugment"), "autoaugment": replace(base, auto="autoaugment_cifar"),
             "cutout": replace(base, cutout=12), "center": Policy("c", 48, "center")}
    d = next(iter(loader(DaliLoader, photo_files, views, batch=8, train=True, seed=7, epoch=2)))
    t = next(iter(loader(TorchLoader, photo_files, views, batch=8, train=True, seed=7, epoch=2)))
    assert torch.equal(d.index, t.index)
    for name in views:
        for key, value in d.aug[name].items():
            assert np.array_equal(np.asarray(value).reshape(-1), np.asarray(t.aug[name][key]).reshape(-1)), (name, key)
        # a wrong op, sign or window costs tens of grey levels on that image; filters and the equalize formula
        # (DALI follows OpenCV, torchvision PIL) a few
        per_image = (d.views[name] - t.views[name]).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < 8.0 and per_image.mean() < 3.0, (name, per_image.tolist())


def test_recorded_parameters_replay_the_torch_view_exactly(photo_files):
    policy = Policy("s", size=40, crop="rrc", flip=True, rotate=10.0, jitter=0.3, auto="randaugment", cutout=8)
    batch = next(iter(loader(TorchLoader, photo_files, {"student": policy}, batch=8, train=True, seed=3, epoch=1)))
    params = {k: v.numpy() for k, v in batch.aug["student"].items()}
    for i, sample in enumerate(batch.index.tolist()):
        img = torch.from_numpy(np.array(Image.open(photo_files[sample]).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(render(img, policy, row(params, i), **RAW), batch.views["student"][i])
        sizes = np.array([[img.shape[1], img.shape[2]]])
        again = sample_params(policy, view_key(3, 1, "student"), np.array([sample]), sizes)
        assert all(np.array_equal(again[k][0], params[k][i]) for k in again), "recomputable from the key"


def test_rotation_angles_stay_in_range_and_rotate_about_the_centre():
    policy = Policy("r", size=33, crop="none", rotate=15.0)
    u = np.random.default_rng(3).random((200, 60))
    angles = params_from_uniforms(policy, u, np.array([[33, 33]]))["angle"]
    assert angles.min() >= -15 and angles.max() <= 15 and angles.min() < -12 and angles.max() > 12
    img = torch.zeros(3, 33, 33, dtype=torch.uint8)
    img[:, 16, 16] = 255  # the centre pixel stays put under any rotation about the centre
    out = render(img, policy, {"angle": np.float32(11.0)}, **RAW)
    assert out[0, 16, 16] > 200 and math.isclose(float(out[0].sum()), float(out[0, 16, 16]), rel_tol=0.2)


def test_eval_policy_center_crop_is_the_middle(ramp_files):
    batch = next(iter(loader(TorchLoader, ramp_files[:2], {"v": Policy("c", 56, "center")}, batch=2)))
    # shorter side 64 -> round(56 / 0.875) = 64 (no resize), width 96; centre crop starts at column (96-56+1)//2 = 20
    assert abs(float(batch.views["v"][0, 0, :, 0].mean()) - 20 * 255 / 95) < 1.0
    assert abs(float(batch.views["v"][0, 1, 0, :].mean()) - 4 * 255 / 63) < 1.0
    assert Path(ramp_files[0]).exists()
