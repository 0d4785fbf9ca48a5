"""Config of the distillation loss (owned by hpckd.losses; embedded in the Experiment config as ``loss``).

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

import dataclasses
from dataclasses import dataclass
from typing import Optional

from hpckd.errors import ConfigError
from hpckd.teachers.ensemble import ENSEMBLE_MODES

CHOICES: dict[str, tuple[str, ...]] = {
    "kd_form": ("cross_entropy", "kl"),
    "ensemble": ENSEMBLE_MODES,
    "pick_criterion": ("teacher_entropy", "student_entropy", "kl"),
    "pick_order": ("highest", "lowest"),
    "wsl_weight_tau": ("tau", "one"),
    "smoothing_form": ("eq3", "code"),
    "target_replace": ("none", "full", "partial", "confidence"),
    "target_manipulate": ("none", "label_smoothing", "teacher_amplification", "student_amplification"),
    "target_subset": ("all", "correct", "reg", "reg_correct", "not_correct"),
}


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
    # KD + DA with a doubled batch (augmentation study Sec. 4.1)
    aug_kd_weight: float = 1.0  # weight of the KL on the augmented half (lw_mix[2] in its code)
    # CutMixPick (augmentation study Sec. 4.2)
    pick_criterion: str = "teacher_entropy"  # teacher_entropy | student_entropy | kl (teacher || student)
    pick_ratio: float = 0.5  # r: fraction of the pool kept
    pick_order: str = "highest"  # highest (its code) | lowest (its text: "ascending ... top r")
    pick_pool: int = 2  # k: CutMix runs per batch in the pool (mix_n_run in its code)
    # Efficient Distillation (response-based study Sec. 5)
    wsl_weight_tau: str = "tau"  # temperature of the WSL weight's CEs: tau (EffDstl code) | one (WSL code)
    smoothing: float = 0.99  # t of the label-smoothed target (Eq. 3; consistent knowledge mining)
    smoothing_form: str = "eq3"  # eq3: others (1-t)/(C-1) | code: t*onehot + (1-t)/C
    # soft-target replacement / manipulation (response-based study Sec. 4, Eqs. 1-5)
    target_replace: str = "none"  # none | full | partial | confidence (teacher 0 weak, teacher 1 strong)
    target_manipulate: str = "none"  # none | label_smoothing | teacher_amplification | student_amplification
    target_subset: str = "all"  # all | correct | reg | reg_correct | not_correct
    amplify_delta: float = 0.1  # delta of Eqs. 4-5

    def validated(self) -> LossConfig:
        """Check ranges and choices; resolve ``alpha`` into the two weights. Returns a new config."""
        cfg = dataclasses.replace(self)
        if cfg.alpha is not None:
            if not 0.0 <= cfg.alpha <= 1.0:
                raise ConfigError(f"loss.alpha is {cfg.alpha}; it is the hard-label weight, choose a value in [0, 1]")
            implied = (float(cfg.alpha), 1.0 - float(cfg.alpha))
            if (cfg.ce_weight, cfg.kd_weight) not in ((1.0, 1.0), implied):  # (1, 1): the defaults
                raise ConfigError(
                    "loss.alpha and loss.ce_weight/kd_weight are both set: use alpha (hard-label weight) or the weights"
                )
            cfg.ce_weight, cfg.kd_weight = implied
        for key in ("tau", "teacher_tau"):
            value = getattr(cfg, key)
            if value is not None and value <= 0:
                raise ConfigError(f"loss.{key} is {value}; a temperature must be > 0")
        for key in ("ce_weight", "kd_weight", "aug_kd_weight", "amplify_delta"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"loss.{key} is {getattr(cfg, key)}; it must be >= 0")
        _in_range("label_smoothing", cfg.label_smoothing, 0.0, 1.0)
        _in_range("smoothing", cfg.smoothing, 0.0, 1.0)
        if not 0.0 < cfg.pick_ratio <= 1.0:
            raise ConfigError(f"loss.pick_ratio is {cfg.pick_ratio}; keep a fraction in (0, 1] of the pool")
        if cfg.pick_pool < 1:
            raise ConfigError(f"loss.pick_pool is {cfg.pick_pool}; the pool needs at least 1 CutMix run")
        for key, allowed in CHOICES.items():
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"config: 'loss.{key}' is {getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
        return cfg


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"loss.{key} is {value}; choose a value in [{low}, {high}]")
