"""Config layout changes: old keys in a YAML file or on the command line get one error naming the new key, and
configs stored in checkpoints written with an old layout are migrated so those runs still resume and evaluate.

:data:`MOVED` is the one table of moves, read by both :func:`check_renamed_keys` (user input) and
:func:`migrate_config` (stored configs). The layout change of the architecture issue split the flat ``loss``
section into per-method subsections and moved CutMixPick's options to ``batch_ops``
(see :mod:`hpckd.config.methods`).
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpckd.errors import ConfigError

# old dotted key -> new dotted key
MOVED: dict[str, str] = {
    "loss.aug_kd_weight": "loss.da.aug_kd_weight",
    "loss.wsl_weight_tau": "loss.wsl.weight_tau",
    "loss.target_replace": "loss.targets.replace",
    "loss.target_manipulate": "loss.targets.manipulate",
    "loss.target_subset": "loss.targets.subset",
    "loss.amplify_delta": "loss.targets.amplify_delta",
    "loss.smoothing": "loss.targets.smoothing",
    "loss.smoothing_form": "loss.targets.smoothing_form",
    "loss.pick_criterion": "batch_ops.pick_criterion",
    "loss.pick_ratio": "batch_ops.pick_ratio",
    "loss.pick_order": "batch_ops.pick_order",
    "loss.pick_pool": "batch_ops.pick_pool",
}

_MISSING = object()

# The policies issue made `weak` / `strong` follow the attention study's App. A.1 (hpckd.data.aug); a config stored
# before it (it has no `data.policies`) meant the earlier definitions, kept under these names.
LEGACY_AUG = {"weak": "weak_legacy", "strong": "strong_legacy"}


def check_renamed_keys(source: DictConfig, where: str) -> None:
    """Raise a one-line ConfigError when ``source`` (a YAML file's or the command line's keys) uses a key that
    moved; the message names the new key, e.g. ``command line: 'loss.pick_ratio' moved to 'batch_ops.pick_ratio'``."""
    tree = OmegaConf.to_container(source, resolve=False)  # keys only: interpolations stay unresolved
    for old, new in MOVED.items():
        if _get(tree, old) is not _MISSING:
            raise ConfigError(f"{where}: '{old}' moved to '{new}'")


def migrate_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored (plain dict) experiment config in the current layout; old keys are moved to their new place.

    The input is not modified; a config already in the current layout comes back equal. Where an old config names
    both an old key and its new one, the new key wins. Keys the old layout lacked stay absent, which
    :func:`hpckd.checkpoint.config_differences` reads as the option's default (what the old version did) -- except
    the CutMixPick ``kl`` temperature, which the old layout took from ``loss.tau``: it becomes
    ``batch_ops.pick_tau`` so a resumed run scores its pools exactly as before."""
    out = copy.deepcopy(stored)
    old_criterion = _get(out, "loss.pick_criterion")
    for old, new in MOVED.items():
        value = _pop(out, old)
        if value is not _MISSING and _get(out, new) is _MISSING:
            _set(out, new, value)
    tau = _get(out, "loss.tau")
    if old_criterion == "kl" and tau is not _MISSING and _get(out, "batch_ops.pick_tau") is _MISSING:
        _set(out, "batch_ops.pick_tau", tau)
    if _get(out, "data.policies") is _MISSING:
        _rename_legacy_augs(out)
    return out


def _rename_legacy_augs(out: dict[str, Any]) -> None:
    """``aug`` / ``teachers[].aug`` of a config stored before the policies issue, under their legacy names, so the
    run resumes (and ``hpckd eval --augmented`` evaluates) with the policy it was trained with."""
    if out.get("aug") in LEGACY_AUG:
        out["aug"] = LEGACY_AUG[out["aug"]]
    for teacher in out.get("teachers") or []:
        if isinstance(teacher, dict) and teacher.get("aug") in LEGACY_AUG:
            teacher["aug"] = LEGACY_AUG[teacher["aug"]]


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _pop(tree: Any, dotted: str) -> Any:
    parent, _, leaf = dotted.rpartition(".")
    node = _get(tree, parent) if parent else tree
    if not isinstance(node, dict) or leaf not in node:
        return _MISSING
    return node.pop(leaf)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
