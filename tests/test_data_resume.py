"""Exact resume: after load_state_dict the loader continues with the very batches (ids and pixels) of an
uninterrupted run; each epoch depends only on (seed, epoch, rank)."""

from __future__ import annotations

import pytest
import torch

from hpckd.config import IMAGENET_MEAN, IMAGENET_STD
from hpckd.data.aug import train_policy
from hpckd.data.dali import DaliLoader
from hpckd.data.index import build_index
from hpckd.data.sharding import ShardSpec
from hpckd.data.torch_loader import TorchLoader

CPU = torch.device("cpu")


def make(cls, index, shard=ShardSpec(), seed=1):
    views = {"student": train_policy("cifar", "strong", 32), "teacher0": train_policy("imagenet", "strong", 32)}
    return cls(index.files, index.labels, views, batch_size=16, shard=shard, train=True, seed=seed, num_threads=1,
               device=CPU, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def snapshot(batches):
    return [(b.index.clone(), {k: v.clone() for k, v in b.views.items()}) for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ia, va), (ib, vb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


@pytest.mark.parametrize("cls", [DaliLoader, TorchLoader])
def test_resume_mid_epoch_gives_the_same_batches(synth_root, cls):
    index = build_index(synth_root / "train")  # 192 samples, 2 ranks x batch 16 -> 6 steps per rank
    shard = ShardSpec(1, 2)
    full = make(cls, index, shard)
    full.set_epoch(0)
    epoch0 = snapshot(full)
    full.set_epoch(1)
    epoch1 = []
    for k, batch in enumerate(full):
        epoch1.append(batch)
        assert full.state_dict() == {"epoch": 1, "step": k + 1}
    epoch1 = snapshot(epoch1)
    assert len(epoch1) == len(full) == 6
    assert not torch.equal(epoch0[0][0], epoch1[0][0]), "each epoch has its own order"

    resumed = make(cls, index, shard)  # a fresh process would build a fresh loader
    resumed.load_state_dict({"epoch": 1, "step": 2})
    resumed.set_epoch(1)  # what an engine does at the top of the resumed epoch: keeps the start
    assert_same(snapshot(resumed), epoch1[2:])
    assert resumed.state_dict() == {"epoch": 1, "step": 6}
    resumed.set_epoch(1)
    assert_same(snapshot(resumed), epoch1), "a new pass starts the epoch from its first batch"

    jump = make(cls, index, shard)  # epochs are independent: epoch 1 without running epoch 0 first
    jump.set_epoch(1)
    assert_same(snapshot(jump), epoch1)
    jump.load_state_dict({"epoch": 0, "step": 5})
    jump.set_epoch(1)  # another epoch than the loaded one: the loaded start is dropped
    assert len(list(jump)) == 6


def test_dali_and_torch_read_the_same_order(synth_root):
    index = build_index(synth_root / "train")
    ids = {}
    for cls in (DaliLoader, TorchLoader):
        loader = make(cls, index, ShardSpec(0, 2), seed=4)
        loader.set_epoch(3)
        ids[cls] = [b.index.tolist() for b in loader]
    assert ids[DaliLoader] == ids[TorchLoader]


def test_bad_state_is_a_user_error(synth_root):
    from hpckd.errors import DataError

    loader = make(TorchLoader, build_index(synth_root / "train"))
    with pytest.raises(DataError, match="epoch"):
        loader.load_state_dict({"step": 1})


def _two_rank_worker(rank: int, port: int, root: str, out: str) -> None:
    """One rank: loaders from the experiment config, the sample ids it reads, gathered over real gloo."""
    import json
    import torch.distributed as tdist

    from hpckd.train.experiment import load_experiment
    from hpckd.data.loaders import build_loaders
    from hpckd.dist import DistInfo

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_experiment(None, [f"data.root={root}", "data.batch_size=32", "data.eval_batch_size=12",
                             "data.num_workers=1", "aug=weak", "data.index_cache=off"])
    loaders = build_loaders(cfg, DistInfo(rank=rank, world_size=2))
    loaders.train.set_epoch(1)
    mine = {"train": [i for b in loaders.train for i in b.index.tolist()],
            "val": [i for b in loaders.val for i in b.index.tolist()], "steps": len(loaders.train)}
    gathered = [None, None]
    tdist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    tdist.destroy_process_group()


@pytest.mark.dist
def test_two_real_ranks_shard_training_and_cover_evaluation_exactly_once(synth_root, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ids.json"
    mp.spawn(_two_rank_worker, args=(port, str(synth_root), str(out)), nprocs=2, join=True)
    r0, r1 = json.loads(out.read_text())
    assert r0["steps"] == r1["steps"] == 192 // 2 // 16 and len(r0["train"]) == len(r1["train"]) == 96
    assert not set(r0["train"]) & set(r1["train"]), "training shards are disjoint"
    assert sorted(r0["val"] + r1["val"]) == list(range(40)), "every validation sample exactly once"
