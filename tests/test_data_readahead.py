"""Read-ahead in the DALI loader: batches prepared on a background thread are exactly those prepared on the
training thread (ids, labels, pixels, parameters), resume and abandoned passes still work, threads do not leak,
and read errors still surface on the training thread as one-line user errors."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpckd.config import IMAGENET_MEAN, IMAGENET_STD
from hpckd.data.aug import train_policy
from hpckd.data.dali import READ_AHEAD_THREAD, DaliLoader, ReadAhead
from hpckd.data.index import build_index
from hpckd.data.params import sample_params, view_key
from hpckd.data.sharding import ShardSpec, epoch_order
from hpckd.data.sources import FileSource
from hpckd.errors import DataError

CPU = torch.device("cpu")
SEED = 7
VIEWS = {"student": train_policy("imagenet", "strong", 32), "teacher0": train_policy("cifar", "weak", 32)}


def read_ahead_threads() -> int:
    return sum(t.name.startswith(READ_AHEAD_THREAD) for t in threading.enumerate())


def make(source, labels, read_ahead: int, *, batch: int = 16, shard: ShardSpec = ShardSpec(), train: bool = True,
         views=VIEWS) -> DaliLoader:
    return DaliLoader(source, labels, views, batch_size=batch, shard=shard, train=train, seed=SEED, num_threads=1,
                      device=CPU, mean=IMAGENET_MEAN, std=IMAGENET_STD, read_ahead=read_ahead)


def record(loader: DaliLoader, epoch: int) -> list[dict]:
    """Everything a pass hands out, copied: ids, labels, pixels of each view, parameters of each view."""
    loader.set_epoch(epoch)
    return [{"index": b.index.clone(), "labels": b.labels.clone(),
             "views": {k: v.clone() for k, v in b.views.items()},
             "aug": {v: {f: t.cpu().numpy().copy() for f, t in fields.items()} for v, fields in b.aug.items()}}
            for b in loader]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["labels"], y["labels"])
        assert x["views"].keys() == y["views"].keys()
        assert all(torch.equal(x["views"][k], y["views"][k]) for k in x["views"])
        assert x["aug"].keys() == y["aug"].keys()
        for view in x["aug"]:
            assert x["aug"][view].keys() == y["aug"][view].keys()
            assert all(np.array_equal(x["aug"][view][f], y["aug"][view][f]) for f in x["aug"][view])


def test_read_ahead_gives_exactly_the_synchronous_batches(synth_root):
    index = build_index(synth_root / "train")  # 192 images of 32x32
    before = read_ahead_threads()
    sync, ahead = make(index.files, index.labels, 0), make(index.files, index.labels, 3)
    for epoch in (0, 1):
        a, b = record(sync, epoch), record(ahead, epoch)
        assert_same(a, b)
        # independent facts: the order is the epoch's permutation, labels come from the index, and the
        # parameters are those drawn from (seed, epoch, view, id) for the images' real sizes
        order = epoch_order(192, ShardSpec(), batch_size=16, train=True, seed=SEED, epoch=epoch)
        assert torch.cat([x["index"] for x in b]).tolist() == order.tolist()
        for batch in b:
            ids = batch["index"].numpy()
            assert batch["labels"].tolist() == [index.labels[i] for i in ids]
            sizes = np.array([Image.open(index.files[i]).size[::-1] for i in ids])
            for name, policy in VIEWS.items():
                expected = sample_params(policy, view_key(SEED, epoch, name), ids, sizes)
                assert batch["aug"][name].keys() == expected.keys()
                for field, value in expected.items():
                    assert np.array_equal(batch["aug"][name][field].reshape(value.shape), value), (name, field)
    assert read_ahead_threads() == before, "a finished pass joins its read-ahead thread"


def test_resume_mid_epoch_with_read_ahead_equals_the_uninterrupted_pass(synth_root):
    index = build_index(synth_root / "train")
    shard = ShardSpec(1, 2)  # 6 steps of 16 on this rank
    uninterrupted = record(make(index.files, index.labels, 0, shard=shard), 1)
    resumed = make(index.files, index.labels, 3, shard=shard)
    resumed.load_state_dict({"epoch": 1, "step": 2})
    tail = record(resumed, 1)
    assert len(tail) == 4 and resumed.state_dict() == {"epoch": 1, "step": 6}
    assert_same(tail, uninterrupted[2:])


class CountingSource(FileSource):
    """Files, counting reads (thread-safe: reads happen on the read-ahead thread)."""

    def __init__(self, files) -> None:
        super().__init__(files)
        self.reads = 0
        self.lock = threading.Lock()

    def read(self, i: int) -> np.ndarray:
        with self.lock:
            self.reads += 1
        return super().read(i)


def test_abandoned_pass_stops_reading_and_the_next_epoch_is_right(synth_root):
    index = build_index(synth_root / "train")
    before = read_ahead_threads()
    source = CountingSource(index.files)
    loader = make(source, index.labels, 3, batch=8)  # 24 batches per epoch
    loader.set_epoch(0)
    passing = iter(loader)
    first = next(passing)
    assert read_ahead_threads() == before + 1
    passing.close()  # the training loop breaks out after one batch
    assert read_ahead_threads() == before, "closing a pass joins its read-ahead thread"
    # what DALI prefetched (2), the batch handed out, the read-ahead (3) and the one being read: not the epoch
    reads = source.reads
    assert reads <= (2 + 1 + 3 + 1) * 8 < 192
    order0 = epoch_order(192, ShardSpec(), batch_size=8, train=True, seed=SEED, epoch=0)
    assert first.index.tolist() == order0[:8].tolist()

    loader.set_epoch(1)
    ids = [i for b in loader for i in b.index.tolist()]
    assert ids == epoch_order(192, ShardSpec(), batch_size=8, train=True, seed=SEED, epoch=1).tolist()
    assert source.reads == reads + 192, "the abandoned pass read nothing more"
    assert read_ahead_threads() == before


def test_many_abandoned_passes_leave_no_thread(synth_root):
    index = build_index(synth_root / "val")
    before = read_ahead_threads()
    loader = make(index.files, index.labels, 2, batch=4, train=False)
    for _ in range(5):
        passing = iter(loader)
        next(passing)
        passing.close()
    assert read_ahead_threads() == before
    assert [i for b in loader for i in b.index.tolist()] == list(range(40)), "a full pass after them is whole"


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_a_file_deleted_after_indexing_is_a_one_line_error_naming_it(synth_root, tmp_path, read_ahead):
    root = tmp_path / "train"
    shutil.copytree(synth_root / "train", root)
    index = build_index(root, cache="off")
    victim = index.files[epoch_order(192, ShardSpec(), batch_size=16, train=True, seed=SEED, epoch=0)[40]]
    Path(victim).unlink()  # the index lists absolute paths
    before = read_ahead_threads()
    loader = make(index.files, index.labels, read_ahead)
    loader.set_epoch(0)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and message == f"cannot read {victim} (No such file or directory)"
    assert read_ahead_threads() == before, "a failed pass joins its read-ahead thread"


def test_streaming_webdataset_with_read_ahead_equals_synchronous(synth_root, tmp_path):
    from hpckd.data.wds import load_wds, write_shards

    write_shards(build_index(synth_root / "train"), tmp_path, max_count=50)
    shards = load_wds(tmp_path)
    before = read_ahead_threads()
    runs = {}
    for read_ahead in (0, 3):
        loader = make(shards.source, shards.labels, read_ahead, shard=ShardSpec(0, 2))
        assert loader.streaming
        runs[read_ahead] = record(loader, 1)
        passing = iter(loader)  # and an abandoned streaming pass
        next(passing)
        passing.close()
    assert len(runs[3]) == 6
    assert_same(runs[0], runs[3])
    assert read_ahead_threads() == before


def test_read_ahead_keeps_order_bounds_work_and_reraises_on_the_consumer():
    calls, finished_on = [], []

    def produce() -> int:
        calls.append(threading.current_thread())
        if len(calls) == 6:
            raise DataError("cannot read six")
        return len(calls)

    ahead = ReadAhead(produce, 2, finish=lambda: finished_on.append(threading.current_thread()))
    assert [ahead.next() for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(DataError, match="^cannot read six$"):
        ahead.next()
    ahead.close()
    assert len(calls) <= 6 + 2, "at most `depth` calls beyond the last one handed out"
    workers = set(calls + finished_on)
    assert len(workers) == 1 and len(finished_on) == 1, "one thread runs every call, then `finish`"
    worker = workers.pop()
    assert worker.name.startswith(READ_AHEAD_THREAD) and worker is not threading.current_thread()
    assert not worker.is_alive(), "close joins the thread (while the ReadAhead is still referenced)"
    ahead.close()  # idempotent
    with pytest.raises(RuntimeError):
        ahead.next()
