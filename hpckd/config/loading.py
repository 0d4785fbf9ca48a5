"""Loading an experiment config: the schema's defaults, a YAML file and dotted overrides, merged and type-checked.

``load_config("configs/quickstart.yaml", ["optim.lr=0.05"])`` returns an :class:`Experiment`-typed ``DictConfig``.
A mistake OmegaConf can see becomes a one-line :class:`~hpckd.errors.ConfigError`: an unknown key names the
closest valid one, a wrong type names the field and the expected type. Choices and ranges are checked by the
subpackages that own them (:func:`hpckd.train.experiment.load_experiment` runs every check).
"""

from __future__ import annotations

import dataclasses
import typing
import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from hpckd.config.migrate import check_renamed_keys, migrate_config
from hpckd.config.schema import Experiment
from hpckd.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type = Experiment,
                base: dict | None = None) -> DictConfig:
    """Merge the schema defaults, ``base`` (e.g. a checkpoint's config), a YAML file and dotted ``key=value``
    overrides, in that order; validate everything."""
    cfg = OmegaConf.structured(schema)
    sources: list[tuple[str, Any]] = []
    if base is not None:
        sources.append(("checkpoint config", OmegaConf.create(migrate_config(base))))
    if path is not None:
        sources.append((str(path), _read_yaml(Path(path))))
    if overrides:
        sources.append(("command line", _parse_overrides(overrides)))
    for where, source in sources[1 if base is not None else 0:]:
        check_renamed_keys(source, where)
    for where, source in sources:
        try:
            cfg = OmegaConf.merge(cfg, source)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {describe_config_error(exc, schema)}") from exc
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
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.05)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # OmegaConf's own errors, and yaml's ScannerError/ParserError for values like `[1`
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"bad override value in {' '.join(overrides)!r}: {first} (quote lists and mappings as "
                          f"YAML, e.g. 'optim.milestones=[30,60]')") from exc


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
