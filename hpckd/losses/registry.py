"""Loss registry: ``@register("name")`` on a :class:`~hpckd.losses.base.Loss` subclass, ``build_loss(cfg)``.

Like torchdistill's registries, a method becomes available by decorating its class; the experiment config
names it in ``loss.name``. The decorator and the table live in :mod:`hpckd.losses.base`, which the method modules
import; this module imports the method modules (so their decorators have run) and never the other way round.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpckd.config.methods import LossConfig
from hpckd.config.migrate import MOVED
from hpckd.errors import ConfigError
from hpckd.losses import augmented, kd, response, standardized, wsl  # noqa: F401  (their @register decorators run)
from hpckd.losses.base import LOSSES, Loss, register
from hpckd.losses.config import validated

__all__ = ["available", "build_loss", "check_loss_section", "register", "to_loss_config"]


def available() -> list[str]:
    return sorted(LOSSES)


def to_loss_config(cfg: LossConfig | DictConfig | Mapping[str, Any] | None) -> LossConfig:
    """Accept a LossConfig, an OmegaConf node or a plain mapping (subsections as nested mappings); an unknown key
    becomes a ConfigError naming the closest valid one, a key of the old flat layout one naming its new place."""
    if cfg is None:
        return LossConfig()
    if isinstance(cfg, LossConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return _section(LossConfig, dict(cfg), "loss")  # type: ignore[arg-type]


def _section(schema: type, values: dict[str, Any], key: str) -> Any:
    """``schema(**values)`` with nested dataclass fields built from mappings and every key checked."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        dotted = f"{key}.{name}"
        if name not in names:
            if dotted in MOVED:
                raise ConfigError(f"config: '{dotted}' moved to '{MOVED[dotted]}'")
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        sub = hints[name]
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            value = _section(sub, dict(value), dotted)
        kwargs[name] = value
    return schema(**kwargs)


def check_loss_section(cfg: LossConfig | DictConfig | Mapping[str, Any]) -> LossConfig:
    """The validated ``loss`` section: known keys, a registered ``loss.name``, ranges and choices."""
    lcfg = to_loss_config(cfg)
    if lcfg.name not in LOSSES:
        close = difflib.get_close_matches(lcfg.name, list(LOSSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown loss 'loss.name={lcfg.name}'{hint}; choose one of {', '.join(sorted(LOSSES))}")
    return validated(lcfg)


def build_loss(cfg: LossConfig | DictConfig | Mapping[str, Any] | None) -> Loss:
    """Build the loss named by ``cfg.name`` after validating the config (returns a ``Loss`` module)."""
    lcfg = check_loss_section(cfg)
    return LOSSES[lcfg.name](lcfg)
