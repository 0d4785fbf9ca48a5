"""The hot path of a student trained from a logit store, with batch ops (issue 17): no device read per micro-step.

* The sample ids travel on the host next to the device ones (``Batch.host_index``): both loaders set them from the
  CPU ids they already hold (a copy, never a view of a loader's buffer), ``Batch.to`` keeps them, and
  every batch op reorders them with its host row choices, so ``Batch.ids()`` always equals ``index`` and the
  variants name the rows as the batch ops' docstring says (0, 1, ``POOL_VARIANT + j``).
* On the real loop (``engine.run``), a student distilled from a real store (``serving.mode=cached``) with doubled
  CutMix makes no torch host read (``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``,
  ``numpy``, counted by :class:`tests.test_hotpath.SyncCounter`) on any micro-step between check points; with
  CutMixPick exactly one, the kept pool rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpckd.config.methods import BatchOpsConfig
from hpckd.data.batch import Batch, host_array
from hpckd.data.batchops import POOL_VARIANT, KeyedDraws, apply_batch_ops
from hpckd.data.loaders import image_format, loader_class, view_policies
from hpckd.data.sharding import ShardSpec, epoch_order
from hpckd.train import engine
from tests.helpers import gen, image_batch
from tests.test_hotpath import STEPS_PER_EPOCH, SyncCounter, calls_between_micro_steps, config

pytestmark = pytest.mark.usefixtures("outside_slurm")
N = 8
IDS = np.array([907, 13, 402, 55, 300, 71, 8, 650], dtype=np.int64)  # unordered global ids, none equal to a row


def moved_batch(teacher_view: bool = False) -> Batch:
    """A hand-built batch with ids ``IDS`` on the host, moved like a loader's batch (``Batch.to``)."""
    b = image_batch(n=N, h=16, w=16, teacher_view=teacher_view)
    return b.replace(index=torch.as_tensor(IDS.copy())).to("cpu")


def test_batch_to_keeps_a_host_copy_of_the_ids_and_never_reads_them_back():
    b = image_batch(n=N).replace(index=torch.as_tensor(IDS.copy()))
    expected = b.index.cpu().numpy().copy()
    assert b.host_index is None
    moved = b.to("meta")  # a meta tensor has no data: the ids can only come from the host copy
    assert moved.index.device.type == "meta" and moved.ids().dtype == np.int64
    assert np.array_equal(moved.ids(), expected)
    b.index[0] = -1  # the loader refilling its buffer: the copy does not see it
    assert np.array_equal(moved.ids(), expected)
    again = moved.to("meta")
    assert again.host_index is moved.host_index, "a batch already off the host keeps its copy"
    assert moved.replace(index=moved.index[:2]).host_index is None, "new rows without new host ids drop the copy"
    with pytest.raises(ValueError, match="on the host"):
        host_array(moved.index)


def _check_rows(out: Batch) -> None:
    assert out.host_index is not None, "every op keeps the host ids"
    assert np.array_equal(out.ids(), out.index.numpy())


def test_every_batch_op_keeps_host_ids_and_names_its_variants():
    b = moved_batch(teacher_view=True)
    assert np.array_equal(b.ids(), IDS)
    zeros, ones = [0] * N, [1] * N

    mixed = apply_batch_ops(b, BatchOpsConfig(scheme="mixup"), gen(1))
    _check_rows(mixed)
    assert mixed.variants().tolist() == zeros + ones and isinstance(mixed.aug["variant"], np.ndarray)
    partner = mixed.aug["mixup"]["partner"].tolist()
    assert mixed.aug["mixup"]["partner_index"].tolist() == IDS[partner].tolist()

    replaced = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix", doubled=False), gen(2))
    _check_rows(replaced)
    assert replaced.ids().tolist() == IDS.tolist() and replaced.variants().tolist() == ones

    flipped = apply_batch_ops(b, BatchOpsConfig(scheme="flip", half_split="crop"), gen(3))
    _check_rows(flipped)
    assert flipped.ids().tolist() == IDS.tolist() * 2 and flipped.variants().tolist() == zeros + ones

    split = apply_batch_ops(b, BatchOpsConfig(half_split="mask"), gen(4))
    assert split.host_index is b.host_index and split.variants().tolist() == zeros


