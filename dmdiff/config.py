"""Plain YAML configs merged over dataclass defaults, with strict checking.

``load_config(MyConfig, "file.yaml")`` returns ``MyConfig`` with the file's values laid over the
dataclass defaults. Unknown keys and values of the wrong type raise :class:`ConfigError` naming
the key, so a typo fails before any work starts. Nested dataclasses merge recursively.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from dmdiff.errors import ConfigError

T = TypeVar("T")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return merge(tp(), value, prefix=where + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp in (tuple, list):  # bare annotation: YAML lists become (nested) tuples / lists as is
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return _nested_tuple(value) if tp is tuple else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _nested_tuple(value: Any) -> Any:
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def merge(base: T, overrides: Mapping[str, Any], prefix: str = "") -> T:
    """Return a copy of dataclass instance ``base`` with ``overrides`` applied (strictly checked)."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(overrides).__name__}")
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys: {sorted(names)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _check_type(value, hints[key], f"{prefix}{key}")
    return dataclasses.replace(base, **changes)


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file; ConfigError when missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return dict(data)


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build ``cls()`` then lay a YAML file (or mapping) and keyword overrides over it."""
    cfg = cls()
    if source is not None:
        cfg = merge(cfg, source if isinstance(source, Mapping) else read_yaml(source))
    if overrides:
        cfg = merge(cfg, overrides)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-serialisable dict of a (nested) dataclass config."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
