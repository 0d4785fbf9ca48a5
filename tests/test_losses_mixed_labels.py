"""Mixed labels: on rows made by Mixup/CutMix/CutMixPick the hard-label term is the CE of the mixed target
lam y_i + (1 - lam) y_j (Zhang et al. 2018 Eq. 1; Yun et al. 2019 Eq. 1), checked in numpy from the images'
own labels and the partners recorded by the batch op; ``loss.mixed_labels=false`` keeps the source label only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config.methods import BatchOpsConfig, LossConfig
from hpckd.data.batchops import apply_batch_ops
from hpckd.losses import build_loss
from tests.helpers import gen, image_batch as make_batch

C = 3  # make_batch labels are arange(n) % 3


def numpy_ce(logits: np.ndarray, labels: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Per-row CE against (1 - eps) onehot + eps / C, with a float64 log-softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full_like(logp, eps / logp.shape[1])
    target[np.arange(len(labels)), labels] += 1.0 - eps
    return -(target * logp).sum(axis=1)


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("scheme", ["mixup", "cutmix"])
@pytest.mark.parametrize("doubled", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_uses_the_mixed_target_on_mixed_rows(scheme, doubled, eps):
    before = make_batch(n=8)
    out = apply_batch_ops(before, BatchOpsConfig(scheme=scheme, doubled=doubled, lam_per_sample=True), gen(5))
    record = out.aug[scheme]
    own = before.labels.numpy()
    partner = own[record["partner"].numpy()]  # labels of the images pasted/blended in, from the op's record
    lam = record["lam"].numpy().astype(np.float64)
    assert (partner != own).any() and ((lam > 0) & (lam < 1)).any(), "the check must see real mixing"

    logits = logits_for(out.size)
    z = logits.numpy()
    mixed_rows = slice(8, 16) if doubled else slice(0, 8)
    expected = np.empty(out.size)
    expected[mixed_rows] = lam * numpy_ce(z[mixed_rows], own, eps) + (1 - lam) * numpy_ce(z[mixed_rows], partner, eps)
    if doubled:
        expected[:8] = numpy_ce(z[:8], own, eps)  # the original half keeps its one-hot label

    terms = build_loss(LossConfig(name="ce", label_smoothing=eps))(logits, [], out)
    assert float(terms["loss"]) == pytest.approx(expected.mean(), rel=1e-12)


def test_mixed_labels_off_uses_the_source_label_only():
    before = make_batch(n=8)
    out = apply_batch_ops(before, BatchOpsConfig(scheme="mixup", doubled=False), gen(6))
    logits = logits_for(out.size, seed=1)
    expected = numpy_ce(logits.numpy(), before.labels.numpy()).mean()
    terms = build_loss(LossConfig(name="ce", mixed_labels=False))(logits, [], out)
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-12)
    mixed = build_loss(LossConfig(name="ce"))(logits, [], out)
    assert float(mixed["loss"]) != pytest.approx(expected, rel=1e-6), "the two options must differ on this batch"


def test_kd_hard_label_term_is_mixed_and_kd_term_is_not_touched():
    before = make_batch(n=8)
    out = apply_batch_ops(before, BatchOpsConfig(scheme="cutmix", doubled=False, lam_per_sample=True), gen(7))
    rec = out.aug["cutmix"]
    own, lam = before.labels.numpy(), rec["lam"].numpy().astype(np.float64)
    partner = own[rec["partner"].numpy()]
    student, teacher = logits_for(8, seed=2), logits_for(8, seed=3)
    z = student.numpy()
    ce = (lam * numpy_ce(z, own) + (1 - lam) * numpy_ce(z, partner)).mean()
    tau = 4.0
    pt = np.exp(teacher.numpy() / tau)
    pt /= pt.sum(axis=1, keepdims=True)
    zs = z / tau - (z / tau).max(axis=1, keepdims=True)
    log_ps = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    kd = (tau * tau * -(pt * log_ps).sum(axis=1)).mean()
    terms = build_loss(LossConfig(name="kd", alpha=0.2, tau=tau))(student, [teacher], out)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-12)
    assert float(terms["kd"]) == pytest.approx(kd, rel=1e-12)
    assert float(terms["loss"]) == pytest.approx(0.2 * ce + 0.8 * kd, rel=1e-12)


def test_cutmix_pick_records_the_kept_rows_partners():
    before = make_batch(n=8)
    cfg = BatchOpsConfig(scheme="cutmix_pick", doubled=True, pick_pool=3, pick_ratio=0.5)
    scores = torch.randn(24, C, generator=torch.Generator().manual_seed(9))
    out = apply_batch_ops(before, cfg, gen(8), scorer=lambda pool: (scores, None))
    rec, mix = out.aug["cutmix_pick"], out.label_mix
    assert "label_mix" not in out.aug, "what changes the loss is a typed field, not a replay record"
    kept = int(rec["source"].numel())
    assert kept == 12 and out.size == 8 + kept
    own = before.labels.numpy()
    assert mix.partner_label[:8].tolist() == own.tolist() and mix.lam[:8].tolist() == [1.0] * 8
    assert mix.partner_label[8:].tolist() == own[rec["partner"].numpy()].tolist()
    assert np.allclose(mix.lam[8:].numpy(), rec["lam"].numpy())
    assert out.labels[8:].tolist() == own[rec["source"].numpy()].tolist()
