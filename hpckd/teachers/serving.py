"""Inline teacher serving: frozen teachers turn a :class:`~hpckd.data.batch.Batch` into ``list[Tensor]`` logits.

Teacher k sees ``batch.view(f"teacher{k}")`` (its own augmented view when the trial gives it one, else the
student's). Teachers are frozen in every study, so each one is put in eval mode, has ``requires_grad_(False)`` and
runs under ``torch.inference_mode()``: no autograd graph, and BatchNorm uses (never updates) its running
statistics. On CUDA the forward runs under bf16 autocast with channels_last inputs (optionally ``torch.compile``d);
logits always come back as fp32 tensors that are safe to use in the student's autograd graph.

``teacher_parallel`` shards the teachers of an ensemble across DDP ranks (see :mod:`hpckd.teachers.shard`) so that
large ensembles fit in memory; it returns exactly what plain mode returns. It is a collective: every rank must call
the TeacherSet the same number of times with batches carrying the same view names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpckd.checkpoint import load_checkpoint
from hpckd.config.schema import ServingConfig
from hpckd.data.batch import STUDENT, Batch
from hpckd.errors import CheckpointError, ConfigError
from hpckd.models import apply_state_dict, create
from hpckd.models.hooks import cam_features, forward_with_attentions, forward_with_cam, has_cam
from hpckd.precision import PrecisionPolicy
from hpckd.teachers import shard


Cam = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (features, head weight, head bias) of a CAM
SERVING_MODES = ("inline", "cached")
STORE_EPOCHS = ("error", "cycle")


def check_serving(config: ServingConfig) -> None:
    """One-line error for a ``serving`` section this module cannot run."""
    if config.exchange not in shard.EXCHANGES:
        raise ConfigError(f"config: 'serving.exchange' is {config.exchange!r}; choose one of {', '.join(shard.EXCHANGES)}")
    if config.mode not in SERVING_MODES:
        raise ConfigError(f"config: 'serving.mode' is {config.mode!r}; choose one of {', '.join(SERVING_MODES)}")
    if config.store_epochs not in STORE_EPOCHS:
        raise ConfigError(f"config: 'serving.store_epochs' is {config.store_epochs!r}; choose one of "
                          f"{', '.join(STORE_EPOCHS)}")
    if config.mode == "cached" and not config.store:
        raise ConfigError("config: 'serving.mode' is 'cached' but 'serving.store' is not set; give the folder "
                          "written by `hpckd teachers cache`")


@dataclass
class Teacher:
    """One ensemble member. ``model`` is None on ranks that do not run it (teacher_parallel)."""

    index: int
    arch: str
    num_classes: int
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None

    @property
    def role(self) -> str:
        """The view name this teacher reads from a batch."""
        return f"teacher{self.index}"


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never trains and never updates BatchNorm statistics."""
    model.eval()
    model.requires_grad_(False)
    return model


def arch_kwargs(state: dict[str, Any]) -> dict[str, Any]:
    """Builder keywords of a checkpoint's architecture (e.g. ``norm="ln"``): ``arch_kwargs``, else
    ``config.model.kwargs``, else none."""
    if isinstance(state.get("arch_kwargs"), dict):
        return dict(state["arch_kwargs"])
    model_cfg = (state.get("config") or {}).get("model") or {}
    return dict(model_cfg.get("kwargs") or {}) if isinstance(model_cfg, dict) else {}


