"""Property-based fuzzing of the configs (Hypothesis): whatever a mapping or a YAML file holds,
loading it gives a config or a :class:`ConfigError`, never another exception.

Mappings are drawn from the dataclasses' own fields (so most examples get past the first key and
into the nested configs, the recipe's stage overrides and its simulation settings), with values of
the field's type (edge values included: NaN, infinities, -0.0, huge numbers, numeric-looking
strings) or of any other type, and now and then an unknown key; each is loaded as a mapping and as
the YAML file ``dmdiff.config.dump_yaml`` makes of it (the two must agree). YAML source pieced together from
tags, anchors and awkward scalars, and raw bytes, go through :func:`read_yaml`. Derandomized, so CI
sees the same examples every run; about 20 s in all.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmdiff.config import dump_yaml, read_yaml, to_dict
from dmdiff.data.simulate import SimulationConfig, resolve_config
from dmdiff.errors import ConfigError
from dmdiff.train.config import RecipeConfig, TrainConfig, load_train_config


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` derandomized examples (a few ms each), no example database."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: Strings YAML or a config might take for something else.
TRICKY_STRINGS = ["1e-3", "1E5", "-2.5e+3", "1.0e3", ".5e1", "1e", ".nan", ".inf", "-.inf", "nan", "inf",
                  "0x1F", "0o17", "0b101", "1_000", "1:30", "2001-13-01", "2001-12-14", "yes", "no", "on",
                  "null", "~", "", " ", "-0.0", "True", "'", '"', "&a", "*a", "!!float", "- a", "a: b",
                  "\t", "\n", "\x85", "\u2028", "\ufeff", "é", "tiny", "sd-turbo", "vgg", "fp16", "stage1"]
TRICKY_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308, 5e-324, 1e-3, 0.5, 1.0, 2.0]
TRICKY_INTS = [0, 1, -1, 3, 7, 8, 64, 255, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, -(2**63), 10**30, 10**400]
#: Fields typed ``dict[str, Any]`` that hold another config's keys.
NESTED_CONFIGS = {(RecipeConfig, "stage1"): TrainConfig, (RecipeConfig, "stage2"): TrainConfig,
                  (RecipeConfig, "simulate"): SimulationConfig}

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(TRICKY_INTS),
    st.floats(), st.sampled_from(TRICKY_FLOATS),
    st.text(max_size=10), st.sampled_from(TRICKY_STRINGS),
)
keys = st.one_of(st.text(max_size=8), st.sampled_from(TRICKY_STRINGS), st.integers(-3, 3), st.none(),
                 st.booleans(), st.sampled_from(TRICKY_FLOATS))
anything = st.recursive(
    scalars | st.sets(st.integers(-2, 2) | st.text(max_size=3), max_size=3),  # YAML has !!set too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)


def mostly(typed: st.SearchStrategy) -> st.SearchStrategy:
    """``typed`` four times in five, any value otherwise."""
    return st.integers(0, 4).flatmap(lambda k: anything if k == 0 else typed)


def near(default: Any) -> st.SearchStrategy:
    """Values around a numeric default, so range checks are passed as often as failed."""
    return st.sampled_from([0, 0.5, 1, 1, 2, 10, -1]).map(lambda f: type(default)(default * f))


def typed_values(tp: Any, default: Any = None) -> st.SearchStrategy:
    """Values of type ``tp`` (as YAML gives them: lists for tuples), edge values included."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else typed_values(a, default) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if dataclasses.is_dataclass(tp):
        return mapping_for(tp)
    if origin is tuple:
        if args and args[-1] is Ellipsis:
            return st.lists(typed_values(args[0]), max_size=3)
        return st.tuples(*(typed_values(a) for a in args)).map(list)
    if tp is tuple:  # MetalensSpec.bands_m: three (lo, hi) pairs in metres
        edges = st.one_of(st.floats(), st.sampled_from([4e-7, 5e-7, 6e-7, 7e-7]))
        band = st.one_of(st.sampled_from([list(b) for b in default or ()]), st.lists(edges, min_size=1, max_size=3),
                         st.dictionaries(edges, edges, min_size=2, max_size=2), st.sets(edges, min_size=2, max_size=2))
        return st.lists(mostly(band), min_size=2, max_size=4)
    if tp is float:
        numbers = st.one_of(st.floats(), st.sampled_from(TRICKY_FLOATS),
                            st.sampled_from([math.nan, math.inf, -math.inf]),
                            st.sampled_from([0, 1, -1, 2**1024, 10**400, -(10**400)]))  # ints beyond float
        return numbers if not isinstance(default, (int, float)) else st.one_of(numbers, near(float(default)))
    if tp is int:
        numbers = st.one_of(st.integers(), st.sampled_from(TRICKY_INTS))
        return numbers if not isinstance(default, int) else st.one_of(numbers, near(default))
    if tp is bool:
        return st.booleans()
    if tp is str:
        return st.one_of(st.text(max_size=10), st.sampled_from(TRICKY_STRINGS))
    return anything


