"""Data sets: CIFAR pickles, long-tailed subsets, list files, the cached index, bad input, WebDataset shards."""

from __future__ import annotations

import io
import json
import math
import pickle
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hpckd.data import index as index_mod
from hpckd.data.aug import eval_policy
from hpckd.data.cifar import load_cifar
from hpckd.data.dali import DaliLoader
from hpckd.data.datasets import load_splits
from hpckd.data.index import build_index, build_list_index
from hpckd.data.longtail import long_tail_counts, long_tail_positions
from hpckd.data.sharding import ShardSpec
from hpckd.data.torch_loader import TorchLoader
from hpckd.errors import DataError

CPU = torch.device("cpu")
RAW = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)


def make_loader(cls, source, labels, *, batch=4, shard=ShardSpec(), train=False, seed=0, size=32):
    return cls(source, labels, {"student": eval_policy("cifar", size)}, batch_size=batch, shard=shard, train=train,
               seed=seed, num_threads=1 if cls is DaliLoader else 0, device=CPU, **RAW)


# ------------------------------------------------------------------------------------------------------ CIFAR


def write_official_cifar100(root: Path, n_train: int, n_test: int, rng) -> dict:
    """cifar-100-python/{train,test,meta} exactly as the official archive: protocol-2 pickles with bytes keys,
    'data' = (N, 3072) uint8 of red, green, blue planes, 'fine_labels', 'fine_label_names'."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(100)]
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}, f, protocol=2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        planes = np.concatenate([hwc[..., c].reshape(n, 1024) for c in range(3)], axis=1)  # R plane, G, B
        labels = [int(v) for v in rng.permutation(np.arange(n) % 100)]  # as balanced as n allows
        with (folder / split).open("wb") as f:
            pickle.dump({b"data": planes, b"fine_labels": labels, b"coarse_labels": [0] * n,
                         b"filenames": [b"f.png"] * n}, f, protocol=2)
        out[split] = (hwc, labels)
    return out


def test_cifar100_pickles_load_as_images_and_labels(tmp_path):
    expected = write_official_cifar100(tmp_path, 12, 5, np.random.default_rng(0))
    train = load_cifar(tmp_path, "cifar100", "train")
    assert train.classes[:2] == ["class0", "class1"] and train.num_classes == 100
    assert np.array_equal(train.images, expected["train"][0]) and train.labels == expected["train"][1]
    val = load_cifar(tmp_path / "cifar-100-python", "cifar100", "val")  # the batch folder itself works too
    assert np.array_equal(val.images, expected["test"][0])
    # through both loaders the identity view is the stored pixels
    for cls in (DaliLoader, TorchLoader):
        batch = next(iter(make_loader(cls, val.source, val.labels, batch=5)))
        got = batch.views["student"].permute(0, 2, 3, 1).numpy()
        assert np.abs(got - expected["test"][0]).max() < 1e-3
        assert batch.labels.tolist() == expected["test"][1]


def test_cifar10_layout_and_missing_batch_message(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": np.full((2, 3072), k, np.uint8), b"labels": [k % 10, 9]}, f, protocol=2)
    train = load_cifar(tmp_path, "cifar10", "train")
    assert len(train) == 10 and train.labels[:4] == [0, 9, 1, 9] and int(train.images[9, 0, 0, 0]) == 4
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10", "train")


# --------------------------------------------------------------------------------------------- long tail


def test_long_tail_counts_follow_the_exponential_profile():
    # published sizes (Cao et al. 2019): CIFAR-10-LT and CIFAR-100-LT at imbalance 100
    assert sum(long_tail_counts(5000, 10, 100)) == 12406
    assert sum(long_tail_counts(500, 100, 100)) == 10847
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts[50] == math.floor(500 * 0.01 ** (50 / 99)) == 48
    assert long_tail_counts(40, 5, 1) == [40] * 5


def test_long_tailed_subset_has_exactly_the_profile_counts(tmp_path):
    labels = np.repeat(np.arange(10), 50)
    positions = long_tail_positions(labels, 10, 10.0, seed=3)
    got = np.bincount(labels[positions], minlength=10).tolist()
    assert got == [int(50 * 0.1 ** (c / 9)) for c in range(10)] == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert np.array_equal(positions, long_tail_positions(labels, 10, 10.0, seed=3))
    assert not np.array_equal(positions, long_tail_positions(labels, 10, 10.0, seed=4))
    # through the config: a CIFAR-100-LT style split keeps the profile and changes the fingerprint
    write_official_cifar100(tmp_path, 400, 10, np.random.default_rng(1))
    cfg = SimpleNamespace(root=str(tmp_path), format="cifar100", on_bad_image="error", imbalance=1.0)
    balanced, _ = load_splits(cfg)
    cfg.imbalance = 4.0
    lt, _ = load_splits(cfg)
    n_max = min(np.bincount(balanced.labels, minlength=100))
    assert np.bincount(lt.labels, minlength=100).tolist() == [int(n_max * 0.25 ** (c / 99)) for c in range(100)]
    assert lt.fingerprint() != balanced.fingerprint()


# ----------------------------------------------------------------------------- list files, val label files


@pytest.fixture()
def small_tree(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.jpg")
    flat = tmp_path / "val_flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(flat / f"ILSVRC_val_{i}.JPEG")
    return tmp_path


def test_imagenet_lt_list_file_keeps_order_and_labels(small_tree):
    lines = ["train/n02/1.jpg 1", "train/n01/0.jpg 0", "", "# comment", "train/n02/2.jpg 1"]
    (small_tree / "lt.txt").write_text("\n".join(lines) + "\n")
    index = build_list_index(small_tree, small_tree / "lt.txt", num_classes=1000)
    assert [Path(f).relative_to(small_tree).as_posix() for f in index.files] == ["train/n02/1.jpg", "train/n01/0.jpg", "train/n02/2.jpg"]
    assert index.labels == [1, 0, 1] and index.num_classes == 1000


def test_val_label_file_with_class_names_for_a_flat_folder(small_tree):
    (small_tree / "val_labels.txt").write_text("ILSVRC_val_0.JPEG n02\nILSVRC_val_1.JPEG n01\nILSVRC_val_3.JPEG n02\n")
    cfg = SimpleNamespace(root=str(small_tree), format="folder", on_bad_image="error", val_list=str(small_tree / "val_labels.txt"),
                          index_cache="off")
    (small_tree / "val").rename(small_tree / "val_tree")
    (small_tree / "val_flat").rename(small_tree / "val")
    train, val = load_splits(cfg)
    assert train.classes == ["n01", "n02"] and val.classes == ["n01", "n02"]
    assert val.labels == [1, 0, 1] and Path(val.files[2]).name == "ILSVRC_val_3.JPEG"


def test_label_file_naming_a_missing_file(small_tree):
    (small_tree / "l.txt").write_text("train/n01/0.jpg 0\ntrain/n01/nope.jpg 0\n")
    with pytest.raises(DataError, match="missing file.*nope.jpg"):
        build_list_index(small_tree, small_tree / "l.txt")
    with pytest.warns(UserWarning, match="skipped 1"):
        index = build_list_index(small_tree, small_tree / "l.txt", on_bad_image="skip")
    assert len(index) == 1 and "nope.jpg" in index.skipped[0]


# -------------------------------------------------------------------------------------------- index cache


def test_index_cache_is_reused_and_invalidated_by_folder_changes(small_tree, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    first = build_index(small_tree / "train", cache=str(cache))
    assert len(list(cache.iterdir())) == 1 and not list(cache.glob("*.tmp"))

    def no_walk(*args, **kwargs):
        raise AssertionError("walked the tree although the cache is valid")

    monkeypatch.setattr(index_mod, "_walk", no_walk)
    again = build_index(small_tree / "train", cache=str(cache))
    assert again.files == first.files and again.labels == first.labels and again.fingerprint() == first.fingerprint()
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small_tree / "train" / "n01" / "new.jpg")
    grown = build_index(small_tree / "train", cache=str(cache))
    assert len(grown) == len(first) + 1 and grown.fingerprint() != first.fingerprint()
    # "auto" writes next to the data folder, not inside it (that would change the folder's own listing)
    build_index(small_tree / "train")
    assert (small_tree / ".hpckd-index-train.json.gz").is_file()


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_images_error_names_the_path_and_skip_reports_them(tmp_path):
    good = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
    Image.fromarray(good).save(tmp_path / "a" / "ok.jpg")
    Image.fromarray(good).convert("CMYK").save(tmp_path / "a" / "cmyk.jpg")
    Image.fromarray(good).convert("L").save(tmp_path / "a" / "gray.jpg")
    Image.fromarray(good).save(tmp_path / "b" / "png_inside.jpg", format="PNG")
    data = (tmp_path / "a" / "ok.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    Image.fromarray(good).save(png, format="PNG")
    (tmp_path / "b" / "cut.png").write_bytes(png.getvalue()[:-20])
    with pytest.raises(DataError, match=r"b/cut.png: truncated PNG"):
        build_index(tmp_path, cache="off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(tmp_path, on_bad_image="skip", cache="off")
    assert any("skipped 3" in str(w.message) for w in caught), "never silent"
    assert sorted(Path(s.split(":")[0]).name for s in index.skipped) == ["c", "cut.png", "truncated.jpg"]
    assert index.classes == ["a", "b", "c"], "an empty class keeps its id so train and val labels agree"
    # CMYK, grayscale and a PNG under a .jpg name are fine and decode to the same RGB in both loaders
    expected = {Path(f).name: np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in index.files}
    for cls in (DaliLoader, TorchLoader):
        batch = next(iter(make_loader(cls, index.files, index.labels, size=16)))
        for f, img in zip([index.files[i] for i in batch.index.tolist()], batch.views["student"]):
            assert np.abs(img.permute(1, 2, 0).numpy() - expected[Path(f).name]).mean() < 2.0, (cls, f)
    for name in ("cut.png", "truncated.jpg"):
        (tmp_path / "b" / name).unlink()
    with pytest.raises(DataError, match=r"empty class folder: .*/c"):
        build_index(tmp_path, cache="off")


def test_a_file_dali_cannot_decode_is_named(tmp_path):
    good = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    files = []
    for i in range(4):
        Image.fromarray(good).save(tmp_path / f"{i}.jpg")
        files.append(str(tmp_path / f"{i}.jpg"))
    data = bytearray((tmp_path / "2.jpg").read_bytes())
    data[2:-2] = b"\x00" * (len(data) - 4)  # starts and ends like a JPEG (passes the cheap check), garbage inside
    (tmp_path / "2.jpg").write_bytes(bytes(data))
    assert index_mod.check_image(tmp_path / "2.jpg") is not None, "the index check would have caught it"
    with pytest.raises(DataError, match="2.jpg"):
        list(make_loader(DaliLoader, files, [0] * 4, size=16))


def test_empty_dataset_folder_and_missing_root_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_index(tmp_path / "nope")
    with pytest.raises(DataError, match="no class folders"):
        build_index(tmp_path)


# ------------------------------------------------------------------------------------------------ WebDataset


def test_shard_command_writes_int32_labels_and_dali_streams_exactly(synth_root, tmp_path):
    from hpckd.cli import main

    for split in ("train", "val"):
        assert main(["data", "shard", "--src", str(synth_root / split), "--out", str(tmp_path / split),
                     "--max-count", "50"]) == 0
    folder_train = build_index(synth_root / "train")
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        label = np.frombuffer(tar.extractfile(f"{key}.cls").read(), dtype="<i4")
        sample = int(np.frombuffer(tar.extractfile(f"{key}.id").read(), dtype="<i8")[0])
    assert label.shape == (1,) and int(label[0]) == folder_train.labels[sample]
    assert {n.split(".")[1] for n in names} == {"jpg", "cls", "id"}
    cfg = SimpleNamespace(root=str(tmp_path), format="wds", on_bad_image="error")
    train, val = load_splits(cfg)
    assert train.fingerprint() == folder_train.fingerprint(), "a sharded copy keeps the data's fingerprint"
    assert json.loads((tmp_path / "train" / "wds.json").read_text())["count"] == 192
    # evaluation over 2 ranks sees every sample once; training shards are disjoint with equal steps
    seen = []
    for rank in range(2):
        seen += [i for b in make_loader(DaliLoader, val.source, val.labels, batch=6, shard=ShardSpec(rank, 2)) for i in b.index.tolist()]
    assert sorted(seen) == list(range(40))
    epochs = []
    for rank in range(2):
        loader = make_loader(DaliLoader, train.source, train.labels, batch=16, shard=ShardSpec(rank, 2), train=True)
        ids = [[i for b in loader for i in b.index.tolist()] for _ in range(1)]
        assert len(ids[0]) == 96 and len(loader) == 6
        epochs.append(set(ids[0]))
        batch = next(iter(loader))
        assert batch.labels.tolist() == [folder_train.labels[i] for i in batch.index.tolist()]
    assert not epochs[0] & epochs[1]
    # random access (torch loader) returns the same encoded image as the folder
    assert bytes(train.source.read(17)) == Path(folder_train.files[17]).read_bytes()
