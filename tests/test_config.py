"""YAML-over-dataclass configs: strict keys and types, nested merging, provenance."""

from dataclasses import dataclass, field

import pytest

from dmdiff.config import load_config, to_dict
from dmdiff.errors import ConfigError
from dmdiff.runinfo import provenance


@dataclass
class Inner:
    rank: int = 4
    scale: float = 1.0


@dataclass
class Outer:
    name: str = "tiny"
    steps: int = 10
    probs: tuple[float, float, float] = (0.7, 0.2, 0.1)
    inner: Inner = field(default_factory=Inner)
    path: str | None = None


def test_yaml_overrides_defaults_and_nests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\ninner:\n  scale: 2\nprobs: [0.5, 0.3, 0.2]\n")
    cfg = load_config(Outer, f)
    assert cfg.steps == 20 and cfg.inner.scale == 2.0 and cfg.inner.rank == 4
    assert cfg.probs == (0.5, 0.3, 0.2) and cfg.name == "tiny"
    assert to_dict(cfg)["inner"] == {"rank": 4, "scale": 2.0}


@pytest.mark.parametrize("text, needle", [
    ("stepz: 3\n", "stepz"),
    ("steps: ten\n", "steps"),
    ("inner:\n  rank: 1.5\n", "inner.rank"),
    ("probs: [1, 2]\n", "probs"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(Outer, f)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(Outer, bad)


def test_provenance_records_versions_and_seed():
    record = provenance(config={"a": 1}, seed=7)
    assert record["seed"] == 7 and record["versions"]["numpy"] and record["config"] == {"a": 1}


@dataclass
class WithBareTuple:
    bands: tuple = ((1.0, 2.0), (3.0, 4.0))


def test_bare_tuple_fields_take_yaml_lists(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("bands: [[5, 6], [7, 8]]\n")
    assert load_config(WithBareTuple, f).bands == ((5, 6), (7, 8))
    f.write_text("bands: 3\n")
    with pytest.raises(ConfigError, match="bands"):
        load_config(WithBareTuple, f)


@pytest.mark.parametrize("name", ["tiny.yaml", "sd-turbo.yaml"])
def test_shipped_configs_load_with_both_recipe_stages(name):
    from pathlib import Path

    from dmdiff.train.config import load_train_config, stage_config

    cfg = load_train_config(Path(__file__).resolve().parent.parent / "configs" / name)
    stage1, stage2 = stage_config(cfg, "stage1"), stage_config(cfg, "stage2")
    assert stage1.path_probs.normalised()[2] == 1.0 and stage2.path_probs.normalised()[0] > 0
