"""Data subsets from the config (class subsets, the fidelity study's D0/D1 halves, few-shot) for the folder, CIFAR
pickle and WebDataset formats alike; Tiny ImageNet's layout. Expected counts are computed from the labels here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from hpckd.config.schema import DataConfig
from hpckd.data.cifar import write_cifar
from hpckd.data.datasets import load_splits
from hpckd.data.subsets import few_shot_positions, split_positions
from hpckd.errors import ConfigError, DataError


def data_cfg(root: Path, fmt: str, **subset):
    cfg = OmegaConf.structured(DataConfig)
    cfg.root, cfg.format = str(root), fmt
    for key, value in subset.items():
        cfg.subset[key] = value
    return cfg


@pytest.fixture(scope="module")
def roots(synth_root, tmp_path_factory) -> dict[str, Path]:
    """The same 4-class data set as a folder, as WebDataset shards and (other pixels) as CIFAR-10 pickles."""
    from hpckd.cli import main

    wds = tmp_path_factory.mktemp("wds")
    for split in ("train", "val"):
        assert main(["data", "shard", "--src", str(synth_root / split), "--out", str(wds / split),
                     "--max-count", "64"]) == 0
    cifar = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    labels = {"train": [i % 10 for i in range(300)], "val": [i % 10 for i in range(50)]}
    images = {s: rng.integers(0, 256, (len(v), 32, 32, 3), dtype=np.uint8) for s, v in labels.items()}
    write_cifar(cifar, "cifar10", images, labels, [f"c{i}" for i in range(10)])
    return {"folder": synth_root, "wds": wds, "cifar10": cifar}


def ids_of(index) -> list[str]:
    """A format-independent identity of each sample: the file (folder), the original id (wds), the pixels (cifar)."""
    if hasattr(index, "files"):
        return list(index.files)
    if hasattr(index, "images"):
        return [img.tobytes().hex()[:64] for img in index.images]
    source = index.source
    return [bytes(source.read(i)).hex()[-64:] for i in range(len(index))]


@pytest.mark.parametrize("fmt", ["folder", "wds", "cifar10"])
def test_d0_d1_are_disjoint_halves_with_their_own_fingerprints(roots, fmt):
    full, val = load_splits(data_cfg(roots[fmt], fmt))
    d0, val0 = load_splits(data_cfg(roots[fmt], fmt, split="d0", split_seed=3))
    d1, _ = load_splits(data_cfg(roots[fmt], fmt, split="d1", split_seed=3))
    n = len(full)
    assert len(d0) == round(0.5 * n) and len(d0) + len(d1) == n
    a, b, everything = set(ids_of(d0)), set(ids_of(d1)), set(ids_of(full))
    assert not a & b and a | b == everything
    # labels travel with the samples
    lookup = dict(zip(ids_of(full), full.labels))
    assert [lookup[i] for i in ids_of(d0)] == list(d0.labels)
    assert len({full.fingerprint(), d0.fingerprint(), d1.fingerprint()}) == 3
    other_seed, _ = load_splits(data_cfg(roots[fmt], fmt, split="d0", split_seed=4))
    assert other_seed.fingerprint() != d0.fingerprint() and set(ids_of(other_seed)) != a
    assert val0.fingerprint() == val.fingerprint() and len(val0) == len(val), "validation stays whole"
    quarter, _ = load_splits(data_cfg(roots[fmt], fmt, split="d0", split_fraction=0.25))
    assert len(quarter) == round(0.25 * n)


@pytest.mark.parametrize("fmt", ["folder", "wds", "cifar10"])
def test_few_shot_keeps_n_per_class_and_class_subsets_relabel(roots, fmt):
    full, val = load_splits(data_cfg(roots[fmt], fmt))
    few, _ = load_splits(data_cfg(roots[fmt], fmt, per_class=5))
    assert np.bincount(few.labels, minlength=full.num_classes).tolist() == [5] * full.num_classes
    assert set(ids_of(few)) <= set(ids_of(full)) and few.fingerprint() != full.fingerprint()
    names = [full.classes[2], full.classes[0]]
    sub, sub_val = load_splits(data_cfg(roots[fmt], fmt, classes=names))
    assert sub.classes == names and sub_val.classes == names
    expect = {full.classes[2]: 0, full.classes[0]: 1}
    full_lookup = dict(zip(ids_of(full), full.labels))
    assert [expect[full.classes[full_lookup[i]]] for i in ids_of(sub)] == list(sub.labels)
    assert len(sub) == sum(1 for v in full.labels if v in (0, 2))
    assert len(sub_val) == sum(1 for v in val.labels if v in (0, 2)) and sub_val.fingerprint() != val.fingerprint()
    first, _ = load_splits(data_cfg(roots[fmt], fmt, num_classes=3))
    assert first.classes == full.classes[:3] and set(first.labels) == {0, 1, 2}


def test_subset_positions_and_errors(roots):
    labels = np.repeat(np.arange(4), [10, 3, 8, 5])
    pos = few_shot_positions(labels, 4, 4, seed=0)
    assert np.bincount(labels[pos], minlength=4).tolist() == [4, 3, 4, 4]  # "at most N": class 1 has 3
    assert np.array_equal(pos, few_shot_positions(labels, 4, 4, seed=0))
    d0, d1 = split_positions(26, 0.5, 1, "d0"), split_positions(26, 0.5, 1, "d1")
    assert len(d0) == 13 and np.array_equal(np.sort(np.concatenate([d0, d1])), np.arange(26))
    with pytest.raises(DataError, match="'nope', which is not a class"):
        load_splits(data_cfg(roots["cifar10"], "cifar10", classes=["nope"]))
    with pytest.raises(DataError, match="num_classes=11 but the data set has 10"):
        load_splits(data_cfg(roots["cifar10"], "cifar10", num_classes=11))


def test_subset_config_errors_are_one_line(synth_root):
    from hpckd.train.experiment import load_experiment

    for override, fragment in (("data.subset.split=d2", "'data.subset.split' is 'd2'"),
                               ("data.subset.split_fraction=1.5", "'data.subset.split_fraction' is 1.5"),
                               ("data.subset.per_class=-1", "'data.subset.per_class' is -1")):
        with pytest.raises(ConfigError) as info:
            load_experiment(None, [f"data.root={synth_root}", override])
        assert fragment in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- Tiny ImageNet


@pytest.fixture()
def tiny_imagenet(tmp_path) -> Path:
    """Tiny ImageNet's layout as its archive unpacks (3 classes, 64 px JPEGs)."""
    rng = np.random.default_rng(0)
    wnids = ["n01443537", "n01629819", "n01641577"]
    for w in wnids:
        (tmp_path / "train" / w / "images").mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / "train" / w / "images" / f"{w}_{k}.JPEG")
        (tmp_path / "train" / w / f"{w}_boxes.txt").write_text("")
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for k, w in enumerate(["n01641577", "n01443537", "n01641577", "n01629819", "n01443537"]):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t{k}\t{2 * k}\t{40 + k}\t62")  # file, wnid, box (x0 y0 x1 y1)
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return tmp_path


def test_tiny_imagenet_layout_and_val_annotations(tiny_imagenet):
    train, val = load_splits(data_cfg(tiny_imagenet, "tinyimagenet"))
    assert train.classes == ["n01443537", "n01629819", "n01641577"] and len(train) == 12
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    # the label is the second field (the wnid), not the last token of the line (a box coordinate)
    assert [Path(f).name for f in val.files] == [f"val_{k}.JPEG" for k in range(5)]
    assert list(val.labels) == [2, 0, 2, 1, 0]
    sub, sub_val = load_splits(data_cfg(tiny_imagenet, "tinyimagenet", classes=["n01641577"]))
    assert len(sub) == 4 and list(sub_val.labels) == [0, 0]