class TeacherSet:
    """Frozen teachers serving fp32 logits for a batch, inline on each rank or sharded across ranks."""

    def __init__(
        self,
        teachers: Sequence[Teacher],
        device: torch.device | str,
        config: ServingConfig | None = None,
        group: dist.ProcessGroup | None = None,
        precision: PrecisionPolicy | None = None,
    ) -> None:
        if not teachers:
            raise ConfigError("a TeacherSet needs at least one teacher")
        if [t.index for t in teachers] != list(range(len(teachers))):
            raise ValueError("teachers must be given in index order 0, 1, ... (index k reads view 'teacher{k}')")
        self.config = config or ServingConfig()
        check_serving(self.config)
        self.device = torch.device(device)
        # Without a policy (teachers used outside a run): bf16 on CUDA when serving.amp, fp32 elsewhere.
        self.precision = precision or PrecisionPolicy(self.device, teacher_amp=self.config.amp,
                                                      teacher_channels_last_on_cuda=self.config.channels_last)
        self.group = group
        self.teachers = list(teachers)
        self.num_classes = _common_classes(self.teachers)
        self.parallel, rank, world = _placement(self.config, group)
        self.owned = shard.owned(rank, world, len(self.teachers))
        self._runners: dict[int, nn.Module] = {}
        for t in self.teachers:
            if t.index in self.owned:
                if t.model is None:
                    raise ValueError(f"teacher {t.index} is run by this rank but has no model")
                self._runners[t.index] = self._prepare(t.model)
            else:
                t.model = None  # not ours: drop it so only 1/world of the ensemble stays in memory

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        models: Sequence[nn.Module],
        device: torch.device | str,
        config: ServingConfig | None = None,
        group: dist.ProcessGroup | None = None,
        precision: PrecisionPolicy | None = None,
    ) -> TeacherSet:
        """Serve in-memory models (every rank passes all of them; teacher_parallel keeps only its share)."""
        teachers = [
            Teacher(k, getattr(m, "hpckd_arch", type(m).__name__), _out_features(m), model=m)
            for k, m in enumerate(models)
        ]
        return cls(teachers, device, config, group, precision)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike],
        device: torch.device | str,
        config: ServingConfig | None = None,
        group: dist.ProcessGroup | None = None,
        precision: PrecisionPolicy | None = None,
    ) -> TeacherSet:
        """Load teachers written by ``hpckd train``: the arch and class count come from each checkpoint.

        Every rank reads every file (so a bad file fails on all ranks alike instead of hanging a collective), but
        under teacher_parallel only builds the teachers it runs.
        """
        _, rank, world = _placement(config or ServingConfig(), group)
        mine = set(shard.owned(rank, world, len(paths)))
        teachers = [_load_teacher(k, path, build=k in mine) for k, path in enumerate(paths)]
        return cls(teachers, device, config, group, precision)

    def _prepare(self, model: nn.Module) -> nn.Module:
        model = freeze(model).to(self.device)
        if self.precision.teacher_channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model, backend=self.config.compile_backend) if self.config.compile else model

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def metas(self) -> list[dict[str, Any]]:
        """Each teacher's checkpoint ``meta`` (augmentation policy, dataset fingerprint, val accuracy, ...)."""
        return [t.meta for t in self.teachers]

    @property
    def _on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def check_num_classes(self, num_classes: int) -> None:
        """One clear error when the teachers were trained for another class count than the data has."""
        for t in self.teachers:
            if t.num_classes != num_classes:
                raise ConfigError(
                    f"teacher {t.index} ({t.source}, {t.arch}) predicts {t.num_classes} classes but the dataset has "
                    f"{num_classes}: use teachers trained on this dataset"
                )

    # ------------------------------------------------------------------ serving
    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        """fp32 logits (n_local, C), one tensor per teacher, for this rank's samples."""
        if self.parallel:
            return self._serve_parallel(batch)
        return [self._forward(t.index, self._view(batch, t)) for t in self.teachers]

    def _view(self, batch: Batch, teacher: Teacher) -> torch.Tensor:
        return batch.view(teacher.role).to(self.device, non_blocking=True)

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        runner = self._runners[index]
        original = self.teachers[index].model
        if original is not None and original.training:
            original.eval()  # someone called .train() on it: teachers always run in eval mode
        with torch.inference_mode():
            with self.precision.teacher_autocast():
                logits = runner(self.precision.teacher_input(x))
            logits = logits.float()
        # A clone made outside inference mode is an ordinary tensor, usable inside the student's autograd graph.
        return logits.clone()

    # ------------------------------------------------------------------ class activation maps
    def has_cam_features(self, index: int) -> bool:
        """Whether teacher ``index`` runs on this rank and has a CAM (a conv trunk with GAP + linear head)."""
        model = self.teachers[index].model
        return model is not None and has_cam(model)

    def cam_features(self, batch: Batch, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features (N, K, h, w), head weight (C, K), head bias (C,) or None) of teacher ``index`` on the view it
        reads, in fp32: what a class activation map is made of (attention study Eq. 1)."""
        model = self.teachers[index].model
        if model is None or not has_cam(model):
            raise ValueError(f"teacher {index} has no class activation map on this rank")
        x = self.precision.teacher_input(self._view(batch, self.teachers[index]))
        with torch.inference_mode(), self.precision.teacher_autocast():
            features, weight, bias = cam_features(model, x)
        return (features.float().clone(), weight.float().clone(), None if bias is None else bias.float().clone())

    def logits_and_cams(self, batch: Batch, indices: Sequence[int]) -> tuple[list[torch.Tensor], dict[int, Cam]]:
        """Every teacher's logits (exactly what calling the set gives) and the CAM ingredients of the teachers in
        ``indices`` (exactly what :meth:`cam_features` gives), running each of those teachers once: the feature map
        is captured during the forward that makes the logits (:func:`~hpckd.models.hooks.forward_with_cam`).
        :meth:`logits_and_maps` with CAMs only."""
        logits, cams, _ = self.logits_and_maps(batch, cams=indices)
        return logits, cams

    # ------------------------------------------------------------------ ViT attention maps
    def has_attention_maps(self, index: int) -> bool:
        """Whether teacher ``index`` runs on this rank and has attention layers (a ViT)."""
        model = self.teachers[index].model
        return model is not None and any(isinstance(m, nn.MultiheadAttention) for m in model.modules())

    def attention_maps(self, batch: Batch, index: int) -> list[torch.Tensor]:
        """Per-block attention probabilities (N, heads, T, T) of teacher ``index`` on the view it reads, fp32
        (attention study App. A.7: CLS attention and rollout are made from these)."""
        model = self.teachers[index].model
        if not self.has_attention_maps(index):
            raise ValueError(f"teacher {index} has no attention maps on this rank")
        x = self.precision.teacher_input(self._view(batch, self.teachers[index]))
        with torch.inference_mode(), self.precision.teacher_autocast():
            maps = forward_with_attentions(model, x)[1]
        return [m.float().clone() for m in maps]

    def logits_and_maps(self, batch: Batch, cams: Sequence[int] = (), attentions: Sequence[int] = ()) -> tuple[
            list[torch.Tensor], dict[int, Cam], dict[int, list[torch.Tensor]]]:
        """(every teacher's logits, {k: CAM ingredients for k in ``cams``}, {k: attention maps for k in
        ``attentions``}), running each teacher once: a CNN's feature map and a ViT's per-block attention
        probabilities are captured during the forward that makes its logits
        (:func:`~hpckd.models.hooks.forward_with_cam`, :func:`~hpckd.models.hooks.forward_with_attentions`).

        Each part is bit for bit what the separate call gives (``self(batch)``, :meth:`cam_features`,
        :meth:`attention_maps`): the same modules on the same input, and a ViT's logits come from its unchanged
        forward (fused attention kernel), the maps being computed beside it, so metrics do not depend on whether
        maps were asked for. A compiled teacher (``serving.compile``) or a sharded set (``teacher_parallel``) keeps
        the second pass: their logits come from another module than the one the maps can be read from."""
        if self.parallel:
            return (self(batch), {k: self.cam_features(batch, k) for k in cams},
                    {k: self.attention_maps(batch, k) for k in attentions})
        logits: list[torch.Tensor] = []
        cam_out: dict[int, Cam] = {}
        attn_out: dict[int, list[torch.Tensor]] = {}
        for t in self.teachers:
            x = self._view(batch, t)
            plain = self._runners[t.index] is t.model  # not compiled: hooks on t.model see the logits' forward
            if plain and t.index in cams and self.has_cam_features(t.index):
                out, features, weight, bias = self._capture(forward_with_cam, t, x)
                cam_out[t.index] = (features, weight, bias)
            elif plain and t.index in attentions and self.has_attention_maps(t.index):
                out, attn_out[t.index] = self._capture(forward_with_attentions, t, x)
            else:
                out = self._forward(t.index, x)
            logits.append(out)
        cam_out.update({k: self.cam_features(batch, k) for k in cams if k not in cam_out})
        attn_out.update({k: self.attention_maps(batch, k) for k in attentions if k not in attn_out})
        return logits, cam_out, attn_out

    def _capture(self, forward: Callable[[nn.Module, torch.Tensor], tuple], teacher: Teacher,
                 x: torch.Tensor) -> tuple:
        """``forward(model, x)`` (logits and what it captured) at the teachers' precision, every tensor in fp32 and
        cloned outside inference mode, as :meth:`_forward`, :meth:`cam_features` and :meth:`attention_maps` give."""
        assert teacher.model is not None
        if teacher.model.training:
            teacher.model.eval()  # as in _forward: teachers always run in eval mode
        with torch.inference_mode(), self.precision.teacher_autocast():
            parts = forward(teacher.model, self.precision.teacher_input(x))
        return tuple(_fp32(part) for part in parts)

    def _serve_parallel(self, batch: Batch) -> list[torch.Tensor]:
        sizes = shard.gather_sizes(batch.size, self.device, self.group)
        chunks_by_role = self._gather_views(batch, sizes)
        outputs = {
            k: [self._forward(k, chunk) for chunk in chunks_by_role[self._role_key(batch, self.teachers[k])]]
            for k in self.owned
        }
        exchange = shard.exchange_all_to_all if self.config.exchange == "all_to_all" else shard.exchange_all_gather
        return exchange(outputs, sizes, len(self.teachers), self.num_classes, self.device, self.group)

    def _role_key(self, batch: Batch, teacher: Teacher) -> str:
        return teacher.role if teacher.role in batch.views else STUDENT

    def _gather_views(self, batch: Batch, sizes: list[int]) -> dict[str, list[torch.Tensor]]:
        # Each distinct view is gathered once, in teacher order, so every rank issues the same collectives.
        keys = list(dict.fromkeys(self._role_key(batch, t) for t in self.teachers))
        return {key: shard.gather_chunks(batch.views[key].to(self.device), sizes, self.group) for key in keys}


def _placement(config: ServingConfig, group: dist.ProcessGroup | None) -> tuple[bool, int, int]:
    """(sharded?, rank, world): teacher_parallel needs an initialised process group of more than one rank;
    otherwise every rank runs every teacher."""
    if not (config.teacher_parallel and dist.is_available() and dist.is_initialized()):
        return False, 0, 1
    world = dist.get_world_size(group)
    return (world > 1), (dist.get_rank(group) if world > 1 else 0), world


def _load_teacher(index: int, path: str | os.PathLike, build: bool) -> Teacher:
    state = load_checkpoint(path)
    teacher = Teacher(index, str(state["arch"]), int(state["num_classes"]), str(path), dict(state.get("meta") or {}))
    if build:
        model = create(teacher.arch, teacher.num_classes, **arch_kwargs(state))
        apply_state_dict(model, state["model"], f"teacher {index} checkpoint {path}")
        teacher.model = model
    return teacher


def _fp32(part: Any) -> Any:
    """A captured tensor (or list of them, or None) in fp32, cloned so it is an ordinary tensor outside inference
    mode (usable in autograd graphs, like the logits of :meth:`TeacherSet._forward`)."""
    if isinstance(part, torch.Tensor):
        return part.float().clone()
    if isinstance(part, list):
        return [_fp32(p) for p in part]
    return part


def _out_features(model: nn.Module) -> int:
    from hpckd.models import linear_head

    return linear_head(model)[1].out_features


def _common_classes(teachers: Sequence[Teacher]) -> int:
    classes = {t.num_classes for t in teachers}
    if len(classes) != 1:
        listed = ", ".join(f"teacher {t.index}: {t.num_classes}" for t in teachers)
        raise CheckpointError(f"teachers of one ensemble must predict the same classes ({listed})")
    return classes.pop()
