"""Config sections of the distillation methods: the loss (``loss``) and the batch operations (``batch_ops``).

Plain dataclasses (the schema sits at the bottom of the layer order and imports nothing from hpckd's
subpackages); :func:`hpckd.losses.config.validated` and :func:`hpckd.data.batchops.validated` check them against
their own choice lists.

Layout
------
``loss`` holds what every loss shares (name, temperatures, the two weights, ``kd_form``, ``ensemble``, hard-label
options). Options of one method family live in its own subsection, read only by that family's losses:

* ``loss.da`` (:class:`DAConfig`): KD + DA on the augmentation study's doubled batch (loss ``kd_da``);
* ``loss.wsl`` (:class:`WSLConfig`): Weighted Soft Labels (loss ``wsl``, the response-based study's stage 1);
* ``loss.targets`` (:class:`TargetsConfig`): the response-based study's soft-target rules, Eqs. 1-5
  (:mod:`hpckd.losses.targets`), used by ``soft_target_kd`` and, for the label-smoothed target of Eq. 3, by
  consistent knowledge mining (``ckm``).

CutMixPick's options are ``batch_ops.pick_*``: the batch op that builds and filters the pool reads them.
Keys of the older flat layout (``loss.pick_ratio``, ``loss.wsl_weight_tau``, ...) are refused with the new key's
name, and checkpoints that stored them are migrated (:mod:`hpckd.config.migrate`).

Weight convention (one for the whole package)
---------------------------------------------
The total is ``ce_weight * CE + kd_weight * KD``. ``alpha``, when set, is the **weight of the hard-label
term**, as Hinton et al. 2015 and the fidelity study (Sec. 3.1: L = alpha L_NLL + (1 - alpha) L_KD) write it,
and sets ``ce_weight = alpha``, ``kd_weight = 1 - alpha``. Papers that put alpha on the KD term translate as
``alpha_here = 1 - alpha_paper``:

* attention study, App. A.1: "hard label weight alpha = 0.2"      -> alpha = 0.2
* fidelity study, Sec. 3.1/5: alpha = 0 (pure distillation)        -> alpha = 0.0
* augmentation study, Eq. 1: (1 - a) CE + a tau^2 KL with a = 0.9 -> alpha = 0.1
* response-based study, Sec. 3: (1 - lambda) CE + lambda KD       -> alpha = 1 - lambda

:mod:`hpckd.losses.recipes` holds each study's full loss config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DAConfig:
    """``loss.da``: KD + DA with a doubled batch (augmentation study Sec. 4.1, loss ``kd_da``)."""

    aug_kd_weight: float = 1.0  # weight of the KL on the augmented half x' (lw_mix[2] in the study's code)


@dataclass
class WSLConfig:
    """``loss.wsl``: Weighted Soft Labels (Zhou et al. 2021; response-based study Sec. 5.2, loss ``wsl``)."""

    weight_tau: str = "tau"  # temperature of the weight's two CEs: tau (EffDstl code) | one (WSL authors' code)


@dataclass
class TargetsConfig:
    """``loss.targets``: soft-target replacement and manipulation (response-based study Sec. 4, Eqs. 1-5; loss
    ``soft_target_kd``) and the label-smoothed target of Eq. 3 (also consistent knowledge mining, loss ``ckm``)."""

    replace: str = "none"  # none | full | partial | confidence (teacher 0 weak, teacher 1 strong; Eqs. 1-2)
    manipulate: str = "none"  # none | label_smoothing | teacher_amplification | student_amplification (Eqs. 3-5)
    subset: str = "all"  # samples changed (Fig. 4): all | correct | reg | reg_correct | not_correct
    amplify_delta: float = 0.1  # delta of Eqs. 4-5
    smoothing: float = 0.99  # t of the label-smoothed target (Eq. 3; consistent knowledge mining, Sec. 5.1)
    smoothing_form: str = "eq3"  # eq3: others (1-t)/(C-1) | code: t*onehot + (1-t)/1000 (the public code, any C)


@dataclass
class LossConfig:
    name: str = "ensemble_kd"  # registered loss name: see hpckd.losses.available()
    tau: float = 4.0  # temperature of the KD terms (the student's when teacher_tau is set)
    ce_weight: float = 1.0  # weight of the hard-label term L_NLL
    kd_weight: float = 1.0  # weight of the (mean over teachers) KD term
    kd_form: str = "cross_entropy"  # cross_entropy (attention study Eq. 7) | kl (= cross_entropy - tau^2 H(teacher))
    alpha: Optional[float] = None  # noqa: UP045 (as hpckd.config)  hard-label weight -> ce=alpha, kd=1-alpha
    check_finite: bool = True  # reject NaN/Inf logits with a clear error (one device sync per step)
    teacher_tau: Optional[float] = None  # noqa: UP045  teacher temperature if not tau (response study stage 2: 0.7)
    label_smoothing: float = 0.0  # eps of the hard-label CE term (response study stage-1 code: 0.1)
    # Rows made by Mixup/CutMix/CutMixPick: hard-label term lam CE(y_i) + (1 - lam) CE(y_j) (Zhang et al. 2018 Eq. 1,
    # Yun et al. 2019 Eq. 1); false: the source image's label y_i only. kd_da never uses hard labels on those rows.
    mixed_labels: bool = True
    ensemble: str = "per_teacher_loss"  # per_teacher_loss (attention Eq. 8) | mean_probs | mean_logits (ENSEMBLE_MODES)
    da: DAConfig = field(default_factory=DAConfig)  # kd_da
    wsl: WSLConfig = field(default_factory=WSLConfig)  # wsl
    targets: TargetsConfig = field(default_factory=TargetsConfig)  # soft_target_kd, ckm


@dataclass
class BatchOpsConfig:
    # none | identity | flip | flip_crop | cutout | autoaugment | randaugment | mixup | cutmix | cutmix_pick
    scheme: str = "none"
    doubled: bool = True  # Wang's protocol: keep x and append x' (marked); False replaces x by x'
    mixup_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)
    cutmix_alpha: float = 1.0
    lam_per_sample: bool = False  # one lambda (and CutMix box size) per mixing group; or per sample
    # Rows mix within G groups of the global micro-batch (position mod G); G must be a multiple of the world size,
    # and then the mixes do not depend on it (hpckd.data.batchops: what a logit store written by 2 ranks needs)
    mix_groups: int = 8
    half_split: str = "none"  # none | crop (half-width images) | mask (full size, other half black)
    # CutMixPick (augmentation study Sec. 4.2; hpckd.data.cutmixpick)
    pick_criterion: str = "teacher_entropy"  # teacher_entropy | student_entropy | kl (teacher || student)
    pick_ratio: float = 0.5  # r: fraction of the pool kept
    pick_order: str = "highest"  # highest (Sec. 4.2: more information = better; its code) | lowest
    pick_pool: int = 2  # k: CutMix runs per batch in the pool (mix_n_run in its code)
    pick_tau: float = 4.0  # temperature of the kl criterion (the study's KD temperature, tau = 4)
