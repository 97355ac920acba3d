"""Plain YAML configs merged over dataclass defaults, with strict checking.

``load_config(MyConfig, "file.yaml")`` returns ``MyConfig`` with the file's values laid over the
dataclass defaults. Unknown keys, values of the wrong type, NaN and infinities (anywhere in a value:
no config field needs them), integers beyond 64 bits and the dataclasses' own ``__post_init__``
checks raise :class:`ConfigError` naming the dotted key (``loss.mse``, ``spec.grid_size``), so a
typo fails before any work starts. Nested dataclasses merge recursively.

YAML is read with :class:`YAMLLoader`: PyYAML's safe loader, except that numbers in exponent form
are floats as in YAML 1.2 (``1e-3``, ``1E5``, ``-2.5e+3``; YAML 1.1 reads the first two as strings).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from dmdiff.errors import ConfigError, DmdiffError

T = TypeVar("T")

#: Numbers in exponent form that YAML 1.1 leaves as strings and YAML 1.2 reads as floats: a mantissa
#: with or without a dot, and an exponent with or without a sign (``1e-3``, ``1E5``, ``2.e+3``).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
#: Largest integer a setting may hold (int64).
MAX_INT = 2**63 - 1


class YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 exponent floats, and malformed tagged values (``!!float x``,
    a date ``2001-13-01``, an empty ``!!int``) reported as :class:`yaml.YAMLError` with their
    position, instead of the ``ValueError``, ``KeyError``, ``IndexError``... PyYAML's constructors
    raise for them."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as e:
            what = f"{node.value!r} as {node.tag}" if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {what} ({e})",
                                                    node.start_mark) from None


YAMLLoader.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+.0123456789"))


class YAMLDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that knows :class:`YAMLLoader`'s exponent floats, so a string such as
    ``"1e3"`` is written quoted and reads back as that string rather than as the float 1000.0 (the
    output stays valid YAML 1.1)."""


YAMLDumper.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+.0123456789"))


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text (keys in their order) that :func:`read_yaml` reads back identically."""
    return yaml.dump(data, Dumper=YAMLDumper, sort_keys=False)


def _check_values(value: Any, where: str, checked: set[int], open_: set[int]) -> None:
    """Raise ConfigError naming the dotted key of a NaN or infinity anywhere in ``value``, of an
    integer beyond 64 bits (no setting needs one; numpy, torch and float() fail on them), or of a
    container that contains itself (a YAML alias to its ancestor, ``&a [*a]``).

    ``checked``: ids of containers already checked (an alias repeats one); ``open_``: the ids of the
    containers being checked, from the top down to ``value``.
    """
    if isinstance(value, numbers.Integral):
        if not -MAX_INT <= value <= MAX_INT:  # the message leaves the value out: it may have 10**5 digits
            raise ConfigError(f"{where}: an integer of {int(value).bit_length()} bits is out of range "
                              "(settings are integers between -(2**63 - 1) and 2**63 - 1)")
        return
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value} is not allowed (NaN and infinities are never valid "
                              "settings; give a finite number)")
        return
    if not isinstance(value, (Mapping, list, tuple)) or id(value) in checked:
        return
    if id(value) in open_:
        raise ConfigError(f"{where}: the value contains itself (a YAML alias refers to its own ancestor)")
    open_.add(id(value))
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, item in items:
        _check_values(item, f"{where}.{key}" if isinstance(value, Mapping) else f"{where}[{key}]",
                      checked, open_)
    open_.discard(id(value))
    checked.add(id(value))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1 and dataclasses.is_dataclass(candidates[0]) and isinstance(value, Mapping):
            return _check_type(value, candidates[0], where)     # an optional section: its own key errors
        for arg in candidates:
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
    """Return a copy of dataclass instance ``base`` with ``overrides`` applied (strictly checked).

    ``prefix`` is prepended to the keys named in errors (``"model."``). A :class:`DmdiffError` of
    the dataclass's own ``__post_init__`` checks becomes a ConfigError with ``prefix`` in front of
    its message (those messages start with the field name, so it names the dotted key).

    Raises:
        ConfigError: unknown key, wrong type, NaN / infinity, an integer beyond 64 bits, a value
            that contains itself, or a value the dataclass rejects.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(overrides).__name__}")
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    changes, checked = {}, set()
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys: {sorted(names)}")
        _check_values(value, f"{prefix}{key}", checked, set())
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _check_type(value, hints[key], f"{prefix}{key}")
    try:
        return dataclasses.replace(base, **changes)
    except DmdiffError as e:
        raise ConfigError(f"{prefix}{e}") from None


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (UTF-8 or UTF-16 with a BOM; empty: ``{}``), read with
    :class:`YAMLLoader`; ConfigError when missing, unreadable, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as stream:  # bytes: PyYAML decodes (and rejects bad encodings) itself
            data = yaml.load(stream, Loader=YAMLLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return dict(data)


#: The configs shipped with the repository (``configs/`` at its root).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: The smoke presets of every job, in one file (:func:`smoke_preset`).
SMOKE_FILE = CONFIGS / "smoke.yaml"


def smoke_preset(job: str) -> dict:
    """What ``--smoke`` lays over the settings of ``job`` (``"simulate"``, ``"recipe"``,
    ``"pretrain"``): its section of :data:`SMOKE_FILE`, a plain mapping of config keys.

    Raises:
        ConfigError: the file is missing or invalid, or has no such section.
    """
    presets = read_yaml(SMOKE_FILE)
    if not isinstance(presets.get(job), Mapping):
        raise ConfigError(f"{SMOKE_FILE}: no '{job}' section of smoke settings")
    return dict(presets[job])


def config_layers(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[dict]:
    """The settings of a YAML config file, base first: a file whose top level has ``extends: NAME``
    (a shipped config, ``configs/NAME.yaml``) or ``extends: FILE`` (relative to the file's folder)
    is that config's layers with its own other keys laid over them.

    Raises:
        ConfigError: as :func:`read_yaml`, a base that is missing or not a string, or a cycle.
    """
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return [data]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends must name a shipped config or a YAML file, got {base!r}")
    shipped, relative = CONFIGS / f"{base}.yaml", path.parent / base
    base_path = (relative if relative.is_file() else shipped).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends {base!r}: neither {relative} nor the shipped {shipped} exists")
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"{path}: extends {base!r} leads back to itself")
    return config_layers(base_path, (*_seen, path.resolve())) + [data]


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build ``cls()`` then lay a YAML file (with its ``extends`` bases, :func:`config_layers`) or
    mapping and keyword overrides over it."""
    cfg = cls()
    for layer in [] if source is None else [source] if isinstance(source, Mapping) else config_layers(source):
        cfg = merge(cfg, layer)
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
