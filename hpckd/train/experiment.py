"""Loading an experiment: the config (:func:`hpckd.config.load_config`) plus every section's own validation.

Each subpackage checks the section it owns, against its own choice lists (the policy names of
:mod:`hpckd.data.aug`, the losses of the registry, the ensemble reductions of :mod:`hpckd.teachers.ensemble` ...);
:func:`validate_experiment` calls them all, so a config that loads is one every part can run. Every mistake is one
:class:`~hpckd.errors.ConfigError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf

from hpckd.config import BatchOpsConfig, ServingConfig, load_config
from hpckd.data.batchops import validated as validated_batch_ops
from hpckd.data.checks import check_data_section
from hpckd.errors import ConfigError
from hpckd.losses.registry import check_loss_section
from hpckd.metrics.checks import check_metrics_section
from hpckd.teachers.serving import check_serving
from hpckd.train.options import check_options

T = TypeVar("T")


def validate_experiment(cfg: DictConfig) -> DictConfig:
    """Run every section's validator; return ``cfg`` unchanged."""
    check_data_section(cfg)
    check_loss_section(cfg.loss)
    validated_batch_ops(section(cfg.batch_ops, BatchOpsConfig))
    check_serving(section(cfg.serving, ServingConfig))
    check_metrics_section(cfg.metrics)
    check_options(cfg)
    return cfg


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> DictConfig:
    """Schema defaults, ``base`` (a checkpoint's stored config), the YAML file and the overrides, merged and
    validated (see :func:`hpckd.config.load_config` for the order)."""
    return validate_experiment(load_config(path, overrides, base=base))


def section(node, schema: type[T]) -> T:
    """A config section as its dataclass instance (nested sections included)."""
    if isinstance(node, schema):
        return node
    value = OmegaConf.to_object(node) if isinstance(node, DictConfig) else schema(**node)
    if not isinstance(value, schema):
        raise ConfigError(f"config: expected a {schema.__name__} section, got {type(value).__name__}")
    return value
