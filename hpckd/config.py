"""Typed experiment configs: dataclasses validated by OmegaConf, loaded from YAML with dotted overrides.

``load_config("configs/quickstart.yaml", ["optim.lr=0.05"])`` returns an :class:`Experiment`-typed
``DictConfig``. Every user mistake becomes a one-line :class:`~hpckd.errors.ConfigError`: an unknown key names
the closest valid one, a wrong type names the field and the expected type, a bad choice lists the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from hpckd.errors import ConfigError
from hpckd.data.batchops import BatchOpsConfig
from hpckd.losses.config import LossConfig
from hpckd.metrics.evaluator import EvaluatorOptions
from hpckd.teachers.ensemble import REDUCTIONS
from hpckd.teachers.serving import ServingConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataConfig:
    root: str = "data/synth"  # ImageFolder root holding train/ and val/ (one folder per class)
    family: str = "cifar"  # policy family: imagenet | cifar
    image_size: int = 32  # training crop size (square)
    loader: str = "dali"  # dali | torch
    batch_size: int = 64  # global batch, split evenly over ranks
    eval_batch_size: int = 128  # global eval batch
    num_workers: int = 2  # DALI threads / DataLoader workers per rank
    on_bad_image: str = "error"  # error | skip
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # --- added with the data issue (see hpckd/data/datasets.py) ---
    format: str = "folder"  # folder | cifar10 | cifar100 | wds (shards written by `hpckd data shard`)
    train_list: Optional[str] = None  # folder: list file of `relative/path label` lines for train (ImageNet-LT)
    val_list: Optional[str] = None  # folder: list / label file for val (e.g. ImageNet val labels, ImageNet-LT)
    imbalance: float = 1.0  # >1: long-tailed train subset n_c = n_max * imb^(-c/(C-1)) (CIFAR-100-LT: 100)
    lt_seed: int = 0  # which images a long-tailed class keeps (fixed subset, independent of the run's seed)
    index_cache: str = "auto"  # auto (next to the data, else ~/.cache/hpckd) | off | a folder
    cifar_crop: str = "pad"  # cifar policies' random crop: pad (pad 4, crop) | rrc (RandomResizedCrop 0.2-1)
    dtype: str = "float32"  # images handed to the model: float32 | bfloat16 (train.precision=bf16) | float16 (fp16)


@dataclass
class ModelConfig:
    arch: str = "resnet8"  # name in hpckd.models.available()
    weights: Optional[str] = None  # local state-dict or hpckd checkpoint to start from
    drop_head: bool = False  # load `weights` without the classifier (fine-tune to another class count)
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder options, e.g. {norm: ln} for preresnets


@dataclass
class TeacherConfig:
    checkpoint: str = "???"  # hpckd checkpoint written by `hpckd train` (carries arch and classes)
    aug: Optional[str] = None  # policy of this teacher's view while distilling; None = the student's view


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # for the global batch size
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    epochs: int = 10
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: int = 0
    # --- added with the distributed-training issue (see hpckd/train/optim.py for the formulas) ---
    min_lr: float = 0.0  # cosine floor (eta_min); scaled like lr
    step_factors: list[float] = field(default_factory=list)  # multistep: explicit LR factor after each milestone
    wd_exclude_norm_bias: bool = False  # no weight decay on norm weights/biases and on every bias
    lr_reference_batch: int = 0  # >0: lr (and min_lr) are for this global batch, scaled linearly to data.batch_size
    accum_steps: int = 1  # gradient accumulation: data.batch_size is split into this many micro-batches per step
    clip_grad_norm: float = 0.0  # max global gradient norm; 0 = no clipping


@dataclass
class DistConfig:
    backend: str = "ddp"  # ddp | deepspeed
    nproc_per_node: int = 1  # >1 re-launches the command under torchrun when not already distributed
    device: str = "auto"  # auto | cpu | cuda
    zero_stage: int = 0  # deepspeed: ZeRO stage 0, 1 or 2
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm (GPU only)


@dataclass
class TrainConfig:
    """How the loop runs: precision, memory layout, compilation, checkpoints, preemption, logging."""

    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = at epoch ends only
    keep_last: int = 2  # full-state checkpoints kept in out_dir/checkpoints
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    preempt_signals: list[str] = field(default_factory=lambda: ["USR2", "TERM"])  # checkpoint at the next step, then stop
    requeue: bool = True  # after a SIGUSR2 checkpoint inside a SLURM job: `scontrol requeue` it


@dataclass
class MetricsConfig(EvaluatorOptions):
    """Evaluation options (see :class:`hpckd.metrics.evaluator.EvaluatorOptions`) plus how "the teacher" is formed."""

    ensemble: str = "mean_probs"  # mean_probs | mean_logits; why mean_probs: see hpckd.teachers.ensemble
    attention_iou: bool = True  # IoU of teacher 0's and teacher 1's class activation maps (attention study Eq. 1)
    cam_target: str = "predicted"  # predicted | true | sum (sum over classes: the attention study's code)
    cam_threshold: float = 0.4  # region = min-max normalised map >= threshold (0.4 in the attention study's code)


@dataclass
class Experiment:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/run"
    aug: str = "weak"  # policy of the model being trained (student, or teacher in `hpckd train`)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)  # how teachers run (inline / teacher_parallel)
    batch_ops: BatchOpsConfig = field(default_factory=BatchOpsConfig)  # Mixup/CutMix/CutMixPick, doubled batch, half split
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log_every: int = 20  # steps between JSON-lines log records
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: str = "auto"  # auto (latest valid checkpoint in out_dir, if any) | never | path of a checkpoint


# Fields whose value must be one of a fixed set; checked after merging.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.family": ("imagenet", "cifar"),
    "data.loader": ("dali", "torch"),
    "data.on_bad_image": ("error", "skip"),
    "data.format": ("folder", "cifar10", "cifar100", "wds"),
    "data.cifar_crop": ("pad", "rrc"),
    "data.dtype": ("float32", "bfloat16", "float16"),
    "aug": ("none", "weak", "strong", "identity", "flip", "flip_crop", "cutout", "autoaugment", "randaugment",
            "mixup", "cutmix", "cutmix_pick"),  # strengths, then the augmentation study's DA schemes (data/aug.py)
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "multistep", "constant"),
    "dist.backend": ("ddp", "deepspeed"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "dist.device": ("auto", "cpu", "cuda"),
    "metrics.ensemble": REDUCTIONS,
    "metrics.cam_target": ("predicted", "true", "sum"),
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type = Experiment,
                base: dict | None = None) -> DictConfig:
    """Merge the schema defaults, ``base`` (e.g. a checkpoint's config), a YAML file and dotted ``key=value``
    overrides, in that order; validate everything."""
    cfg = OmegaConf.structured(schema)
    sources: list[tuple[str, Any]] = []
    if base is not None:
        sources.append(("checkpoint config", OmegaConf.create(base)))
    if path is not None:
        sources.append((str(path), _read_yaml(Path(path))))
    if overrides:
        sources.append(("command line", _parse_overrides(overrides)))
    for where, source in sources:
        try:
            cfg = OmegaConf.merge(cfg, source)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {describe_config_error(exc, schema)}") from None
    check_choices(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config: required value missing for {', '.join(missing)}")
    return cfg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.05)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {exc}") from None


def describe_config_error(exc: OmegaConfBaseException, schema: type = Experiment) -> str:
    """One line for an OmegaConf merge error: the key, and the closest valid key or the expected type."""
    full_key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent, _, leaf = full_key.rpartition(".")
        valid = field_names(schema, parent)
        hint = difflib.get_close_matches(leaf, valid, n=1)
        where = f"{parent}." if parent else ""
        suggestion = f" (did you mean '{where}{hint[0]}'?)" if hint else f" (valid keys: {', '.join(valid)})"
        return f"unknown key '{full_key}'{suggestion}"
    if isinstance(exc, ValidationError):
        expected = field_type_name(schema, full_key)
        value = getattr(exc, "value", None) if hasattr(exc, "value") else None
        shown = f", got {value!r}" if value is not None else ""
        return f"'{full_key}' expects {expected}{shown}"
    return str(exc).splitlines()[0]


def check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"config: '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    check_image_dtype(cfg)
    # Sub-packages check their own sections.
    if "train" in cfg:
        from hpckd.train.options import check_options  # lazy: hpckd.train imports this module

        check_options(cfg)
    LossConfig(**OmegaConf.to_container(cfg.loss)).validated()
    try:
        ServingConfig(**OmegaConf.to_container(cfg.serving))
        BatchOpsConfig(**OmegaConf.to_container(cfg.batch_ops)).validated()
        evaluator_options(cfg.metrics)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    for i, teacher in enumerate(cfg.get("teachers") or []):
        if teacher.aug is not None and teacher.aug not in CHOICES["aug"]:
            raise ConfigError(f"config: 'teachers[{i}].aug' is {teacher.aug!r}; choose one of {', '.join(CHOICES['aug'])}")


# Reduced-precision images must match the autocast dtype: the first layer's weights are fp32 outside autocast.
_PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


def check_image_dtype(cfg: DictConfig) -> None:
    dtype = OmegaConf.select(cfg, "data.dtype", default="float32")
    needed = _PRECISION_OF_DTYPE.get(dtype)
    precision = OmegaConf.select(cfg, "train.precision", default="fp32")
    if needed is not None and precision != needed:
        raise ConfigError(f"config: data.dtype={dtype} needs train.precision={needed} (got {precision}); "
                          f"use data.dtype=float32 for {precision} training")


def _resolve_dataclass(schema: type, dotted: str) -> tuple[type | None, Any]:
    """Walk ``dotted`` through nested dataclasses; return (owning dataclass, field type of the last part)."""
    owner: Any = schema
    ftype: Any = schema
    for part in [p for p in dotted.split(".") if p]:
        if part.endswith("]"):  # list element such as teachers[0]
            part = part.split("[")[0]
        if not dataclasses.is_dataclass(owner):
            return None, None
        hints = typing.get_type_hints(owner)
        if part not in hints:
            return None, None
        ftype = hints[part]
        owner = _unwrap(ftype)
    return owner, ftype


def _unwrap(tp: Any) -> Any:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return _unwrap(non_none[0]) if non_none else tp
    if origin in (list, tuple) and args:
        return _unwrap(args[0])
    return tp


def field_names(schema: type, parent: str) -> list[str]:
    owner, _ = _resolve_dataclass(schema, parent) if parent else (schema, schema)
    if owner is None or not dataclasses.is_dataclass(owner):
        return []
    return [f.name for f in dataclasses.fields(owner)]


def field_type_name(schema: type, dotted: str) -> str:
    _, ftype = _resolve_dataclass(schema, dotted)
    if ftype is None:
        return "a different type"
    return _type_name(ftype)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (or null)" if type(None) in args else "")
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def evaluator_options(metrics: Any) -> EvaluatorOptions:
    """The :class:`EvaluatorOptions` part of a ``metrics`` config section."""
    values = OmegaConf.to_container(metrics) if isinstance(metrics, DictConfig) else dataclasses.asdict(metrics)
    return EvaluatorOptions(**{f.name: values[f.name] for f in dataclasses.fields(EvaluatorOptions)})
