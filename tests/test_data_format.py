"""The loaders' output format: bf16 / fp16 images and channels-last (NHWC strides, NCHW shape) straight from the
DALI and torch loaders, equal to the float32 NCHW output rounded; configuration checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config import IMAGENET_MEAN, IMAGENET_STD
from hpckd.train.experiment import load_experiment
from hpckd.data.aug import train_policy
from hpckd.data.batch import ImageFormat
from hpckd.data.dali import DaliLoader, ShardSpec
from hpckd.data.index import build_index
from hpckd.data.loaders import image_format
from hpckd.data.torch_loader import TorchLoader
from hpckd.errors import ConfigError

CPU = torch.device("cpu")


def first_batch(cls, index, fmt: ImageFormat):
    views = {"student": train_policy("imagenet", "strong", 32), "teacher0": train_policy("imagenet", "weak", 32)}
    loader = cls(index.files, index.labels, views, batch_size=8, shard=ShardSpec(), train=True, seed=4, num_threads=1,
                 device=CPU, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_format=fmt)
    return next(iter(loader))


@pytest.mark.parametrize("cls", [DaliLoader, TorchLoader])
@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_reduced_precision_channels_last_images_equal_the_rounded_float32_ones(synth_root, cls, dtype, torch_dtype):
    index = build_index(synth_root / "train")
    reference = first_batch(cls, index, ImageFormat())
    got = first_batch(cls, index, ImageFormat(dtype=dtype, channels_last=True))
    assert got.index.tolist() == reference.index.tolist()
    for view in ("student", "teacher0"):
        x, ref = got.views[view], reference.views[view]
        assert x.dtype == torch_dtype and x.shape == (8, 3, 32, 32)
        # channels-last: NHWC strides under the NCHW shape (C is the fastest-moving dimension)
        assert x.stride() == (32 * 32 * 3, 1, 32 * 3, 3)
        assert ref.stride() == (3 * 32 * 32, 32 * 32, 32, 1)
        # one rounding of the same float32 pixels: compare to numpy's view of the reference
        expected = ref.numpy().astype(np.float32)
        tolerance = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11  # half a unit in the last place, relative
        assert np.all(np.abs(x.float().numpy() - expected) <= tolerance * np.abs(expected) + 1e-6)


def test_default_format_is_float32_nchw(synth_root):
    batch = first_batch(TorchLoader, build_index(synth_root / "train"), ImageFormat())
    assert batch.views["student"].dtype == torch.float32 and batch.views["student"].is_contiguous()


def test_config_maps_dtype_and_layout():
    cfg = load_experiment(None, ["data.dtype=bfloat16", "train.precision=bf16", "train.channels_last=true"])
    assert image_format(cfg) == ImageFormat(dtype="bfloat16", channels_last=True)
    assert image_format(load_experiment(None, [])) == ImageFormat()


@pytest.mark.parametrize("overrides, fragment", [
    (["data.dtype=bfloat16"], "data.dtype=bfloat16 needs train.precision=bf16"),
    (["data.dtype=float16", "train.precision=bf16"], "data.dtype=float16 needs train.precision=fp16"),
    (["data.dtype=float64"], "'data.dtype' is 'float64'; choose one of float32, bfloat16, float16"),
])
def test_bad_dtype_settings_are_one_clear_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_experiment(None, overrides)
