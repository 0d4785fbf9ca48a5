"""``hpckd teachers import``: published weights -> an hpckd teacher checkpoint, without retraining.

Accepted files (read from local disk only, with ``torch.load(weights_only=True)``: a foreign pickle runs no code):

- a torchvision or timm state dict (``torch.save(model.state_dict())``, the ``*.pth`` files both publish) for an
  hpckd architecture built by that library (``resnet50``, ``vit_b_16``, ``resnet18d``, ``mobilenetv3_large_100``
  ...): the keys are the library's own, so they load as they are;
- a RepDistiller / CRD CIFAR teacher (``{"model": state_dict, "epoch": .., "accuracy": ..}``, Tian et al. 2020,
  the teachers the augmentation study distils from), whose module names differ from hpckd's. The architectures
  are the same networks (same layers, same order, same shapes), so a key mapping suffices:

  ===================  ======================================  ==============================================
  hpckd arch           RepDistiller key                        hpckd key
  ===================  ======================================  ==============================================
  resnet8..110, x4     ``layer{s}.{i}.``, ``downsample.``      ``layers.{(s-1)*n+i}.``, ``shortcut.``
  wrn_16_2, wrn_40_*   ``block{s}.layer.{i}.``,                ``layers.{(s-1)*n+i}.``, ``shortcut``, final
                       ``convShortcut``, final ``bn1.``        ``bn.``
  vgg8..vgg19          ``block{s}.{j}.``, ``classifier.``      ``stages.{s}.{j}.``, ``fc.``
  resnet50_cifar       ``linear.``                             ``fc.``
  ===================  ======================================  ==============================================

  RepDistiller's MobileNetV2 and ShuffleNets are not mapped (hpckd's CIFAR versions were written independently
  and are not checked to be the same networks); their files fail with the first key that does not fit.
- an hpckd checkpoint (re-written with the given class count checked).

The output is an hpckd teacher checkpoint (``model``, ``arch``, ``arch_kwargs``, ``num_classes``, ``config``,
``meta``) written atomically; ``meta`` records the source file, its SHA-256 and the format detected. A file that
does not fit is one :class:`CheckpointError` naming the first mismatched key.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from hpckd.checkpoint import save_checkpoint
from hpckd.errors import CheckpointError
from hpckd.models import create
from hpckd.models.weights import strip_wrapper_prefixes

StateDict = dict[str, torch.Tensor]
CONTAINER_KEYS = ("model", "state_dict", "net", "model_state_dict")


def import_teacher(path: str | os.PathLike, arch: str, num_classes: int, out: str | os.PathLike | None = None,
                   arch_kwargs: Mapping[str, Any] | None = None) -> Path:
    """Write the teacher checkpoint of the weights in ``path`` for ``arch`` with ``num_classes`` outputs; returns
    its path (default: ``path`` with the suffix ``.hpckd.pt``)."""
    path = Path(path)
    kwargs = dict(arch_kwargs or {})
    model = create(arch, num_classes, **kwargs)
    state, container = read_state(path)
    target = model.state_dict()
    fitted, fmt = fit_state(state, target, arch, path)
    model.load_state_dict(fitted)  # exact fit was checked: this only copies
    out_path = Path(out) if out is not None else path.with_name(path.name.split(".")[0] + ".hpckd.pt")
    meta = {"mode": "imported", "imported_from": str(path.resolve()), "source_sha256": _sha256(path),
            "source_format": fmt, "aug": None, "fingerprint": None, "classes": None}
    for key in ("epoch", "accuracy", "best_acc"):  # what RepDistiller files record, kept for reference
        value = container.get(key) if isinstance(container, Mapping) else None
        if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
            meta[f"source_{key}"] = float(value)
    save_checkpoint(out_path, {"model": model.state_dict(), "arch": arch, "arch_kwargs": kwargs,
                               "num_classes": int(num_classes), "config": {}, "meta": meta})
    return out_path


def read_state(path: Path) -> tuple[StateDict, Any]:
    """(state dict with wrapper prefixes stripped, the whole loaded object) of a weights file."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- unreadable, or a pickle needing code: not a plain weights file
        raise CheckpointError(f"cannot read {path} as a weights file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    state = raw
    if isinstance(raw, Mapping):
        for key in CONTAINER_KEYS:
            if isinstance(raw.get(key), Mapping):
                state = raw[key]
                break
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of tensors, or one under "
                              f"{', '.join(repr(k) for k in CONTAINER_KEYS)})")
    return strip_wrapper_prefixes(state), raw


