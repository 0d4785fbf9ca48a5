"""The hot path of a student trained from a logit store, with batch ops (issue 17): no device read per micro-step.

* The sample ids travel on the host next to the device ones (``Batch.host_index``): both loaders set them from the
  CPU ids they already hold (a copy, never a view of a loader's buffer), ``Batch.to`` keeps them, and
  every batch op reorders them with its host row choices, so ``Batch.ids()`` always equals ``index`` and the
  variants name the rows as the batch ops' docstring says (0, 1, ``POOL_VARIANT + j``). CutMixPick without a half
  split chooses its kept rows on the device and leaves their host ids unknown (``host_index`` None; ``ids()`` and
  ``variants()`` then read the device, still naming the rows right); with a half split it keeps host ids.
* On the real loop (``engine.run``), a student distilled from a real store (``serving.mode=cached``) with doubled
  CutMix makes no torch host read (``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``,
  ``numpy``, counted by :class:`tests.test_hotpath.SyncCounter`) on any micro-step between check points; nor does
  CutMixPick, from the store or with inline teachers (its kept rows' teacher logits are the pool's); with a half
  split CutMixPick reads its kept rows once per micro-step, as the store lookups of the kept rows need their ids.
* A store written before the kept rows reused the pool's logits (it also holds the kept rows) still serves, trains
  the same student, is accepted by a rerun of the writer and verifies, kept rows included.
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


@pytest.mark.parametrize("half_split", ["none", "crop"])
@pytest.mark.parametrize("groups", [1, 4])
def test_cutmix_pick_pool_and_kept_rows_carry_their_ids_and_variants(groups, half_split):
    """One group (a torch generator) and four keyed groups (the per-group selection). The stub teacher's logits
    on pool row r are (s_r, -s_r) with distinct s_r >= 0: the entropy falls as s_r grows, so CutMixPick (highest
    entropy first) keeps the smallest s_r of each group, which is computed here. Without a half split the kept
    rows are chosen on the device: no host ids (``ids()`` / ``variants()`` read them back from the device)."""
    b = moved_batch()
    runs = 3
    seen: dict = {}
    score = torch.tensor([float((7 * r) % (runs * N)) for r in range(runs * N)])  # 7 is prime to 24: distinct

    def scorer(pool: Batch):
        seen["pool"] = pool
        return torch.stack([score, -score], 1), None

    draws = gen(5) if groups == 1 else KeyedDraws(0, 2, 0, 1, groups)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix_pick", pick_pool=runs, pick_ratio=0.5, mix_groups=groups,
                                            half_split=half_split), draws, scorer=scorer)
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
    if half_split == "none":
        assert out.host_index is None and isinstance(out.aug["variant"], torch.Tensor)
        assert out.known_logits is None, "the stub scorer gave no per-teacher logits to reuse"
    else:
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


@pytest.fixture(scope="module")
def teacher(resume_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hotpath_store_teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SLURM_JOB_ID", raising=False)
        engine.run(config(resume_data, out, "optim.epochs=1"), mode="train")
    return out / "last.pt"


def _student_args(teacher: Path, *batch_ops: str) -> tuple[str, ...]:
    return ("optim.epochs=1", f"teachers=[{{checkpoint: {teacher}}}]", "loss.name=kd", "batch_ops.mix_groups=4",
            *batch_ops)


def _write_store(root: Path, teacher: Path, out: Path, *batch_ops: str) -> Path:
    from hpckd.teachers.store_writer import cache

    return cache(config(root, out.parent / "unused", *_student_args(teacher, *batch_ops)), epochs=1, out=str(out),
                 log=lambda line: None)


class TeacherCalls:
    """The training step's teacher calls (inside ``DistillStep.__call__``, not the evaluation's), as the row count
    of each: the store lookups (``StoreSource`` inside its training context) or the inline teachers' calls; the
    real ones run."""

    def __init__(self, monkeypatch) -> None:
        from hpckd.teachers.serving import TeacherSet
        from hpckd.teachers.store import StoreSource
        from hpckd.train.step import DistillStep

        self.served: list[int] = []
        self.inline: list[int] = []
        self._in_step = 0
        store_call, inline_call, step_call = StoreSource.__call__, TeacherSet.__call__, DistillStep.__call__

        def serving(source, batch):
            if self._in_step and source._training:
                self.served.append(batch.size)
            return store_call(source, batch)

        def running(teachers, batch):
            if self._in_step:
                self.inline.append(batch.size)
            return inline_call(teachers, batch)

        def stepping(step, *args, **kwargs):
            self._in_step += 1
            try:
                return step_call(step, *args, **kwargs)
            finally:
                self._in_step -= 1

        monkeypatch.setattr(StoreSource, "__call__", serving)
        monkeypatch.setattr(TeacherSet, "__call__", running)
        monkeypatch.setattr(DistillStep, "__call__", stepping)


def _student(root: Path, teacher: Path, out: Path, monkeypatch, store: Path | None,
             *batch_ops: str) -> tuple[list[int], TeacherCalls]:
    """Torch host reads per micro-step of a 1-epoch student distilled from ``store`` (or inline teachers when
    None), and its teacher calls."""
    serving = ("serving.mode=cached", f"serving.store={store}") if store is not None else ()
    calls = TeacherCalls(monkeypatch)
    counter = SyncCounter(monkeypatch)
    marks, hook = calls_between_micro_steps(counter)
    engine.run(config(root, out, *_student_args(teacher, *batch_ops), *serving), mode="distill", hooks=[hook])
    assert len(marks) == STEPS_PER_EPOCH
    return [b - a for a, b in zip(marks, marks[1:])], calls


@pytest.mark.slow
def test_a_student_from_the_store_with_cutmix_reads_nothing_on_the_host_between_check_points(
        resume_data, teacher, tmp_path, monkeypatch):
    store = _write_store(resume_data, teacher, tmp_path / "store", "batch_ops.scheme=cutmix")
    per_micro, calls = _student(resume_data, teacher, tmp_path / "student", monkeypatch, store,
                                "batch_ops.scheme=cutmix")
    assert calls.served == [2 * 16] * STEPS_PER_EPOCH, "every micro-step's teacher logits came from the store"
    # Micro-step 1 (a check point, as in tests/test_hotpath.py): the loss's input checks (one sync), its loss value
    # (one), the check point's one transfer of the flags: 3. The store lookups, the CutMix draws (keyed by the host
    # ids) and the doubled batch add none. Micro-steps 2..5: 0 (6 ends the epoch, not in the list).
    assert per_micro[0] == 3, per_micro
    assert per_micro[1:] == [0] * (STEPS_PER_EPOCH - 2), per_micro


@pytest.mark.slow
@pytest.mark.parametrize("serving", ["cached", "inline"])
def test_a_student_with_cutmix_pick_reads_nothing_on_the_host_between_check_points(
        resume_data, teacher, tmp_path, monkeypatch, serving):
    pick = "batch_ops.scheme=cutmix_pick"
    store = _write_store(resume_data, teacher, tmp_path / "store", pick) if serving == "cached" else None
    per_micro, calls = _student(resume_data, teacher, tmp_path / "student", monkeypatch, store, pick)
    # Two teacher calls per micro-step: the pool (k * B = 2 * 16 rows: scores, and the kept rows' logits) and the
    # doubled batch's original rows (16); none for the kept rows (16 more rows before).
    expected = [2 * 16, 16] * STEPS_PER_EPOCH
    assert (calls.served, calls.inline) == ((expected, []) if serving == "cached" else ([], expected))
    # Micro-step 1: the 3 reads of any first micro-step (loss input checks, loss value, the check point's flags);
    # CutMixPick adds none: the kept pool rows stay on the device (views, labels, ids, markers, mixed labels and
    # teacher logits are device gathers). Micro-steps 2..5: 0.
    assert per_micro[0] == 3 + 0, per_micro
    assert per_micro[1:] == [0] * (STEPS_PER_EPOCH - 2), per_micro


@pytest.mark.slow
def test_a_student_with_cutmix_pick_and_half_split_reads_its_kept_rows_once(resume_data, teacher, tmp_path,
                                                                          monkeypatch):
    """After a half split the teachers see half images, not the pool's: the kept rows' logits cannot be the pool's,
    so they are looked up in the store, which needs their ids on the host: one read per micro-step stays."""
    ops = ("batch_ops.scheme=cutmix_pick", "batch_ops.half_split=crop")
    store = _write_store(resume_data, teacher, tmp_path / "store", *ops)
    per_micro, calls = _student(resume_data, teacher, tmp_path / "student", monkeypatch, store, *ops)
    # the pool (2 x 16 rows), then the whole doubled batch (16 original + 16 kept rows) from the store
    assert calls.served == [2 * 16, 16 + 16] * STEPS_PER_EPOCH and calls.inline == [], calls.served
    # 3 as for any first micro-step, plus the kept pool rows (all 4 mixing groups in one transfer); then 1 each.
    assert per_micro[0] == 3 + 1, per_micro
    assert per_micro[1:] == [1] * (STEPS_PER_EPOCH - 2), per_micro


@pytest.mark.slow
def test_a_store_written_before_the_reuse_still_serves_and_verifies(resume_data, teacher, tmp_path, monkeypatch):
    """The store of the earlier writer, made by the writer's own replay with a teacher call on the whole output
    batch (the kept rows 1 + j too) and the layout that counted them: a superset of the new store, row for row
    equal where both hold a row; a student trained from it equals the one trained from the new store, and a
    rerun of the writer accepts it and verifies it, kept rows included."""
    from hpckd.teachers import store_writer
    from hpckd.teachers.store import LogitStore, read_shard

    pick = "batch_ops.scheme=cutmix_pick"
    new = _write_store(resume_data, teacher, tmp_path / "new", pick)
    with monkeypatch.context() as mp:
        rows, count = store_writer.Replayer.rows, store_writer.rows_per_micro_batch
        mp.setattr(store_writer.Replayer, "rows", lambda self, batch, every_row=False: rows(self, batch, True))
        mp.setattr(store_writer, "rows_per_micro_batch", lambda bo, micro: count(bo, micro, kept_rows=True))
        old = _write_store(resume_data, teacher, tmp_path / "old", pick)
    stores = {"new": LogitStore(new), "old": LogitStore(old)}
    for s in stores.values():
        s.load_epoch(0)
    # 6 steps of 16 rows: pool 2 x 16, originals 16, and (old) 16 kept (4 groups of 4 rows keep 4 of 8 pool rows)
    assert len(stores["new"]._codes) == 6 * 48 and len(stores["old"]._codes) == 6 * 64
    assert stores["old"].manifest["layout"]["rows_per_epoch"] == 6 * 64
    extra = np.setdiff1d(stores["old"]._codes, stores["new"]._codes)
    assert len(extra) == 6 * 16 and set((extra % 256).tolist()) <= {1, 2}, "the old store adds the kept rows only"
    ids, variants = stores["new"]._codes // 256, stores["new"]._codes % 256
    for a, b in zip(stores["new"].logits(0, ids, variants), stores["old"].logits(0, ids, variants)):
        assert torch.equal(a, b)

    weights = {}
    for name, folder in (("new", new), ("old", old)):
        _student(resume_data, teacher, tmp_path / f"student_{name}", monkeypatch, folder, pick)
        weights[name] = torch.load(tmp_path / f"student_{name}" / "last.pt", weights_only=False)["model"]
    assert weights["new"].keys() == weights["old"].keys()
    assert all(torch.equal(weights["new"][k], weights["old"][k]) for k in weights["new"])

    # The writer's rerun: the old layout is accepted (nothing to write), and the verifier's entries (seed 0, the
    # same draws as verify_store) include kept rows, which its replay recomputes.
    lines: list[str] = []
    cfg = config(resume_data, tmp_path / "unused", *_student_args(teacher, pick))
    store_writer.cache(cfg, epochs=1, out=str(old), verify=24, log=lines.append)
    assert any("verified 24 stored entries" in line for line in lines), lines
    assert not any("wrote shard" in line for line in lines), lines
    rng = np.random.default_rng(0)
    shards, seen = stores["old"].index["shards"], []
    for _ in range(24):
        entry = shards[int(rng.integers(len(shards)))]
        data = read_shard(old / "shards" / entry["file"], entry["sha256"])
        seen.append(int(data["variant"][int(rng.integers(len(data["ids"])))]))
    assert {1, 2} & set(seen), seen


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
