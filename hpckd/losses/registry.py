"""Loss registry: ``@register("name")`` on a :class:`~hpckd.losses.base.Loss` subclass, ``build_loss(cfg)``.

Like torchdistill's registries, a method becomes available by decorating its class; the experiment config
names it in ``loss.name``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpckd.errors import ConfigError
from hpckd.losses.config import LossConfig

_LOSSES: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator registering a Loss subclass under ``name`` (sets ``cls.name``)."""

    def wrap(cls: type) -> type:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    _import_methods()
    return sorted(_LOSSES)


def to_loss_config(cfg: LossConfig | DictConfig | Mapping[str, Any] | None) -> LossConfig:
    """Accept a LossConfig, an OmegaConf node or a plain mapping; unknown keys become a ConfigError."""
    if cfg is None:
        return LossConfig()
    if isinstance(cfg, LossConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    names = [f.name for f in dataclasses.fields(LossConfig)]
    for key in cfg:  # type: ignore[union-attr]
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean 'loss.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key 'loss.{key}'{hint}")
    return LossConfig(**dict(cfg))  # type: ignore[arg-type]


def build_loss(cfg: LossConfig | DictConfig | Mapping[str, Any] | None) -> Any:
    """Build the loss named by ``cfg.name`` after validating the config (returns a ``Loss`` module)."""
    _import_methods()
    lcfg = to_loss_config(cfg)
    if lcfg.name not in _LOSSES:
        close = difflib.get_close_matches(lcfg.name, list(_LOSSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown loss 'loss.name={lcfg.name}'{hint}; choose one of {', '.join(sorted(_LOSSES))}")
    lcfg = lcfg.validated()
    return _LOSSES[lcfg.name](lcfg)


def _import_methods() -> None:
    # Importing the method modules runs their @register decorators.
    from hpckd.losses import augmented, kd, response, standardized, wsl  # noqa: F401
