"""Checkpoints: written atomically, loaded with one clear error, kept last-N, resumed from the newest valid one.

A checkpoint is a dict with at least ``model`` (state dict), ``arch``, ``num_classes``, ``config`` (the
experiment config as a plain dict) and ``meta`` (aug policy, dataset fingerprint, val accuracy, epoch ...).
A teacher is simply a checkpoint written by ``hpckd train`` (its ``last.pt``).

Training checkpoints (``out_dir/checkpoints/``) add the full state an exact resume needs: ``optimizer``,
``scheduler``, ``scaler``, ``progress`` (epoch, step, partial epoch sums, history), ``rng`` and ``loader`` (one
entry per rank), ``world_size``, ``backend`` and ``trial``. Two layouts, one API:

* ``step-00000120.pt`` (DDP, single process): one file written by rank 0.
* ``step-00000120/`` (DeepSpeed): DeepSpeed's own files (``mp_rank_00_model_states.pt``, per-rank
  ``*optim_states.pt``), written by every rank, plus ``hpckd_state.pt`` with everything else, written by rank 0
  *last*: the folder counts as a checkpoint only once that file exists, which makes it atomic as a whole.
  :func:`load_checkpoint` on the folder returns the usual dict, with ``model`` read from DeepSpeed's file, so such
  a folder also serves as a teacher checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import OmegaConf

from hpckd.config import Experiment, to_container
from hpckd.config.migrate import migrate_config
from hpckd.errors import CheckpointError
from hpckd.io import atomic_save, remove_stale_temp_files

REQUIRED_KEYS = ("model", "arch", "num_classes")
TRAIN_KEYS = ("progress", "rng", "world_size", "backend")
DS_STATE_FILE = "hpckd_state.pt"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
_ENTRY = re.compile(r"^step-(\d{8})(\.pt)?$")

# Config keys that do not change the training trajectory: a resume may differ in these.
RESUME_IGNORED_KEYS = frozenset({
    "name", "out_dir", "resume", "resume_changes", "log_every", "data.root", "data.num_workers", "data.eval_batch_size",
    "train.checkpoint_every", "train.keep_last", "train.tensorboard", "train.preempt_signals", "train.requeue",
    "dist.nproc_per_node",
})


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename). A model with a
    non-finite parameter or buffer is refused: a checkpoint must never carry a diverged state (the training loop
    checks first and says so; this is the last line of defence)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    bad = nonfinite_entries(state["model"]) if isinstance(state["model"], dict) else []
    if bad:
        raise ValueError(f"refusing to save {path}: {bad[0]} holds NaN/Inf")
    atomic_save(path, lambda handle: torch.save(state, handle))


def nonfinite_entries(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an hpckd checkpoint (file, or DeepSpeed checkpoint folder); a missing, corrupt or foreign one is one
    :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        return _load_ds_folder(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not an hpckd checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return state


def _torch_load(path: Path, map_location) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _load_ds_folder(folder: Path, map_location) -> dict[str, Any]:
    marker = folder / DS_STATE_FILE
    if not marker.is_file() and ((folder / "last.pt").is_file() or (folder / "checkpoints").is_dir()):
        raise CheckpointError(f"{folder} is a run folder, not a checkpoint: pass {folder / 'last.pt'} (the final "
                              f"weights) or one of {folder / 'checkpoints'}/step-*")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint folder {folder} is incomplete (no {DS_STATE_FILE}: the save was interrupted)")
    state = _torch_load(marker, map_location)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{marker} is not an hpckd checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    if state["model"] is None:
        model_file = folder / DS_MODEL_FILE
        if not model_file.is_file():
            raise CheckpointError(f"checkpoint folder {folder} lacks DeepSpeed's {DS_MODEL_FILE}")
        ds_state = _torch_load(model_file, map_location)
        if not isinstance(ds_state, dict) or "module" not in ds_state:
            raise CheckpointError(f"{model_file} is not a DeepSpeed model-state file (no 'module')")
        state["model"] = ds_state["module"]
    return state


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    return all(k in state for k in TRAIN_KEYS)


@dataclass(frozen=True)
class Entry:
    """One checkpoint of a store: its global optimizer step and where it lives."""

    step: int
    path: Path


class CheckpointStore:
    """The training checkpoints of one run: ``folder/step-XXXXXXXX(.pt)``, newest = highest step."""

    def __init__(self, folder: str | os.PathLike, warn: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.warn = warn or (lambda message: None)

    def remove_stale_temp_files(self) -> list[Path]:
        """Temp files of saves a kill interrupted (``.step-N.pt.*.tmp``); rank 0, at the start of a run that
        holds the out_dir lock, so no live save owns them."""
        return remove_stale_temp_files(self.folder) if self.folder.is_dir() else []

    def path_for(self, step: int, as_folder: bool) -> Path:
        return self.folder / (f"step-{step:08d}" if as_folder else f"step-{step:08d}.pt")

    def entries(self) -> list[Entry]:
        """Every checkpoint (complete or not) in step order."""
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            match = _ENTRY.match(child.name)
            if match and (child.is_dir() or match.group(2)):
                found.append(Entry(int(match.group(1)), child))
        return sorted(found, key=lambda e: e.step)

    def latest_valid(self, map_location: str | torch.device = "cpu") -> tuple[Entry, dict[str, Any]] | None:
        """The newest checkpoint that loads; each newer one that does not is skipped with a warning."""
        for entry in reversed(self.entries()):
            try:
                state = load_checkpoint(entry.path, map_location)
            except CheckpointError as exc:
                self.warn(f"skipping checkpoint {entry.path}: {exc}; falling back to the previous one")
                continue
            if not is_training_checkpoint(state):
                self.warn(f"skipping {entry.path}: it holds no training state")
                continue
            return entry, state
        return None

    def prune(self, keep_last: int, newest_step: int) -> list[Path]:
        """Keep the newest ``keep_last`` complete checkpoints up to ``newest_step`` (the one just written); delete
        the rest: older ones, incomplete folders, and any left beyond ``newest_step`` by a run that was resumed from
        an earlier checkpoint (they belong to an abandoned trajectory). Rank 0 only."""
        entries = self.entries()
        complete = [e for e in entries if e.step <= newest_step and (e.path.is_file() or (e.path / DS_STATE_FILE).is_file())]
        kept = {e.path for e in complete[-keep_last:]}
        doomed = [e.path for e in entries if e.path not in kept]
        for path in doomed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return doomed

    def clear(self) -> None:
        """Delete every checkpoint of the store (``resume=never``: a fresh start must not resume old ones later)."""
        for entry in self.entries():
            if entry.path.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignored: Iterable[str] = RESUME_IGNORED_KEYS) -> list[str]:
    """``key: saved != current`` for every trajectory-relevant config key that differs.

    A key the saved config lacks (written by an hpckd version before the option existed) matches when the current
    value is the option's default: the old version behaved as the default does, so upgrading hpckd in the middle
    of a sweep does not strand its checkpoints."""
    ignored = set(ignored)
    a, b = flatten(saved), flatten(current)
    defaults = _schema_defaults()
    for key in set(b) - set(a):
        if key in defaults and defaults[key] == b[key]:
            a[key] = b[key]
    keys = sorted((set(a) | set(b)) - ignored)
    return [f"{k}: {a.get(k, '<absent>')!r} != {b.get(k, '<absent>')!r}" for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _schema_defaults() -> dict[str, Any]:
    """Every config key's default value, flattened (``data.dtype`` -> ``"float32"``)."""

    return flatten(to_container(OmegaConf.structured(Experiment)))


