"""Weights from local files only: a torchvision state-dict file or an hpckd checkpoint.

Every failure is one :class:`~hpckd.errors.CheckpointError` naming the file and the mismatch, e.g.
``runs/t0.pt does not fit resnet20 (10 classes): fc.weight: checkpoint (100, 64) vs model (10, 64)``. A missing
file, an unreadable one, missing or unexpected keys, a shape mismatch and a wrong class count are all caught
before any parameter is touched, so a failed load leaves the model unchanged.

``drop_head=True`` keeps the model's own (freshly initialised) classifier and loads everything else: the attention
study fine-tunes ImageNet-pretrained ResNet-50 teachers on CIFAR-100 and ImageNet-LT (Guo et al., Sec. 5), which
needs a 1000-class torchvision file loaded into a 100-class model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpckd.errors import CheckpointError, UserError
from hpckd.models.hooks import linear_head, unwrap

# Prefixes that wrappers add to state-dict keys (DDP / DeepSpeed ``module.``, torch.compile ``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 3


def load_weights(model: nn.Module, path: str | os.PathLike, *, drop_head: bool = False) -> dict[str, Any]:
    """Load the weights in ``path`` into ``model`` (in place); return the checkpoint's ``meta`` (or ``{}``).

    Args:
        model: the target network (a DDP / compiled wrapper is unwrapped).
        path: a ``torch.save``-d state dict (torchvision's ``*.pth`` files) or an hpckd checkpoint (a dict with a
            ``model`` state dict, as written by :func:`hpckd.checkpoint.save_checkpoint`).
        drop_head: leave the model's classifier as it is and skip the checkpoint's (for fine-tuning on another
            class count).
    """
    path = Path(path)
    state, meta = _split(_read(path), path)
    source = f"{path} (checkpoint arch {meta['arch']})" if meta.get("arch") else str(path)
    apply_state_dict(model, state, source, drop_head=drop_head)
    return meta


def apply_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, drop_head: bool = False
) -> None:
    """Check that ``state`` fits ``model`` exactly, then load it; ``source`` names the origin in the error."""
    model = unwrap(model)
    state = strip_wrapper_prefixes(state)
    target = model.state_dict()
    head_keys = _head_keys(model)
    skipped = head_keys if drop_head else set()
    state = {k: v for k, v in state.items() if k not in skipped}
    problem = _mismatch(state, target, skipped, head_keys)
    if problem:
        raise CheckpointError(f"{source} does not fit {_describe(model)}: {problem}")
    model.load_state_dict(state, strict=not drop_head)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (weights come from local files only; check the path)")
    try:
        # Our own checkpoints carry plain config dicts next to tensors; the files are the user's own.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- any failure to unpickle (truncated zip, garbage) is a bad file
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _split(raw: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) from an hpckd checkpoint or a bare state dict."""
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        meta = dict(raw.get("meta") or {})
        for key in ("arch", "num_classes"):
            if key in raw:
                meta.setdefault(key, raw[key])
        return raw["model"], meta
    if isinstance(raw, Mapping) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw, {}
    raise CheckpointError(f"{path} is neither a state dict nor an hpckd checkpoint (a dict with a 'model' state dict)")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefixes DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) put in front."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _head_keys(model: nn.Module) -> set[str]:
    try:
        name, head = linear_head(model)
    except UserError:  # no recognisable classifier: nothing to drop or to report as a class count
        return set()
    return {f"{name}.{param}" for param, _ in head.named_parameters(recurse=False)}


def _mismatch(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], skipped: set[str], head_keys: set[str]
) -> str:
    """One line describing the first problems (class count first), or '' when ``state`` fits ``target``."""
    bad = [k for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    # The classifier first: a wrong class count is the most common cause and the easiest to fix.
    bad.sort(key=lambda k: k not in head_keys)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in bad]
    missing = sorted(k for k in target if k not in state and k not in skipped)
    unexpected = sorted(k for k in state if k not in target)
    parts = []
    head_weight = [k for k in bad if k in head_keys and state[k].dim() == 2]
    if head_weight:
        k = head_weight[0]
        parts.append(
            f"wrong class count (checkpoint {state[k].shape[0]}, model {target[k].shape[0]}; "
            f"set num_classes to match, or drop_head=True to fine-tune a new classifier)"
        )
    if shapes:
        parts.append(_listed("shape mismatch", shapes))
    if missing:
        parts.append(_listed("missing in checkpoint", missing))
    if unexpected:
        parts.append(_listed("not in model", unexpected))
    return "; ".join(parts)


def _listed(what: str, items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{what}: {', '.join(items[:MAX_LISTED])}{more}"


def _describe(model: nn.Module) -> str:
    arch = getattr(model, "hpckd_arch", type(model).__name__)
    try:
        classes = f" ({linear_head(model)[1].out_features} classes)"
    except UserError:  # a model without a recognisable head still gets a useful message
        classes = ""
    return f"{arch}{classes}"
