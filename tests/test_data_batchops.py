"""Batch ops against independent expectations: Mixup is the convex combination, CutMix's box area matches its
lambda, CutMixPick keeps the highest-entropy pool rows, the doubled batch is marked, the half split halves; the
batch_ops section's own validation names the dotted key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config.methods import BatchOpsConfig
from hpckd.data.batch import Batch, LabelMix
from hpckd.data.batchops import apply_batch_ops, to_uint8, validated
from hpckd.errors import ConfigError
from hpckd.losses.augmented import augmented_half
from tests.helpers import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, gen, image_batch as make_batch


def test_mixup_is_the_convex_combination_with_a_permuted_partner():
    b = make_batch(teacher_view=True)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="mixup", mixup_alpha=0.4, lam_per_sample=True), gen(1))
    rec = out.aug["mixup"]
    partner, lam = rec["partner"].numpy(), rec["lam"].numpy()
    assert sorted(partner.tolist()) == list(range(8)) and ((lam > 0) & (lam < 1)).all() and len(set(lam.tolist())) == 8
    for view in ("student", "teacher1"):
        x = b.views[view].numpy()
        expected = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner]
        assert np.allclose(out.views[view][8:].numpy(), expected, atol=1e-6)
        assert torch.equal(out.views[view][:8], b.views[view]), "the original half is kept as it was"
    assert rec["partner_index"].tolist() == (partner + 100).tolist()


def test_one_lambda_per_batch_by_default():
    out = apply_batch_ops(make_batch(), BatchOpsConfig(scheme="mixup"), gen(2))
    assert len(set(out.aug["mixup"]["lam"].tolist())) == 1


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_box_holds_the_partner_and_its_area_matches_lambda(per_sample):
    h, w = 16, 20
    b = make_batch(h=h, w=w)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix", lam_per_sample=per_sample), gen(3))
    rec = out.aug["cutmix"]
    x, mixed = b.views["student"].numpy(), out.views["student"][8:].numpy()
    for i in range(8):
        top, left, bottom, right = rec["box"][i].tolist()
        j = int(rec["partner"][i])
        inside = np.zeros((h, w), bool)
        inside[top:bottom, left:right] = True
        assert np.array_equal(mixed[i][:, inside], x[j][:, inside])
        assert np.array_equal(mixed[i][:, ~inside], x[i][:, ~inside])
        # Yun et al.: lambda is the share of the image that keeps the source pixels
        assert abs(float(rec["lam"][i]) - (1 - inside.sum() / (h * w))) < 1e-6
    if not per_sample:
        assert len({tuple(r) for r in rec["box"].tolist()}) == 1, "one box for the whole batch"


def test_cutmix_box_side_is_sqrt_one_minus_lambda():
    from hpckd.data.batchops import cutmix_boxes

    lam = torch.full((2000,), 0.64)  # side ratio sqrt(0.36) = 0.6: 9 of 16 rows, 12 of 20 columns before clipping
    boxes = cutmix_boxes(lam, 16, 20, gen(4), per_sample=True)
    heights, widths = (boxes[:, 2] - boxes[:, 0]).numpy(), (boxes[:, 3] - boxes[:, 1]).numpy()
    assert heights.max() == 2 * (int(16 * 0.6) // 2) and widths.max() == 2 * (int(20 * 0.6) // 2)
    assert (heights <= 8).all() and (heights < 8).any(), "boxes near the border are clipped"


def test_doubled_identity_appends_an_exact_copy_and_marks_it():
    b = make_batch()
    b.valid = torch.tensor([True] * 7 + [False])
    out = apply_batch_ops(b, BatchOpsConfig(scheme="identity"), gen())
    assert torch.equal(out.views["student"], torch.cat([b.views["student"]] * 2))
    assert out.doubled.tolist() == [False] * 8 + [True] * 8 and "doubled" not in out.aug
    assert out.labels.tolist() == b.labels.tolist() * 2 and out.index.tolist() == b.index.tolist() * 2
    assert out.valid.tolist() == b.valid.tolist() * 2
    assert augmented_half(out, 16, torch.device("cpu")).tolist() == [False] * 8 + [True] * 8, "the loss reads it"


def test_not_doubled_replaces_the_batch():
    b = make_batch()
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix", doubled=False), gen())
    assert out.size == 8 and out.doubled is None and not torch.equal(out.views["student"], b.views["student"])


def test_followup_flip_flips_the_standard_view():
    b = make_batch()
    out = apply_batch_ops(b, BatchOpsConfig(scheme="flip"), gen(5))
    flips = out.aug["flip"]["params"]["flip"].bool()
    pixels, again = to_uint8(b.views["student"], MEAN, STD), to_uint8(out.views["student"][8:], MEAN, STD)
    assert 0 < int(flips.sum()) < 8
    assert torch.equal(again[flips], pixels[flips].flip(-1)) and torch.equal(again[~flips], pixels[~flips])


def test_followup_cutout_blacks_out_the_recorded_square():
    b = make_batch(h=32, w=32)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutout"), gen(6))
    pixels, again = to_uint8(b.views["student"], MEAN, STD), to_uint8(out.views["student"][8:], MEAN, STD)
    for i, (top, left) in enumerate(out.aug["cutout"]["params"]["erase"].long().tolist()):
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[max(0, top):max(0, top + 16), max(0, left):max(0, left + 16)] = True  # 16 px at 32 px (DeVries)
        assert (again[i][:, mask] == 0).all() and torch.equal(again[i][:, ~mask], pixels[i][:, ~mask])


def test_followup_autoaugment_records_a_program_and_changes_images():
    b = make_batch(h=32, w=32)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="autoaugment"), gen(7), family="cifar")
    ops = out.aug["autoaugment"]["params"]["ops"]
    assert ops.shape == (8, 2)
    changed = (out.views["student"][8:] - b.views["student"]).abs().flatten(1).amax(1) > 1e-3
    assert torch.equal(changed, (ops != 0).any(1)), "exactly the samples whose program is not identity change"


def test_cutmix_pick_keeps_the_highest_entropy_pool_rows():
    b = make_batch()
    cfg = BatchOpsConfig(scheme="cutmix_pick", pick_pool=3, pick_ratio=0.5)
    seen = {}

    def scorer(pool: Batch):
        # teacher logits whose entropy rises with the pool row's mean pixel: an independent, known ranking
        seen["pool"] = pool
        m = pool.views["student"].mean(dim=(1, 2, 3))
        temperature = (m - m.min() + 0.1)[:, None]
        return torch.arange(10.0)[None, :] / temperature, None

    out = apply_batch_ops(b, cfg, gen(8), scorer=scorer)
    pool = seen["pool"]
    assert pool.size == 24
    logits = np.arange(10.0)[None, :] / (pool.views["student"].mean(dim=(1, 2, 3)).numpy() -
                                        pool.views["student"].mean(dim=(1, 2, 3)).numpy().min() + 0.1)[:, None]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    expected = np.argsort(-entropy, kind="stable")[:12]
    rec = out.aug["cutmix_pick"]
    assert sorted(rec["pick"].tolist()) == sorted(expected.tolist())
    assert torch.allclose(out.views["student"][8:], pool.views["student"][rec["pick"]])
    assert out.doubled.sum() == 12 and out.index[8:].tolist() == pool.index[rec["pick"]].tolist()
    assert pool.doubled is None and pool.label_mix is None, "the pool carries no loss markers"
    # only the logit store's row names (POOL_VARIANT + run), no replay records of the input batch
    assert list(pool.aug) == ["variant"] and pool.aug["variant"].tolist() == [64] * 8 + [65] * 8 + [66] * 8


def test_cutmix_pick_without_a_scorer_is_a_config_error():
    with pytest.raises(ConfigError, match="scorer"):
        apply_batch_ops(make_batch(), BatchOpsConfig(scheme="cutmix_pick"), gen())


def test_half_split_gives_left_to_teacher0_and_right_to_teacher1():
    b = make_batch(w=20, teacher_view=True)
    out = apply_batch_ops(b, BatchOpsConfig(half_split="crop"), gen())
    assert torch.equal(out.views["teacher0"], b.views["student"][..., :10])
    assert torch.equal(out.views["teacher1"], b.views["teacher1"][..., 10:])
    assert torch.equal(out.views["student"], b.views["student"])
    masked = apply_batch_ops(b, BatchOpsConfig(half_split="mask"), gen())
    black = to_uint8(masked.views["teacher0"][..., 10:], MEAN, STD)
    assert (black == 0).all() and torch.equal(masked.views["teacher0"][..., :10], b.views["student"][..., :10])
    assert (to_uint8(masked.views["teacher1"][..., :10], MEAN, STD) == 0).all()


def test_same_seed_same_ops_other_seed_other_ops():
    def run(seed):
        return apply_batch_ops(make_batch(), BatchOpsConfig(scheme="cutmix"), gen(seed)).views["student"]

    assert torch.equal(run(11), run(11)) and not torch.equal(run(11), run(12))


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="scheme"):
        apply_batch_ops(make_batch(), BatchOpsConfig(scheme="mixxup"), gen())


def test_ops_do_not_touch_their_input_batch():
    """Batch.replace builds new batches: the loader's batch keeps its fields (a logit store may hold on to it)."""
    b = make_batch(teacher_view=True)
    b.aug["student"] = {"flip": torch.zeros(8)}
    views, labels, aug = dict(b.views), b.labels.clone(), dict(b.aug)
    out = apply_batch_ops(b, BatchOpsConfig(scheme="cutmix", half_split="crop"), gen(9))
    assert b.views.keys() == views.keys() and all(torch.equal(b.views[k], views[k]) for k in views)
    assert torch.equal(b.labels, labels) and b.aug == aug and b.doubled is None and b.label_mix is None
    assert set(out.aug) == {"student", "cutmix", "half_split", "variant"}, "replay records only"
    assert out.aug["variant"].tolist() == [0] * 8 + [1] * 8, "the logit store's row names: loader view, CutMix"
    assert out.epoch == 2 and isinstance(out.label_mix, LabelMix) and out.doubled.sum() == 8


