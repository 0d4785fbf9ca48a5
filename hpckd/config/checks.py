"""Small building blocks for the section validators that each subpackage owns: one-line ConfigErrors for a bad
choice, a count below its minimum, or a value outside its range."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpckd.errors import ConfigError


def choose(key: str, value: Any, allowed: Iterable[str]) -> None:
    """``value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config: '{key}' is {value!r}; choose one of {', '.join(allowed)}")


def at_least(key: str, value: float | None, low: float, meaning: str = "") -> None:
    """``value >= low`` (None passes: the option is unset)."""
    if value is not None and value < low:
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(f"config: '{key}' is {value}; it must be >= {low:g}{why}")


def positive(key: str, value: float | None, meaning: str = "") -> None:
    """``value > 0`` (None passes)."""
    if value is not None and not value > 0:
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(f"config: '{key}' is {value}; it must be > 0{why}")


def within(key: str, value: float | None, low: float, high: float) -> None:
    """``low <= value <= high`` (None passes)."""
    if value is not None and not low <= value <= high:
        raise ConfigError(f"config: '{key}' is {value}; choose a value in [{low:g}, {high:g}]")
