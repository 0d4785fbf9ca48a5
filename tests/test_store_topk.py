"""Top-k logit stores in the KD losses: the error against full logits, measured on real teacher outputs and bounded
by the value derived in hpckd/teachers/store.py. With p, q the teacher's and the reconstructed tempered
distributions, s the student's, and t_p, t_q their masses outside the top k:

    ||p - q||_1 <= 2 (t_p + t_q)
    |CE(q, s) - CE(p, s)| = |sum_j (q_j - p_j) log s_j| <= 1/2 ||p - q||_1 (max_j log s_j - min_j log s_j)
    |H(q) - H(p)| <= 1/2 ||p - q||_1 (max_j log max(p_j, q_j) - min_j log min(p_j, q_j))   (mean value theorem)

(sum_j (q_j - p_j) = 0, so any constant can be taken off the second factor: half its range is what is left). The
KD loss is tau^2 CE (kd_form=cross_entropy) or tau^2 (CE - H) (kd_form=kl), averaged over the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config.methods import LossConfig
from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.losses import build_loss
from hpckd.teachers.store import decode, encode
from tests.helpers import label_batch, run_hpckd, softmax, val_logits

pytestmark = pytest.mark.slow  # trains two small models through the real `hpckd` command


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) float64 logits of two trained resnet8s on 10-class validation images."""
    root = tmp_path_factory.mktemp("topk") / "data"
    write_imagefolder(root, SynthSpec(classes=10, per_class=8, val_per_class=4, seed=3))
    found = []
    for seed, epochs in ((0, 3), (1, 1)):
        out = tmp_path_factory.mktemp(f"topk_model{seed}")
        proc = run_hpckd("train", f"data.root={root}", f"out_dir={out}", "model.arch=resnet8", f"optim.epochs={epochs}",
                         f"seed={seed}", "data.batch_size=16", "data.num_workers=1", "data.loader=torch")
        assert proc.returncode == 0, proc.stderr
        found.append(val_logits(out / "last.pt", root))
    return found[0], found[1]


def _bound(p: np.ndarray, q: np.ndarray, s: np.ndarray, form: str) -> np.ndarray:
    """Per-sample bound on the KD loss difference / tau^2 (see the module docstring)."""
    l1 = np.abs(p - q).sum(1)
    log_s = np.log(s)
    bound = 0.5 * l1 * (log_s.max(1) - log_s.min(1))
    if form == "kl":
        bound = bound + 0.5 * l1 * (np.log(np.maximum(p, q)).max(1) - np.log(np.minimum(p, q)).min(1))
    return bound


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("form", ["kl", "cross_entropy"])
def test_kd_loss_from_topk_targets_stays_within_the_derived_bound(outputs, k, form):
    teacher, student = outputs
    tau = 4.0
    n, c = teacher.shape
    full = torch.from_numpy(teacher).float()
    topk = decode(encode(full, k), c)
    assert topk.shape == (n, c)
    loss = build_loss(LossConfig(name="kd", tau=tau, kd_form=form, ce_weight=0.0, kd_weight=1.0))
    batch = label_batch(np.zeros(n, dtype=np.int64))
    s = torch.from_numpy(student).float()
    exact = float(loss(s, [full.half().float()], batch)["loss"])  # fp16 full logits: what a full store holds
    approx = float(loss(s, [topk], batch)["loss"])
    # the bound, from the tempered distributions (numpy, float64)
    p, q, ps = softmax(full.half().double().numpy(), tau), softmax(topk.double().numpy(), tau), softmax(student, tau)
    mask = np.zeros((n, c), dtype=bool)
    np.put_along_axis(mask, np.argsort(-teacher, axis=1, kind="stable")[:, :k], True, 1)
    assert (np.abs(p - q).sum(1) <= 2.0 * ((p * ~mask).sum(1) + (q * ~mask).sum(1)) + 1e-12).all()
    per_sample = _bound(p, q, ps, form)
    bound = tau**2 * per_sample.mean()
    error = abs(approx - exact)
    assert error <= bound, (k, form, error, bound)
    assert error > 0, "top-k changes the targets"
    print(f"k={k} form={form}: |KD(top-k) - KD(full)| = {error:.4g} <= bound {bound:.4g} (loss {exact:.4g})")


def test_more_classes_kept_means_a_smaller_error(outputs):
    teacher, student = outputs
    full = torch.from_numpy(teacher).float()
    loss = build_loss(LossConfig(name="kd", tau=4.0, kd_form="kl", ce_weight=0.0))
    batch = label_batch(np.zeros(len(teacher), dtype=np.int64))
    s = torch.from_numpy(student).float()
    exact = float(loss(s, [full.half().float()], batch)["loss"])
    errors = [abs(float(loss(s, [decode(encode(full, k), 10)], batch)["loss"]) - exact) for k in (1, 3, 6, 9)]
    assert errors[-1] < errors[0], errors