@pytest.mark.parametrize("groups", [1, 4])
def test_cutmix_pick_pool_and_kept_rows_carry_their_ids_and_variants(groups):
    """One group (a torch generator) and four keyed groups (the per-group selection). The stub teacher's logits
    on pool row r are (s_r, -s_r) with distinct s_r >= 0: the entropy falls as s_r grows, so CutMixPick (highest
    entropy first) keeps the smallest s_r of each group, which is computed here."""
    b = moved_batch()
    runs = 3
    seen: dict = {}
    score = torch.tensor([float((7 * r) % (runs * N)) for r in range(runs * N)])  # 7 is prime to 24: distinct

    def scorer(pool: Batch):
        seen["pool"] = pool
        return torch.stack([score, -score], 1), None

    draws = gen(5) if groups == 1 else KeyedDraws(0, 2, 0, 1, groups)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix_pick", pick_pool=runs, pick_ratio=0.5, mix_groups=groups),
                          draws, scorer=scorer)
    pool = seen["pool"]
    _check_rows(pool)
    assert pool.ids().tolist() == IDS.tolist() * runs
    assert pool.variants().tolist() == [POOL_VARIANT + j for j in range(runs) for _ in range(N)]
    # rank 0 of 1 holds position i: its group is i mod groups; pool row r was made from row r mod N
    expected = []
    for g in range(groups):
        members = [r for r in range(runs * N) if (r % N) % groups == g]
        expected += sorted(members, key=lambda r: score[r])[: len(members) // 2]
    pick = out.aug["cutmix_pick"]["pick"].numpy()
    assert sorted(pick.tolist()) == sorted(expected)
    _check_rows(out)
    assert out.ids().tolist() == IDS.tolist() + IDS[pick % N].tolist()
    assert out.variants().tolist() == [0] * N + (1 + pick // N).tolist()


# ------------------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loaders_hand_their_ids_on_the_host_as_copies(resume_data, loader):
    """All the batches of an epoch held at once: each keeps the ids of its slice of the epoch's order, as an int64
    numpy array (ids sharing a buffer that the loader reused would show a later batch's)."""
    from hpckd.data.datasets import load_splits
    from hpckd.train.experiment import load_experiment

    cfg = load_experiment(None, [f"data.root={resume_data}", "model.arch=resnet8", "data.index_cache=false"])
    train, _ = load_splits(cfg.data)
    reader = loader_class(loader)(train.source, train.labels, view_policies(cfg, []), batch_size=16, train=True,
                                  shard=ShardSpec(0, 1), seed=3, num_threads=1, device=torch.device("cpu"),
                                  mean=cfg.data.mean, std=cfg.data.std, image_format=image_format(cfg))
    reader.set_epoch(1)
    batches = list(reader)
    order = epoch_order(len(train.labels), ShardSpec(0, 1), batch_size=16, train=True, seed=3, epoch=1)
    assert len(batches) == STEPS_PER_EPOCH
    for i, batch in enumerate(batches):
        assert isinstance(batch.host_index, np.ndarray) and batch.host_index.dtype == np.int64
        assert batch.ids().tolist() == order[16 * i: 16 * (i + 1)].tolist(), i


# ------------------------------------------------------------------------------------------------ the real loop


def _student_from_a_store(root: Path, tmp: Path, monkeypatch, *batch_ops: str) -> tuple[list[int], int]:
    """Torch host reads per micro-step of a 1-epoch student distilled from a store written for its config, and
    how many teacher calls the store served."""
    from hpckd.teachers.store import StoreSource
    from hpckd.teachers.store_writer import cache

    engine.run(config(root, tmp / "teacher", "optim.epochs=1"), mode="train")
    student = ("optim.epochs=1", f"teachers=[{{checkpoint: {tmp / 'teacher' / 'last.pt'}}}]", "loss.name=kd",
               "batch_ops.mix_groups=4", *batch_ops)
    store = cache(config(root, tmp / "unused", *student), epochs=1, out=str(tmp / "store"), log=lambda line: None)
    served = []
    original = StoreSource.__call__

    def serving(self, batch):  # the real lookup, counted when it reads the store (training calls)
        served.append(self._training > 0)
        return original(self, batch)

    monkeypatch.setattr(StoreSource, "__call__", serving)
    counter = SyncCounter(monkeypatch)
    marks, hook = calls_between_micro_steps(counter)
    engine.run(config(root, tmp / "student", *student, "serving.mode=cached", f"serving.store={store}"),
               mode="distill", hooks=[hook])
    assert len(marks) == STEPS_PER_EPOCH
    return [b - a for a, b in zip(marks, marks[1:])], sum(served)


@pytest.mark.slow
def test_a_student_from_the_store_with_cutmix_reads_nothing_on_the_host_between_check_points(
        resume_data, tmp_path, monkeypatch):
    per_micro, served = _student_from_a_store(resume_data, tmp_path, monkeypatch, "batch_ops.scheme=cutmix")
    assert served == STEPS_PER_EPOCH, "every micro-step's teacher logits came from the store"
    # Micro-step 1 (a check point, as in tests/test_hotpath.py): the loss's input checks (one sync), its loss value
    # (one), the check point's one transfer of the flags: 3. The store lookups, the CutMix draws (keyed by the host
    # ids) and the doubled batch add none. Micro-steps 2..5: 0 (6 ends the epoch, not in the list).
    assert per_micro[0] == 3, per_micro
    assert per_micro[1:] == [0] * (STEPS_PER_EPOCH - 2), per_micro


@pytest.mark.slow
def test_a_student_from_the_store_with_cutmix_pick_reads_only_the_kept_rows(resume_data, tmp_path, monkeypatch):
    per_micro, served = _student_from_a_store(resume_data, tmp_path, monkeypatch, "batch_ops.scheme=cutmix_pick")
    assert served == 2 * STEPS_PER_EPOCH, "the pool's scores and the kept batch's logits came from the store"
    # As above plus CutMixPick's one read per micro-step: the kept pool rows (all 4 mixing groups in one transfer),
    # which its host records and the store lookups of the kept rows need. The pool's scores come from the store.
    assert per_micro[0] == 3 + 1, per_micro
    assert per_micro[1:] == [1] * (STEPS_PER_EPOCH - 2), per_micro


# ------------------------------------------------------------------------------------------------ teacher_parallel
SIZES = (5, 3)  # uneven, as the last evaluation batch can be


def _sizes_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    from hpckd import dist as hdist
    from hpckd.teachers import shard

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=len(SIZES))
    try:
        reads: list[str] = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            def counted(tensor, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
                reads.append(_name)
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        sizes = [shard.gather_sizes(SIZES[rank], torch.device("cpu")) for _ in range(3)]
        torch.save({"sizes": sizes, "reads": reads}, f"{tmp}/sizes{rank}.pt")
    finally:
        hdist.shutdown()


@pytest.mark.dist
def test_teacher_parallel_learns_the_batch_sizes_without_reading_a_tensor(tmp_path):
    """``shard.gather_sizes`` on two gloo ranks: every rank gets both ranks' sizes, and reads them from numpy, not
    from a torch tensor (the old device gather read each size back with ``Tensor.item``)."""
    import torch.multiprocessing as mp

    mp.spawn(_sizes_worker, args=(str(tmp_path),), nprocs=len(SIZES), join=True)
    for rank in range(len(SIZES)):
        out = torch.load(tmp_path / f"sizes{rank}.pt")
        assert out["sizes"] == [list(SIZES)] * 3 and out["reads"] == [], (rank, out)