_mappings: dict[type, st.SearchStrategy] = {}


def mapping_for(cls: type) -> st.SearchStrategy:
    """Mappings of up to four of ``cls``'s fields (typed values, mostly), sometimes an unknown key."""
    if cls not in _mappings:
        _mappings[cls] = st.deferred(lambda: _build_mapping(cls))
    return _mappings[cls]


def _build_mapping(cls: type) -> st.SearchStrategy:
    """:func:`mapping_for` (built lazily: configs nest, the recipe's stages hold TrainConfig keys)."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    values, names = {}, []
    for f in dataclasses.fields(cls):
        nested = NESTED_CONFIGS.get((cls, f.name)) or (hints[f.name] if dataclasses.is_dataclass(hints[f.name])
                                                      else None)
        typed = mapping_for(nested) if nested else typed_values(hints[f.name], getattr(defaults, f.name))
        values[f.name] = mostly(typed)
        names += [f.name] * (6 if nested else 1)  # go deep more often
    known = st.lists(st.sampled_from(names), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: values[n] for n in names}))
    unknown = st.dictionaries(keys, anything, max_size=1)
    return st.tuples(known, st.integers(0, 9), unknown).map(lambda t: {**t[0], **t[2]} if t[1] == 0 else t[0])


def leaves(cls: type, depth: int = 0) -> list[tuple[tuple[str, ...], Any, Any]]:
    """``(key path, type, default)`` of every leaf setting of ``cls``, through nested dataclasses and
    (once) the configs nested in ``dict`` fields (the recipe's stages and simulation)."""
    hints, defaults, out = typing.get_type_hints(cls), cls(), []
    for f in dataclasses.fields(cls):
        tp, nested = hints[f.name], NESTED_CONFIGS.get((cls, f.name))
        inner = nested if nested and depth == 0 else tp if dataclasses.is_dataclass(tp) else None
        if inner is not None:
            out += [((f.name, *path), t, d) for path, t, d in leaves(inner, depth + (nested is not None))]
        out.append(((f.name,), tp, getattr(defaults, f.name)))
    return out


def nest(path: tuple[str, ...], value: Any) -> dict:
    """``{path[0]: {path[1]: ... value}}``."""
    for key in reversed(path):
        value = {key: value}
    return value


def one_setting(cls: type) -> st.SearchStrategy:
    """Mappings that set one leaf of ``cls`` (anywhere in the tree), so that every value reaches
    the checks of its own field."""
    return st.sampled_from(leaves(cls)).flatmap(
        lambda leaf: st.builds(nest, st.just(leaf[0]), mostly(typed_values(leaf[1], leaf[2]))))


def outcome(load, *args):
    """``load(*args)``, or the ConfigError it raised; any other exception fails the test."""
    try:
        return load(*args)
    except ConfigError as e:
        return e


def write_yaml(path, data) -> None:
    """``data`` as ``RUN/config.yaml`` is written (:func:`dmdiff.config.dump_yaml`)."""
    path.write_text(dump_yaml(data))


def finite_floats(value: Any) -> bool:
    """No NaN or infinity anywhere in a :func:`~dmdiff.config.to_dict` tree."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        value = list(value.values())
    return all(finite_floats(v) for v in value) if isinstance(value, list) else True


def check_loads(load, data, yaml_path, *args) -> None:
    """``load`` of ``data`` and of ``data`` written as YAML both give a ConfigError, or both the same
    config (safe_dump output reloads identically), one without NaN or infinities."""
    from_mapping = outcome(load, data, *args)
    write_yaml(yaml_path, data)
    from_yaml = outcome(load, yaml_path, *args)
    if isinstance(from_mapping, ConfigError) or isinstance(from_yaml, ConfigError):
        assert isinstance(from_mapping, ConfigError) and isinstance(from_yaml, ConfigError), (from_mapping, from_yaml)
    else:
        assert from_mapping == from_yaml
        assert finite_floats(to_dict(from_mapping))


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory):
    """One file, rewritten by every example (Hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


@fuzz(1000)
@given(data=st.one_of(mapping_for(TrainConfig), one_setting(TrainConfig)))
def test_train_config_fuzz(data, yaml_path):
    check_loads(load_train_config, data, yaml_path)


@fuzz(500)
@given(recipe=mapping_for(RecipeConfig))
def test_recipe_config_fuzz(recipe, yaml_path):
    """The recipe alone: its checks (stage overrides, pseudo, simulate) run after all the others."""
    check_loads(load_train_config, {"recipe": recipe}, yaml_path)


@fuzz(600)
@given(data=st.one_of(mapping_for(SimulationConfig), one_setting(SimulationConfig)), smoke=st.booleans())
def test_simulation_config_fuzz(data, smoke, yaml_path):
    check_loads(resolve_config, data, yaml_path, smoke)


#: Pieces of YAML source: structure, tags, anchors, and scalars that are easy to misread.
YAML_PIECES = st.sampled_from([
    "lr", "loss", "mse", "model", "svda_dim", "recipe", "stage1", "simulate", "spec", "grid_size",
    "bands_m", "path_probs", "crop_px", "exposure_range", ": ", ":", "- ", "-", "? ", "[", "]", "{", "}",
    ", ", "&a ", "*a", "&b ", "*b", "<<: ", "!!float ", "!!int ", "!!bool ", "!!str ", "!!binary ",
    "!!timestamp ", "!!set ", "!!omap ", "!!map ", "!!seq ", "!!null ", "!!python/tuple ", "!foo ",
    "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "|\n", ">-\n", "'", '"', "\\", "#",
    "\t", "  ", "\n", "\r\n", "1e-3", "1E5", "-2.5e+3", ".nan", ".inf", "1e400", "0x1F", "1:30",
    "2001-13-01", "2001-12-14t21:59:43.10-05:00", "null", "~", "yes", "0", "-1", "3.", "2**32", "\x00",
    "\x85", "\ufeff", "é",
])


def check_yaml_file(path) -> None:
    """read_yaml gives a dict or a ConfigError; a dict loads as either config or gives a ConfigError."""
    data = outcome(read_yaml, path)
    if isinstance(data, ConfigError):
        return
    assert isinstance(data, dict)
    outcome(load_train_config, data)
    outcome(resolve_config, data, False)


@fuzz(1000)
@given(text=st.lists(YAML_PIECES, max_size=40).map("".join))
def test_yaml_source_fuzz(text, yaml_path):
    yaml_path.write_bytes(text.encode("utf-8"))
    check_yaml_file(yaml_path)


@fuzz(500)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_raw_bytes_fuzz(raw, yaml_path):
    yaml_path.write_bytes(raw)
    check_yaml_file(yaml_path)
