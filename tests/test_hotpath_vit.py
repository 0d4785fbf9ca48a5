"""The evaluation runs each ViT teacher once per batch (issue 17): the per-block attention probabilities come out of
the forward pass that gives the logits (:func:`hpckd.models.hooks.forward_with_attentions`,
``TeacherSet.logits_and_maps``) instead of a second pass.

References are computed here, not by hpckd: the logits of a plain ``model(x)``, the attention weights torch's own
``nn.MultiheadAttention`` returns (``need_weights=True``) for each block's input captured in that plain forward,
and the same probabilities in float64 numpy from the blocks' packed q/k weights. The CPU MHA "fast path" is
switched off in some cases: there, asking a layer for its weights switches it from the fused kernel to the
explicit softmax, whose output differs in the last bits (measured below), which is what would make metrics depend
on whether attention maps were asked for if the logits came from a forward that asked for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from hpckd.data.batch import Batch
from hpckd.models import create, forward_with_attentions
from hpckd.teachers import TeacherSet
from hpckd.train.evaluation import evaluate
from hpckd.train.experiment import load_experiment

from tests.helpers import TwoPassTeachers, np_log_softmax

C = 5
MODES = ("fast_path", "no_fast_path", "bf16")  # CPU MHA fast path (native kernel), F.multi_head_attention_forward, autocast


def tiny_vit(seed: int, layers: int = 2) -> torchvision.models.VisionTransformer:
    """32 px, 8 px patches (16 patches + CLS = 17 tokens), 2 heads of 8 dims, frozen as teachers are."""
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=C)
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zeroes the head: every logit would be 0
    return vit.eval().requires_grad_(False)


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    torch.backends.mha.set_fastpath_enabled(name != "no_fast_path")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def count_forwards(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def plain_forward(vit, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits of vit(x), the input of each block's self-attention, i.e. its ln_1 output) from one plain forward."""
    inputs: list[torch.Tensor] = []
    handles = [b.ln_1.register_forward_hook(lambda _m, _a, out: inputs.append(out)) for b in vit.encoder.layers]
    try:
        logits = vit(x)
    finally:
        for h in handles:
            h.remove()
    return logits, inputs


def torch_weights(vit, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each block's per-head attention weights as torch's own MultiheadAttention returns them for that input."""
    return [b.self_attention(h, h, h, need_weights=True, average_attn_weights=False)[1]
            for b, h in zip(vit.encoder.layers, inputs)]


def np_weights(vit, inputs: list[torch.Tensor], heads: int = 2) -> list[np.ndarray]:
    """softmax(Q K^T / sqrt(d_head)) per head in float64, from each block's packed in-projection."""
    out = []
    for b, h in zip(vit.encoder.layers, inputs):
        w = b.self_attention.in_proj_weight.double().numpy()
        bias = b.self_attention.in_proj_bias.double().numpy()
        x = h.double().numpy()
        n, t, d = x.shape
        q = (x @ w[:d].T + bias[:d]).reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)
        k = (x @ w[d:2 * d].T + bias[d:2 * d]).reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
        e = np.exp(s - s.max(-1, keepdims=True))
        out.append(e / e.sum(-1, keepdims=True))
    return out


