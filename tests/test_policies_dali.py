"""The DALI graph and the torch renderer build the new policy parts from the same description and the same
parameters: same recorded parameters, pictures within a few grey levels (resampling filters differ)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from hpckd.data.aug import Policy, train_policy
from hpckd.data.dali import DaliLoader
from hpckd.data.sharding import ShardSpec
from hpckd.data.torch_loader import TorchLoader

CPU = torch.device("cpu")
RAW = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)


def loader(cls, files, views, batch, seed=0, epoch=0):
    out = cls(files, [0] * len(files), views, batch_size=batch, shard=ShardSpec(), train=True, seed=seed,
              num_threads=1 if cls is DaliLoader else 0, device=CPU, **RAW)
    out.set_epoch(epoch)
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[str]:
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photo")
    files = []
    for i in range(8):
        img = load_sample_images().images[i % 2][::4, ::4]
        path = folder / f"{i}.jpg"
        Image.fromarray(np.ascontiguousarray(np.roll(img, 17 * i, axis=0))).save(path, quality=95)
        files.append(str(path))
    return files


@pytest.mark.slow  # six DALI graphs (RandAugment's select, hue arithmetic): about 8 s on 2 cores
def test_dali_and_torch_render_the_new_parts_alike(photo_files):
    base = Policy("b", size=48, crop="rrc", flip=True)
    views = {
        "vflip": replace(base, vflip=True),
        "gray": replace(base, grayscale=0.5),
        "jitter3": replace(base, jitter=(0.4, 0.1, 0.3)),
        "ra_up_to": replace(train_policy("imagenet", "strong", 48), name="ra"),  # RandAugment "up to" 2 ops, m 10
        "fidelity_rotate_vflip": train_policy("cifar", "fidelity_rotate_vflip", 48),
        "fidelity_combined": train_policy("cifar", "fidelity_combined", 48),
    }
    d = next(iter(loader(DaliLoader, photo_files, views, batch=8, seed=5, epoch=1)))
    t = next(iter(loader(TorchLoader, photo_files, views, batch=8, seed=5, epoch=1)))
    assert torch.equal(d.index, t.index)
    for name in views:
        assert set(d.aug[name]) == set(t.aug[name]), name
        for key, value in d.aug[name].items():
            assert np.array_equal(np.asarray(value).reshape(-1), np.asarray(t.aug[name][key]).reshape(-1)), (name, key)
        per_image = (d.views[name] - t.views[name]).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < 8.0 and per_image.mean() < 3.0, (name, per_image.tolist())
    # the draws really vary: some images flipped vertically, some grey, some not
    assert 0 < int(np.asarray(d.aug["vflip"]["vflip"]).sum()) < 8
    grey = np.asarray(d.aug["gray"]["gray"]).reshape(-1) == 0
    assert 0 < grey.sum() < 8
    x = d.views["gray"][torch.from_numpy(grey)]
    assert (x[:, 0] - x[:, 1]).abs().max() <= 1.0 and (x[:, 1] - x[:, 2]).abs().max() <= 1.0  # R = G = B


def test_dali_hue_is_torchvisions_adjust_hue(tmp_path):
    """On an image DALI does not resample (crop "none"), the DALI graph's hue rotation equals torchvision's
    ``adjust_hue`` to the grey level; DALI's own ``fn.hue`` (YIQ) would be several levels off."""
    from sklearn.datasets import load_sample_images
    from torchvision.transforms.v2 import functional as F

    files = []
    for i in range(4):
        path = tmp_path / f"{i}.png"  # lossless: both loaders decode the same pixels
        Image.fromarray(np.ascontiguousarray(load_sample_images().images[i % 2][::6, ::6])).save(path)
        files.append(str(path))
    views = {"hue": Policy("h", 48, "none", hue=0.5)}
    batch = next(iter(loader(DaliLoader, files, views, batch=4, seed=2)))
    shifts = np.asarray(batch.aug["hue"]["hue"]).reshape(-1)
    assert (np.abs(shifts) > 0.05).sum() >= 2, "the draws rotate the hue noticeably"
    for k, i in enumerate(batch.index.tolist()):
        img = torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)
        expected = F.adjust_hue(img, float(shifts[k])).to(torch.float32)
        assert (batch.views["hue"][k] - expected).abs().max() < 0.01
    fidelity = next(iter(loader(DaliLoader, files, {"s": train_policy("cifar", "fidelity_jitter", 32)}, batch=4)))
    assert fidelity.views["s"].shape == (4, 3, 32, 32) and "hue" in fidelity.aug["s"]