def check_compatible(path: Path, state: dict[str, Any], config: dict[str, Any], world_size: int, backend: str,
                     fingerprint: str, allowed: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` if ``state`` cannot continue this run exactly (one line, with the fix).

    ``allowed`` (``resume_changes``) names config keys the user deliberately changed; a checkpoint's stored config
    in an old layout is migrated first (:func:`hpckd.config.migrate.migrate_config`)."""
    fix = "use another out_dir, resume=never to start over, or resume_changes=[KEY] for a deliberate change"
    saved = migrate_config(state.get("config") or {})
    diffs = config_differences(saved, config, RESUME_IGNORED_KEYS | set(allowed))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
        raise CheckpointError(f"checkpoint {path} was written by another config ({shown}); {fix}")
    if state["backend"] != backend:
        raise CheckpointError(f"checkpoint {path} was written by dist.backend={state['backend']}, this run uses {backend}; {fix}")
    if state["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {state['world_size']} processes, this run has {world_size}; "
                              f"resume with the same number of processes, or {fix}")
    saved_fp = (state.get("meta") or {}).get("fingerprint")
    if saved_fp and saved_fp != fingerprint:
        raise CheckpointError(f"checkpoint {path} was trained on other data (train fingerprint {saved_fp}, now {fingerprint}); {fix}")
