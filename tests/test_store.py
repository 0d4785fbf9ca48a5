"""The logit store's parts, in process: world-size-invariant batch ops, the stored encodings, shards, keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config import BatchOpsConfig
from hpckd.data.batch import Batch
from hpckd.data.batchops import KeyedDraws, apply_batch_ops
from hpckd.errors import ConfigError
from hpckd.teachers.store import (
    StoreError,
    decode,
    encode,
    key_difference,
    read_shard,
    write_shard,
)
from tests.helpers import image_batch


def _scorer(pool: Batch):
    """Teacher logits that are a function of each pool row's own pixels (as a real teacher's are)."""
    x = pool.views["student"]
    feats = torch.stack([x.mean((1, 2, 3)), x[:, 0].std((1, 2)), x[:, 1].amax((1, 2)), x[:, 2].amin((1, 2))], 1)
    return feats * 3.0, None


def _rows_by_key(world: int, scheme: str, doubled: bool = True) -> dict[tuple[int, int], tuple]:
    """Apply the batch ops on every rank of a ``world``-rank job (rank r gets global positions r, r + W, ... as the
    training shards deal them) and collect each output row by (sample id, variant)."""
    batch = image_batch(n=16, h=16, w=16, seed=4)
    cfg = BatchOpsConfig(scheme=scheme, doubled=doubled, lam_per_sample=True, pick_pool=2, pick_ratio=0.5,
                         mix_groups=4)
    rows = {}
    for rank in range(world):
        take = torch.arange(rank, 16, world)
        part = batch.replace(views={"student": batch.views["student"][take]}, labels=batch.labels[take],
                             index=batch.index[take])
        out = apply_batch_ops(part, cfg, KeyedDraws(seed=3, epoch=1, rank=rank, world=world, groups=4),
                              scorer=_scorer)
        lam = out.label_mix.lam if out.label_mix is not None else torch.ones(out.size)
        for i in range(out.size):
            key = (int(out.index[i]), int(out.aug["variant"][i]))
            assert key not in rows, f"{key} twice"
            rows[key] = (out.views["student"][i], float(lam[i]))
    return rows


@pytest.mark.parametrize("scheme", ["mixup", "cutmix", "cutmix_pick", "flip", "randaugment"])
def test_keyed_batch_ops_give_every_sample_the_same_mix_on_1_2_and_4_ranks(scheme):
    one = _rows_by_key(1, scheme)
    for world in (2, 4):
        other = _rows_by_key(world, scheme)
        assert other.keys() == one.keys()
        for key, (image, lam) in one.items():
            assert torch.equal(other[key][0], image), (world, key)
            assert other[key][1] == lam
    mixed = [k for k in one if k[1] > 0]
    assert mixed, "the op made rows"


def test_keyed_partners_stay_in_the_group_of_their_global_position():
    batch = image_batch(n=16, h=8, w=8)
    out = apply_batch_ops(batch, BatchOpsConfig(scheme="mixup", mix_groups=4), KeyedDraws(0, 0, 0, 1, 4))
    rec = out.aug["mixup"]
    assert ((rec["partner"] % 4) == (rec["source"] % 4)).all()
    assert len(set(rec["partner"].tolist())) == 16, "a permutation within each group"
    lam = rec["lam"].view(-1)
    for g in range(4):
        assert len(set(lam[g::4].tolist())) == 1, "one lambda per group unless lam_per_sample"


def test_other_epoch_or_seed_draws_other_mixes_and_a_rerun_the_same():
    batch = image_batch(n=16, h=8, w=8)
    cfg = BatchOpsConfig(scheme="cutmix", lam_per_sample=True)

    def boxes(seed, epoch):
        return apply_batch_ops(batch, cfg, KeyedDraws(seed, epoch, 0, 1, 8)).aug["cutmix"]["box"]

    assert torch.equal(boxes(0, 0), boxes(0, 0))
    assert not torch.equal(boxes(0, 0), boxes(0, 1)) and not torch.equal(boxes(0, 0), boxes(1, 0))


def test_world_size_that_does_not_divide_the_groups_is_one_config_error():
    with pytest.raises(ConfigError, match=r"'batch_ops.mix_groups' is 8, not a multiple of the world size 3"):
        KeyedDraws(0, 0, rank=0, world=3, groups=8)


def test_full_logits_are_stored_as_fp16():
    x = torch.randn(5, 7) * 4
    assert torch.equal(decode(encode(x, 0), 7), x.half().float())


def test_topk_keeps_the_top_probabilities_and_spreads_the_rest_evenly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    arrays = encode(x.float(), 3)
    z = decode(arrays, 10).double()
    # independently: top-3 by value, their fp16 values, the remaining mass of the exact softmax
    p = torch.softmax(x, 1).numpy()
    top = np.argsort(-x.numpy(), axis=1, kind="stable")[:, :3]
    rest = 1.0 - np.take_along_axis(p, top, 1).sum(1)
    v16 = np.take_along_axis(x.numpy(), top, 1).astype(np.float16).astype(np.float64)
    q = torch.softmax(z, 1).numpy()
    expected_top = (1.0 - rest)[:, None] * np.exp(v16) / np.exp(v16).sum(1, keepdims=True)
    np.testing.assert_allclose(np.take_along_axis(q, top, 1), expected_top, rtol=1e-5)
    others = np.ones_like(q, dtype=bool)
    np.put_along_axis(others, top, False, 1)
    np.testing.assert_allclose(q[others].reshape(6, 7), np.repeat(rest[:, None] / 7, 7, 1), rtol=1e-5)
    assert arrays["indices"].dtype == np.uint16 and arrays["values"].dtype == np.float16


def test_a_shard_round_trips_and_a_flipped_byte_is_caught(tmp_path):
    arrays = {"ids": np.arange(4, dtype=np.int64), "logits0": np.ones((4, 3), np.float16)}
    path = tmp_path / "s.shard"
    write_shard(path, arrays)
    back = read_shard(path)
    assert np.array_equal(back["ids"], arrays["ids"]) and np.array_equal(back["logits0"], arrays["logits0"])
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupt"):
        read_shard(path)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        read_shard(path)


def test_key_difference_names_the_first_field_that_differs():
    a = {"teachers": ["aa", "bb"], "seed": 0, "image": {"size": 32}}
    assert key_difference(a, dict(a)) is None
    assert key_difference(a, {**a, "teachers": ["aa", "cc"]}) == 'teachers[1]: the run has "bb", the store has "cc"'
    assert key_difference(a, {**a, "image": {"size": 64}}) == "image.size: the run has 32, the store has 64"