def fit_state(state: StateDict, target: Mapping[str, torch.Tensor], arch: str, path: Path) -> tuple[StateDict, str]:
    """(``state`` under the target's key names, the format) or a :class:`CheckpointError` naming the first
    mismatched key of the closest candidate (as it is, or through the RepDistiller mapping)."""
    candidates = [("native", state)]
    mapping = repdistiller_mapping(arch, target)
    if mapping is not None:
        candidates.append(("repdistiller", {mapping(k): v for k, v in state.items()}))
    problems = []
    for fmt, mapped in candidates:
        problem = first_mismatch(mapped, target)
        if problem is None:
            return mapped, fmt
        problems.append((problem[0], fmt, problem[1]))
    count, fmt, message = min(problems, key=lambda p: p[0])
    via = " (after mapping RepDistiller's key names)" if fmt == "repdistiller" else ""
    raise CheckpointError(f"{path} does not fit {arch}{via}: {message}")


def first_mismatch(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> tuple[int, str] | None:
    """(number of mismatched keys, description of the first in the model's order) or None on an exact fit."""
    bad = []
    for key, value in target.items():
        if key not in state:
            bad.append(f"first mismatched key {key!r}: missing in the file")
        elif tuple(state[key].shape) != tuple(value.shape):
            bad.append(f"first mismatched key {key!r}: file {tuple(state[key].shape)} vs model {tuple(value.shape)}"
                       + (" (check --classes)" if value.dim() <= 2 and key.endswith(("weight", "bias"))
                          and key == _last_weight(target, key) else ""))
    extra = [k for k in state if k not in target]
    bad += [f"first mismatched key {k!r}: not in the model" for k in extra]
    return (len(bad), bad[0]) if bad else None


def _last_weight(target: Mapping[str, torch.Tensor], key: str) -> str:
    """``key`` if it belongs to the model's last layer (the classifier), else ''."""
    params = [k for k in target if k.endswith(("weight", "bias")) and "running" not in k]
    return key if params and key in params[-2:] else ""


def repdistiller_mapping(arch: str, target: Mapping[str, torch.Tensor]) -> Callable[[str], str] | None:
    """RepDistiller key -> hpckd key for ``arch`` (module docstring), or None when ``arch`` has no mapping."""
    blocks = {int(m.group(1)) for k in target if (m := re.match(r"layers\.(\d+)\.", k))}
    per_stage = (max(blocks) + 1) // 3 if blocks else 0
    if re.fullmatch(r"resnet(8|14|20|32|44|56|110)(x4)?", arch):
        def resnet(key: str) -> str:
            key = re.sub(r"^layer(\d)\.(\d+)\.", lambda m: f"layers.{(int(m[1]) - 1) * per_stage + int(m[2])}.", key)
            return key.replace(".downsample.", ".shortcut.")
        return resnet
    if arch.startswith("wrn_"):
        def wrn(key: str) -> str:
            key = re.sub(r"^block(\d)\.layer\.(\d+)\.",
                         lambda m: f"layers.{(int(m[1]) - 1) * per_stage + int(m[2])}.", key)
            key = key.replace(".convShortcut.", ".shortcut.")
            return re.sub(r"^bn1\.", "bn.", key)
        return wrn
    if re.fullmatch(r"vgg\d+", arch):
        def vgg(key: str) -> str:
            return re.sub(r"^classifier\.", "fc.", re.sub(r"^block(\d)\.", r"stages.\1.", key))
        return vgg
    if arch == "resnet50_cifar":
        return lambda key: re.sub(r"^linear\.", "fc.", key)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
