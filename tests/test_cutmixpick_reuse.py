"""CutMixPick's kept rows reuse the teachers' pool logits (issue 17), in process with real teachers (resnet8) and
the real training step (:class:`hpckd.train.step.DistillStep`):

* the teacher logits handed to the loss for the kept rows equal each teacher run here, directly (``model(x)``), on
  the kept images rebuilt here from the input batch and the replay record (each teacher on its own view:
  teacher 1 reads a view of its own, which the pool mixes too), and the original rows' equal the teachers on the
  loader's images; the kept rows' labels and mixed-label targets match the record;
* the teachers see k*B + B rows per step (pool + original rows) for the doubled batch and k*B when x' replaces x,
  where they saw k*B + B + M and k*B + M before (M kept rows: a second pass over the kept rows);
* a step after the first makes no host read with the reuse; with ``half_split`` (the teachers see half images,
  not the pool's, so nothing can be reused) the kept rows are read once and the teachers run on the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from hpckd.config.methods import BatchOpsConfig
from hpckd.data.batch import Batch
from hpckd.data.cutmixpick import n_keep
from hpckd.losses import LossConfig, build_loss
from hpckd.models import create
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.serving import TeacherSet
from hpckd.train.step import DataStats, DistillStep
from tests.helpers import IMAGENET_MEAN, IMAGENET_STD, image_batch
from tests.test_hotpath import SyncCounter

pytestmark = pytest.mark.usefixtures("one_torch_thread")
B, RUNS, GROUPS, CLASSES = 8, 3, 4, 4
# rank 0 of 1: B rows in GROUPS groups of B / GROUPS; each group keeps round(0.5 * RUNS * B / GROUPS) pool rows
KEPT = GROUPS * n_keep(RUNS * B // GROUPS, 0.5)  # 4 * 3 = 12
# fp32 on the CPU: the same images in another batch composition may move a logit in its last bits
ATOL = 1e-4


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("resnet8", CLASSES).eval()


class RecordingLoss:
    """The real loss, with the teacher logits it was handed kept for the test."""

    def __init__(self, name: str) -> None:
        self.inner = build_loss(LossConfig(name=name))
        self.teacher_logits: list[torch.Tensor] = []

    def __call__(self, student_logits, teacher_logits, batch):
        self.teacher_logits = [t.detach().clone() for t in teacher_logits]
        return self.inner(student_logits, teacher_logits, batch)

    def compute(self, student_logits, teacher_logits, batch):
        self.teacher_logits = [t.detach().clone() for t in teacher_logits]
        return self.inner.compute(student_logits, teacher_logits, batch)


def _step(doubled: bool, half_split: str = "none"):
    teachers = [_model(1), _model(2)]
    rows = [0, 0]

    def count(k):
        def hook(module, args):
            rows[k] += args[0].shape[0]
        return hook

    for k, m in enumerate(teachers):
        m.register_forward_pre_hook(count(k))
    student = _model(3).train()
    ops = BatchOpsConfig(scheme="cutmix_pick", doubled=doubled, pick_pool=RUNS, pick_ratio=0.5, mix_groups=GROUPS,
                         half_split=half_split)
    loss = RecordingLoss("kd_da" if doubled else "kd")
    device = torch.device("cpu")
    step = DistillStep(student, TeacherSet.from_models(teachers, device), loss, ops,  # type: ignore[arg-type]
                       DataStats("cifar", list(IMAGENET_MEAN), list(IMAGENET_STD)), PrecisionPolicy(device), seed=5,
                       rank=0, world=1, deferred_checks=True)
    return step, teachers, rows, loss


def _batch() -> Batch:
    """32 px images (resnet8's input), a view of teacher 1's own (the flipped image), ids on the host."""
    b = image_batch(n=B, h=32, w=32, seed=3, teacher_view=True)
    return b.replace(labels=torch.arange(B) % CLASSES).to("cpu")


def _rebuilt(view: torch.Tensor, rec: dict) -> torch.Tensor:
    """The kept images from the loader's view and the record: each kept row is its source image with its box
    pasted from its partner (Yun et al. 2019, Alg. A1), done here pixel block by pixel block."""
    out = []
    for source, partner, box in zip(rec["source"].tolist(), rec["partner"].tolist(), rec["box"].tolist()):
        x = view[source].clone()
        top, left, bottom, right = box
        x[:, top:bottom, left:right] = view[partner][:, top:bottom, left:right]
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("doubled", [True, False])
def test_kept_rows_teacher_logits_are_the_teachers_on_the_kept_images_from_one_pass(doubled):
    step, teachers, rows, loss = _step(doubled)
    batch = _batch()
    out = step(batch, epoch=0, epoch_step=0)
    assert out.problem == ""
    rec = out.batch.aug["cutmix_pick"]
    assert rec["source"].numel() == KEPT
    head = B if doubled else 0
    assert out.batch.size == head + KEPT
    # Teachers: the pool (RUNS * B rows) and the original rows of a doubled batch, nothing for the kept rows.
    assert rows == [RUNS * B + head] * 2, rows  # 32 (doubled) / 24; before: + KEPT = 44 / 36
    with torch.no_grad():
        for k, model in enumerate(teachers):
            view = batch.view(f"teacher{k}")
            direct = model(_rebuilt(view, rec))
            handed = loss.teacher_logits[k]
            assert handed.shape == (head + KEPT, CLASSES)
            assert torch.allclose(handed[head:], direct, atol=ATOL, rtol=0), (k, (handed[head:] - direct).abs().max())
            if doubled:
                assert torch.allclose(handed[:head], model(view), atol=ATOL, rtol=0), k
    # The kept images the student trains on are the rebuilt ones, and so are teacher 1's (its own view, mixed)
    assert torch.equal(out.batch.views["student"][head:], _rebuilt(batch.views["student"], rec))
    assert torch.equal(out.batch.views["teacher1"][head:], _rebuilt(batch.views["teacher1"], rec))
    assert not torch.equal(out.batch.views["teacher1"][head:], out.batch.views["student"][head:])
    # Labels and mixed-label targets of the kept rows, from the record: y_source, y_partner, lam = kept area share
    labels = batch.labels
    box = rec["box"]
    area = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).double()
    assert out.batch.labels[head:].tolist() == labels[rec["source"]].tolist()
    assert out.batch.index[head:].tolist() == batch.index[rec["source"]].tolist()
    assert out.batch.label_mix.partner_label[head:].tolist() == labels[rec["partner"]].tolist()
    assert torch.allclose(out.batch.label_mix.lam[head:].double(), 1.0 - area / (32 * 32), atol=1e-6)
    assert rec["partner_index"].tolist() == batch.index[rec["partner"]].tolist()
    assert out.batch.variants().tolist() == [0] * head + (1 + rec["pick"] // B).tolist()
    if doubled:
        assert out.batch.doubled.tolist() == [False] * B + [True] * KEPT
        assert out.batch.label_mix.lam[:B].tolist() == [1.0] * B


@pytest.mark.parametrize("doubled", [True, False])
def test_a_step_with_reuse_reads_nothing_on_the_host(doubled, monkeypatch):
    step, _, rows, _ = _step(doubled)
    step(_batch(), epoch=0, epoch_step=0)  # the first call runs the loss's input checks (host reads)
    counter = SyncCounter(monkeypatch)
    out = step(_batch(), epoch=0, epoch_step=1)
    assert counter.calls == [], counter.calls
    assert out.batch.host_index is None, "the kept rows' ids are only on the device"
    assert out.batch.known_logits is not None and out.flags is not None


def test_with_half_split_the_kept_rows_are_read_once_and_the_teachers_run_on_the_whole_batch(monkeypatch):
    """The half split gives the teachers half images after CutMixPick: the pool's logits are not theirs, so the
    step keeps the earlier behaviour: one read of the kept rows (host ids and variants for a logit store) and a
    teacher pass over the original and the kept rows."""
    step, teachers, rows, loss = _step(True, half_split="crop")
    step(_batch(), epoch=0, epoch_step=0)
    rows[:] = [0, 0]
    counter = SyncCounter(monkeypatch)
    batch = _batch()
    out = step(batch, epoch=0, epoch_step=1)
    assert counter.calls == ["cpu"], counter.calls
    assert rows == [RUNS * B + B + KEPT] * 2, rows
    assert out.batch.known_logits is None and out.batch.host_index is not None
    rec = out.batch.aug["cutmix_pick"]
    with torch.no_grad():  # teacher 0 on the left half of its kept images: computed here
        left = _rebuilt(batch.view("teacher0"), rec)[..., :16]
        assert torch.allclose(loss.teacher_logits[0][B:], teachers[0](left), atol=ATOL, rtol=0)