def asking_for_weights(vit, x: torch.Tensor) -> torch.Tensor:
    """The logits of a forward in which every block asks its attention for the weights (the old capture)."""
    def ask(_m, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    handles = [b.self_attention.register_forward_pre_hook(ask, with_kwargs=True) for b in vit.encoder.layers]
    try:
        return vit(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", MODES)
def test_one_forward_gives_the_plain_logits_and_torchs_attention_weights(kind):
    vit = tiny_vit(0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model_calls = count_forwards(vit)
    block_calls = [count_forwards(b.self_attention) for b in vit.encoder.layers]
    with torch.inference_mode(), mode(kind):
        expected_logits, inputs = plain_forward(vit, x)
        expected_maps = torch_weights(vit, inputs)
        old_logits = asking_for_weights(vit, x)
        model_calls[0] = 0
        for c in block_calls:
            c[0] = 0
        logits, maps = forward_with_attentions(vit, x)
    assert model_calls == [1] and all(c == [1] for c in block_calls)  # one forward, each attention layer once
    # Bit for bit: the logits are the plain forward's on every path, and the maps are what torch's MHA returns as
    # weights for the block inputs of that forward (measured equal on this CPU in fp32 and under bf16 autocast).
    assert torch.equal(logits, expected_logits)
    assert len(maps) == 2 and maps[0].shape == (8, 2, 17, 17)
    assert all(torch.equal(m, e) for m, e in zip(maps, expected_maps))
    if kind != "bf16":
        # fp32 rounding of 8-dim dot products and a 17-way softmax: measured <= 5.5e-8 from float64.
        for m, e in zip(maps, np_weights(vit, inputs)):
            np.testing.assert_allclose(m.double().numpy(), e, rtol=0, atol=1e-6)
    if kind == "no_fast_path":
        # Why the maps are computed beside the forward: asking for the weights changes the kernel and the logits
        # (measured: max |diff| 1.7e-6 here, 3.6e-5 on ViT-B/32 logits of magnitude 44).
        assert not torch.equal(old_logits, expected_logits)
        torch.testing.assert_close(old_logits, expected_logits, rtol=0, atol=1e-4)
    else:
        assert torch.equal(old_logits, expected_logits)  # the fast path and autocast: measured the same kernel
    assert not any(m._forward_hooks for m in vit.modules())  # nothing stays behind
    with torch.inference_mode(), mode(kind):
        assert torch.equal(vit(x), expected_logits)


class SequenceFirst(nn.Module):
    """Attention that is not the ViT layout (sequence-first, with a key padding mask): torch's own weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, C)
        self.mask = torch.zeros(3, 6, dtype=torch.bool)
        self.mask[:, -2:] = True  # the last two tokens are padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)
        out, _ = self.attn(h, h, h, key_padding_mask=self.mask, need_weights=False)
        return self.head(out.mean(0))


def test_other_attention_layouts_get_torchs_own_weights_in_the_same_forward():
    model = SequenceFirst().eval()
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(6))
    calls = count_forwards(model.attn)
    with torch.no_grad():
        expected = model(x)
        h = x.transpose(0, 1)
        weights = model.attn(h, h, h, key_padding_mask=model.mask, need_weights=True, average_attn_weights=False)[1]
        calls[0] = 0
        logits, maps = forward_with_attentions(model, x)
    assert calls == [1]  # the layer's forward is asked once more for its weights, not the model
    assert torch.equal(logits, expected) and len(maps) == 1 and torch.equal(maps[0], weights)
    assert maps[0].shape == (3, 2, 6, 6) and float(maps[0][..., -2:].abs().max()) == 0.0  # padding gets no weight


# ------------------------------------------------------------------------------------------ the evaluation


def batches(n_batches: int = 3, n: int = 6) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    return [Batch(views={"student": torch.randn(n, 3, 32, 32, generator=gen)},
                  labels=torch.randint(0, C, (n,), generator=gen), index=torch.arange(n) + n * i)
            for i in range(n_batches)]


def np_map(blocks: list[np.ndarray], how: str) -> np.ndarray:
    """(N, 4, 4) CLS-to-patch map: last block's heads averaged (cls), or the rollout 0.5 A + 0.5 I (App. A.7)."""
    if how == "cls":
        return blocks[-1].mean(axis=1)[:, 0, 1:].reshape(-1, 4, 4)
    rollout = None
    for a in blocks:
        a = 0.5 * a.mean(axis=1) + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:].reshape(-1, 4, 4)


def np_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.4) -> list[float]:
    def regions(m: np.ndarray) -> np.ndarray:
        lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
        return (m - lo) / np.where(hi > lo, hi - lo, 1.0) >= threshold

    ra, rb = regions(a), regions(b)
    inter, union = (ra & rb).sum(axis=(1, 2)), (ra | rb).sum(axis=(1, 2))
    return list(np.where(union > 0, inter / np.maximum(union, 1), 1.0))


@pytest.mark.parametrize("kind", ["fast_path", "no_fast_path"])
def test_evaluation_runs_each_vit_teacher_once_and_gives_the_two_pass_metrics(kind):
    vits = [tiny_vit(1), tiny_vit(2)]
    student = create("resnet8", C).eval()
    data = batches()
    teachers = TeacherSet.from_models(vits, "cpu")
    # Each part of the one-pass call against the plain forward and torch's own weights, bit for bit.
    with torch.inference_mode(), mode(kind):
        for batch in data:
            logits, cams, maps = teachers.logits_and_maps(batch, attentions=[0, 1])
            assert cams == {} and sorted(maps) == [0, 1]
            for k, vit in enumerate(vits):
                plain, inputs = plain_forward(vit, batch.views["student"])
                assert torch.equal(logits[k], plain)
                assert all(torch.equal(m, e) for m, e in zip(maps[k], torch_weights(vit, inputs)))
    calls = [count_forwards(v) for v in vits]
    with mode(kind):
        for how in ("cls", "rollout"):
            cfg = load_experiment(None, [f"metrics.vit_attention={how}"]).metrics
            for c in calls:
                c[0] = 0
            one_pass = evaluate(student, data, teachers, C, cfg)
            assert [c[0] for c in calls] == [len(data)] * 2  # each teacher ran once per batch
            two_pass = evaluate(student, data, TwoPassTeachers(teachers), C, cfg)
            assert [c[0] for c in calls] == [3 * len(data)] * 2  # the old way: twice per batch
            assert one_pass["teacher_iou_count"] == 18 and 0.0 <= one_pass["teacher_iou"] <= 1.0
            assert one_pass == two_pass, how
            # The same teacher metrics without attention maps: the ViTs' logits do not depend on the maps.
            plain_cfg = load_experiment(None, ["metrics.attention_iou=false"]).metrics
            without = evaluate(student, data, teachers, C, plain_cfg)
            assert without == {k: v for k, v in one_pass.items() if not k.startswith("teacher_iou")}
            # Against an independent computation: ensemble NLL from plain-forward logits, IoU from float64 maps.
            logps, labels, ious = [], [], []
            with torch.no_grad():
                for b in data:
                    x = b.views["student"]
                    parts = [plain_forward(v, x) for v in vits]
                    probs = np.mean([np.exp(np_log_softmax(p[0].double().numpy())) for p in parts], axis=0)
                    logps.append(np.log(probs))
                    labels.append(b.labels.numpy())
                    ious += np_iou(*(np_map(np_weights(v, p[1]), how) for v, p in zip(vits, parts)))
            logp, y = np.concatenate(logps), np.concatenate(labels)
            assert one_pass["teacher_nll"] == pytest.approx(float(-logp[np.arange(len(y)), y].mean()), abs=1e-6)
            assert one_pass["teacher_accuracy"] == pytest.approx(float((logp.argmax(1) == y).mean()))
            assert one_pass["teacher_iou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)


def finished_store_folder(folder, num_classes: int, num_teachers: int):
    """The smallest folder :class:`LogitStore` opens as finished: a manifest (format, layout, key) and an index.
    Evaluation never reads its rows (only the training step does), so none are written."""
    import json

    from hpckd.teachers.store import FORMAT_VERSION

    folder.mkdir(parents=True)
    manifest = {"format": FORMAT_VERSION, "layout": {"epochs": 1, "steps_per_epoch": 1, "shard_steps": 1},
                "key": {"num_classes": num_classes, "teachers": [{} for _ in range(num_teachers)]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "index.json").write_text(json.dumps({"shards": []}))
    return folder


def test_a_logit_store_run_evaluates_its_vit_teachers_attention_iou_like_the_inline_run(tmp_path):
    """A cached run's evaluation runs its teachers inline (the store holds training logits only): through the store
    source the ViT teachers' attention maps, and so the teacher IoU, are those of the inline teachers."""
    from hpckd.teachers.store import LogitStore, StoreSource

    vits = [tiny_vit(1), tiny_vit(2)]
    student = create("resnet8", C).eval()
    data = batches()
    inline = TeacherSet.from_models(vits, "cpu")
    store = LogitStore(finished_store_folder(tmp_path / "store", C, 2))
    source = StoreSource(store, "cpu", inline.metas, inline=lambda: inline)
    assert source.has_attention_maps(0) and source.has_attention_maps(1)
    without_inline = StoreSource(store, "cpu", inline.metas)
    assert not without_inline.has_attention_maps(0)
    cfg = load_experiment(None, []).metrics
    from_store = evaluate(student, data, source, C, cfg)
    assert from_store["teacher_iou_count"] == 18  # 3 batches x 6 images: the maps were computed
    assert from_store == evaluate(student, data, inline, C, cfg)
    batch = data[0]
    with torch.inference_mode():
        maps = source.attention_maps(batch, 1)
        plain, inputs = plain_forward(vits[1], batch.views["student"])
    assert all(torch.equal(m, e) for m, e in zip(maps, torch_weights(vits[1], inputs)))