def test_batch_to_moves_the_loss_fields_and_keeps_replay_records():
    b = make_batch(n=4)
    b = b.replace(doubled=torch.tensor([False, False, True, True]),
                  label_mix=LabelMix(partner_label=torch.tensor([0, 1, 2, 0]), lam=torch.tensor([1.0, 1.0, 0.3, 0.6])),
                  aug={"mixup": {"lam": torch.tensor([0.3, 0.6])}})
    moved = b.to("meta")
    assert moved.doubled.device.type == "meta" and moved.label_mix.lam.device.type == "meta"
    assert moved.label_mix.partner_label.device.type == "meta" and moved.views["student"].device.type == "meta"
    assert moved.aug is b.aug and moved.epoch == b.epoch and b.doubled.device.type == "cpu"


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"scheme": "mixxup"}, "batch_ops.scheme"),
        ({"half_split": "top"}, "batch_ops.half_split"),
        ({"mixup_alpha": 0.0}, "batch_ops.mixup_alpha"),
        ({"pick_criterion": "margin"}, "batch_ops.pick_criterion"),
        ({"pick_order": "middle"}, "batch_ops.pick_order"),
        ({"pick_ratio": 0.0}, "batch_ops.pick_ratio"),
        ({"pick_ratio": 1.5}, "batch_ops.pick_ratio"),
        ({"pick_pool": 0}, "batch_ops.pick_pool"),
        ({"pick_tau": 0.0}, "batch_ops.pick_tau"),
    ],
)
def test_bad_batch_ops_values_name_the_dotted_key(changes, key):
    with pytest.raises(ConfigError) as info:
        validated(BatchOpsConfig(**changes))
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message
    validated(BatchOpsConfig(pick_ratio=1.0, pick_pool=1, pick_criterion="kl", pick_order="lowest"))  # edges are valid
