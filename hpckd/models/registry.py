"""Model registry: ``create(name, num_classes, **kw)``, ``available()`` and ``spec(name)``.

Builders register themselves with :func:`register`, together with the input resolution they were designed for
(32 px for the CIFAR nets of the studies, 224 px for the torchvision ImageNet nets). Nothing is downloaded at run
time: torchvision builders are called with ``weights=None`` and weights come from local files only (see
:func:`hpckd.models.weights.load_weights`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from hpckd.errors import ConfigError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model besides its builder.

    Attributes:
        name: registry name (``create(name, ...)``).
        input_size: native square input resolution in pixels (32 for CIFAR nets, 224 for ImageNet nets).
        family: ``"cifar"`` or ``"imagenet"``, the dataset family the architecture was designed for.
        kind: ``"cnn"`` (class activation maps via :func:`hpckd.models.cam_features`) or ``"vit"`` (attention maps
            via :func:`hpckd.models.vit_attentions`).
    """

    name: str
    input_size: int = 32
    family: str = "cifar"
    kind: str = "cnn"


_BUILDERS: dict[str, Builder] = {}
_SPECS: dict[str, ModelSpec] = {}


def register(
    name: str, *, input_size: int = 32, family: str = "cifar", kind: str = "cnn"
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes=..., **kw) -> nn.Module`` under ``name``."""

    def wrap(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = builder
        _SPECS[name] = ModelSpec(name=name, input_size=input_size, family=family, kind=kind)
        return builder

    return wrap


# The builder modules register themselves when imported; the package (hpckd/models/__init__.py) imports all of
# them, and importing this module runs the package first, so the table is complete whenever it is read.


def available() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_BUILDERS)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name is one :class:`ConfigError` with a suggestion."""
    _check_known(name)
    return _SPECS[name]


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and random initialisation (never downloads)."""
    _check_known(name)
    model = _BUILDERS[name](num_classes=num_classes, **kwargs)
    # Remembered so that load_weights can name the architecture in its errors.
    model.hpckd_arch = name  # type: ignore[attr-defined]
    return model


def _check_known(name: str) -> None:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint}; see `hpckd models` for the list")
