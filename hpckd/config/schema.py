"""The experiment schema: one dataclass per config section, checked by OmegaConf when a config loads.

This module sits at the bottom of the layer order (see docs/architecture.md): it imports nothing from hpckd's
subpackages. Each subpackage validates its own section against its own choice lists
(:func:`hpckd.train.experiment.validate_experiment` calls them all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hpckd.config.methods import BatchOpsConfig, LossConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class SubsetConfig:
    """Which part of the data set a run uses (validated and applied by :mod:`hpckd.data.subsets`; part of the data
    fingerprint). Applied in this order: classes (train and val), then the D0/D1 split and few-shot (train)."""

    classes: list[str] = field(default_factory=list)  # keep these classes (names), relabelled 0..k-1 in this order
    num_classes: int = 0  # >0: keep the first k classes of the sorted class list (ImageNet-100 style by count)
    split: str = "all"  # all | d0 | d1: the fidelity study's data recycling halves (Sec. 5.2)
    split_fraction: float = 0.5  # share of the training set in d0
    split_seed: int = 0  # which samples land in d0 (fixed, independent of the run's seed)
    per_class: int = 0  # >0: few-shot, keep N training images per class (attention study App. A.8)
    per_class_seed: int = 0  # which images a few-shot class keeps


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
    format: str = "folder"  # folder | cifar10 | cifar100 | wds (shards written by `hpckd data shard`) | tinyimagenet
    train_list: Optional[str] = None  # folder: list file of `relative/path label` lines for train (ImageNet-LT)
    val_list: Optional[str] = None  # folder: list / label file for val (e.g. ImageNet val labels, ImageNet-LT)
    imbalance: float = 1.0  # >1: long-tailed train subset n_c = n_max * imb^(-c/(C-1)) (CIFAR-100-LT: 100)
    lt_seed: int = 0  # which images a long-tailed class keeps (fixed subset, independent of the run's seed)
    index_cache: str = "auto"  # auto (next to the data, else ~/.cache/hpckd) | off | a folder
    cifar_crop: str = "pad"  # cifar policies' random crop: pad (pad 4, crop) | rrc (RandomResizedCrop 0.2-1)
    dtype: str = "float32"  # images handed to the model: float32 | bfloat16 (train.precision=bf16) | float16 (fp16)
    # --- added with the policies/subsets issue (see hpckd/data/aug.py, hpckd/data/subsets.py) ---
    policies: dict[str, Any] = field(default_factory=dict)  # user policies: name -> spec; `aug: name` uses one
    subset: SubsetConfig = field(default_factory=SubsetConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet8"  # name in hpckd.models.available()
    weights: Optional[str] = None  # local state-dict or hpckd checkpoint to start from
    drop_head: bool = False  # load `weights` without the classifier (fine-tune to another class count)
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder options, e.g. {norm: ln} for preresnets
    init_from_teacher: Optional[str] = None  # checkpoint of a same-arch teacher: start at lambda theta_t + (1 - lambda) theta_r
    init_lambda: float = 0.0  # fidelity study Fig. 6b's lambda in [0, 1] (with init_from_teacher)


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
    schedule_epochs: int = 0  # >0: the cosine spans this many epochs instead of optim.epochs (EffDstl code: 62 for 61)
    # fused SGD/AdamW kernels where torch has them for the device (CPU, CUDA): one kernel per step, and a step whose
    # gradients hold NaN/Inf is skipped on the device (hpckd/train/optim.py, 'finite-step gate'); false: foreach
    fused: bool = True


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
class ServingConfig:
    """How teachers run (validated by :mod:`hpckd.teachers.serving`)."""

    teacher_parallel: bool = False  # shard teachers across DDP ranks (k on rank k % world)
    exchange: str = "all_to_all"  # all_to_all | all_gather: how logits return to the samples' ranks
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU, where teachers run in the training precision)
    channels_last: bool = True  # channels_last inputs and weights on CUDA
    compile: bool = False  # torch.compile each teacher
    compile_backend: str = "inductor"  # torch.compile backend ("eager" checks the wiring without code generation)
    # --- the logit store (hpckd/teachers/store.py, written by `hpckd teachers cache`) ---
    mode: str = "inline"  # inline (run the teachers) | cached (read their logits from `store`)
    store: Optional[str] = None  # cached: the store folder
    store_epochs: str = "error"  # cached, epochs beyond the stored ones: error | cycle (epoch e reads e mod E)


@dataclass
class EvaluatorOptions:
    """Choices where the studies (or their public code) differ; defaults follow the papers' text (validated by
    :mod:`hpckd.metrics.evaluator`).

    Attributes:
        n_bins: ECE / reliability-diagram bins (15, Guo et al. 2017).
        ece_weighting: ``"count"`` (attention study Eq. 13), ``"uniform"`` (mean over the non-empty bins) or
            ``"all_bins"`` (its public code: mean over all bins, an empty bin counting 0; with ``n_bins=10``).
        kl_direction: ``"teacher_student"`` = KL(p_t || p_s) (fidelity study Eq. 3) or ``"student_teacher"``
            (the attention study's code).
        kl_scale: factor on the reported KL (1; the attention study's code uses 10).
        kl_temperature: softmax temperature of the KL (1, as in the fidelity study).
        mi_estimator: ``"split"`` (one joint histogram of the whole split; exact on any number of ranks) or
            ``"per_batch"`` (mean of per-``update`` estimates, the attention study's code; depends on batching,
            so it is rank-invariant only when every rank sees the same batches as 1 rank would).
        fidelity_reduction: ``"sample"`` (fidelity study Eq. 2-3: means over samples) or ``"batch"`` (means of
            per-batch means, the attention and fidelity studies' code; depends on batching).
        mi_knn: also report ``mutual_information_knn``, the mean over batches of sklearn's nearest-neighbour
            ``mutual_info_classif`` (the attention study's code's second estimator).
        topk: accuracies to report; k = 1 is always reported as ``accuracy``, k > 1 as ``accuracy_top{k}``.
        tstddev_group_size: if set, also report T. stddev over the teacher outputs with groups of this size
            (augmentation study: 640); needs teacher logits in loader order (see :class:`TStdDev`).
        tstddev_unbiased: unbiased variance across groups (default) or the biased ``np.var`` of the public code.
        tstddev_rows_per_position: see :class:`TStdDev` (2 for doubled batches with shared positions).
    """

    n_bins: int = 15
    ece_weighting: str = "count"
    kl_direction: str = "teacher_student"
    kl_scale: float = 1.0
    kl_temperature: float = 1.0
    mi_estimator: str = "split"
    fidelity_reduction: str = "sample"  # sample | batch (means of per-batch means, the studies' code)
    mi_knn: bool = False  # also mutual_information_knn (sklearn mutual_info_classif per batch, the attention code)
    topk: tuple[int, ...] = (1, 5)
    tstddev_group_size: Optional[int] = None  # noqa: UP045 (OmegaConf needs Optional on 3.10)
    tstddev_unbiased: bool = True
    tstddev_rows_per_position: int = 1


@dataclass
class MetricsConfig(EvaluatorOptions):
    """Evaluation options (see :class:`hpckd.metrics.evaluator.EvaluatorOptions`) plus how "the teacher" is formed."""

    ensemble: str = "mean_probs"  # mean_probs | mean_logits; why mean_probs: see hpckd.teachers.ensemble
    attention_iou: bool = True  # IoU of teacher 0's and teacher 1's class activation maps (attention study Eq. 1)
    cam_target: str = "predicted"  # predicted | true | sum (sum over classes: the attention study's code)
    cam_threshold: float = 0.4  # region = min-max normalised map >= threshold (0.4 in the attention study's code)
    cam_iou_form: str = "paper"  # paper (normalise, upsample, >=) | code (upsample raw to input, normalise +1e-8, >)
    cam_size: str = "map"  # map (the larger map size) | input (IoU at the input resolution; always for form=code)
    vit_attention: str = "cls"  # ViT teachers' attention map: cls (last block's CLS row) | rollout (Abnar & Zuidema)
    teacher_precision: str = "fp32"  # teachers in the evaluation pass: fp32 | bf16 (CUDA autocast; training keeps serving.amp)


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
    # Config keys that may differ from the checkpoint's when resuming, e.g. [optim.lr] to restart a diverged run
    # from its last good checkpoint with a lower rate (the schedule continues at the new base rate).
    resume_changes: list[str] = field(default_factory=list)
