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


# ---- non-finite values, YAML 1.2 floats, malformed YAML ------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("overrides, key", [
    ({"loss": {"mse": NAN}}, "loss.mse"),
    ({"weight_decay": INF}, "weight_decay"),
    ({"lr": INF}, "lr"),
    ({"lr": -INF}, "lr"),
    ({"path_probs": {"positive": NAN}}, "path_probs.positive"),
    ({"exposure_range": [0.5, INF]}, r"exposure_range\[1\]"),
    ({"grad_clip": NAN}, "grad_clip"),
    ({"model": {"anchor_sigma_px": INF}}, "model.anchor_sigma_px"),
    ({"recipe": {"pseudo": {"noise_strength": NAN}}}, "recipe.pseudo.noise_strength"),
    ({"recipe": {"stage2": {"loss": {"lpips": NAN}}}}, r"recipe.stage2.loss.lpips"),
    ({"recipe": {"simulate": {"spec": {"focal_length_m": INF}}}}, "recipe.simulate.spec.focal_length_m"),
])
def test_non_finite_train_values_name_the_key(overrides, key):
    from dmdiff.train.config import load_train_config

    with pytest.raises(ConfigError, match=rf"^{key}: (nan|inf|-inf) is not allowed"):
        load_train_config(overrides)


@pytest.mark.parametrize("overrides, key", [
    ({"test_fraction": NAN}, "test_fraction"),
    ({"shot_range": [1e-4, INF]}, r"shot_range\[1\]"),
    ({"spec": {"aperture_diameter_m": NAN}}, "spec.aperture_diameter_m"),
    ({"spec": {"bands_m": [[6e-7, INF], [5e-7, 5.8e-7], [4.2e-7, 4.9e-7]]}}, r"spec.bands_m\[0\]\[1\]"),
])
@pytest.mark.parametrize("smoke", [False, True])
def test_non_finite_simulation_values_name_the_key(overrides, key, smoke):
    from dmdiff.data.simulate import resolve_config

    with pytest.raises(ConfigError, match=rf"^{key}: (nan|inf) is not allowed"):
        resolve_config(overrides, smoke=smoke)


def test_non_finite_yaml_values_name_the_key(tmp_path):
    from dmdiff.train.config import load_train_config

    f = tmp_path / "c.yaml"
    for text, key in [("loss: {mse: .nan}\n", "loss.mse"), ("weight_decay: .inf\n", "weight_decay"),
                      ("lr: -.Inf\n", "lr"), ("path_probs: {positive: .NaN}\n", "path_probs.positive"),
                      ("lr: 1e400\n", "lr")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            load_train_config(f)


@pytest.mark.parametrize("overrides, key", [
    ({"lr": 10**400}, "lr"),                                  # float() would overflow
    ({"steps": 2**63}, "steps"),                              # numpy / torch would overflow
    ({"recipe": {"stage1": {"batch_size": -(2**64)}}}, r"recipe.stage1.batch_size"),
    ({"data": 10**5000}, "data"),                             # too long even to print
])
def test_integers_beyond_64_bits_name_the_key(overrides, key):
    from dmdiff.train.config import load_train_config

    with pytest.raises(ConfigError, match=rf"^{key}: an integer of \d+ bits is out of range"):
        load_train_config(overrides)
    assert load_train_config({"steps": 2**63 - 1}).steps == 2**63 - 1


def test_yaml_exponent_floats_are_floats(tmp_path):
    from dmdiff.config import read_yaml
    from dmdiff.train.config import load_train_config

    f = tmp_path / "c.yaml"
    f.write_text("a: 1e-3\nb: 1E5\nc: -2.5e+3\nd: .5e1\ne: 2.e-2\nf: '1e-3'\ng: 1e\nh: 1.5\ni: 12\nj: 0x1F\n")
    assert read_yaml(f) == {"a": 1e-3, "b": 1e5, "c": -2.5e3, "d": 5.0, "e": 0.02, "f": "1e-3", "g": "1e",
                            "h": 1.5, "i": 12, "j": 31}
    assert all(type(v) is float for v in read_yaml(f).values() if not isinstance(v, (int, str)))
    f.write_text("lr: 1e-3\nweight_decay: 1E-2\nloss: {mse: 2e0}\n")
    cfg = load_train_config(f)
    assert cfg.lr == 1e-3 and cfg.weight_decay == 1e-2 and cfg.loss.mse == 2.0


def test_dumped_config_reloads_identically(tmp_path):
    from dmdiff.config import dump_yaml
    from dmdiff.train.config import load_train_config

    # strings that YAML 1.2 would read as numbers must come back as the same strings
    cfg = load_train_config({"data": "1e3", "extra_data": ["2E-5", "x"], "lr": 1e-5, "weight_decay": 1e-12,
                             "init_weights": "-3.5e+2", "recipe": {"stage2": {"lr": 3e-7}}})
    f = tmp_path / "config.yaml"
    f.write_text(dump_yaml(to_dict(cfg)))
    assert load_train_config(f) == cfg


@pytest.mark.parametrize("text, needle", [
    ("a: 2001-13-01\n", r"(?s)cannot read '2001-13-01' as .*timestamp.*c\.yaml\", line 1, column 4"),
    ("lr: !!float abc\n", r"(?s)cannot read 'abc' as .*float.*line 1"),
    ("steps: !!int x\n", "cannot read 'x'"),
    ("flips: !!bool maybe\n", "cannot read 'maybe'"),
    ("a: !!timestamp x\n", "cannot read 'x'"),
    ("a: !!int\n", "cannot read ''"),
    ("a: [1, 2\n", "not valid YAML"),
    ("[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
])
def test_malformed_yaml_values_are_config_errors(tmp_path, text, needle):
    from dmdiff.config import read_yaml

    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle) as e:
        read_yaml(f)
    assert str(f) in str(e.value)


def test_unreadable_bytes_and_non_mapping_documents(tmp_path):
    from dmdiff.config import read_yaml

    f = tmp_path / "c.yaml"
    f.write_bytes(b"lr: \xff\xfe\x00\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(f)
    for text in ("0\n", "[]\n", "''\n", "hello\n"):
        f.write_text(text)
        with pytest.raises(ConfigError, match="expected a mapping"):
            read_yaml(f)
    f.write_text("# only a comment\n")
    assert read_yaml(f) == {}
    f.write_bytes("steps: 3\n".encode("utf-16"))  # with a BOM
    assert read_yaml(f) == {"steps": 3}


def test_recursive_yaml_aliases_are_config_errors(tmp_path):
    from dmdiff.train.config import load_train_config

    f = tmp_path / "c.yaml"
    for text, key in [("extra_data: &a [*a]\n", "extra_data"),
                      ("recipe: &r {stage1: {recipe: *r}}\n", "recipe"),
                      ("recipe: {simulate: &s {spec: {bands_m: [*s]}}}\n", "recipe.simulate")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{key}.*contains itself"):
            load_train_config(f)
    f.write_text("a: &a [1.5, 2]\nrecipe: {stage1: {exposure_range: *a}, stage2: {exposure_range: *a}}\n")
    with pytest.raises(ConfigError, match="unknown config key 'a'"):  # shared (not recursive) is fine
        load_train_config(f)


# ---- ranges: the dataclasses' own checks and the gaps closed here --------------------------------

@pytest.mark.parametrize("overrides, needle", [
    ({"model": {"svda_dim": 6}}, "^model.svda_dim must be a positive multiple of 4"),
    ({"model": {"preset": "nope"}}, "^model.preset: unknown backbone preset"),
    ({"model": {"unet_rank": 0}}, "^model.unet_rank must be a positive integer"),
    ({"model": {"timestep": 5000}}, "^model.timestep must be an integer in"),
    ({"recipe": {"stage1": {"model": {"grid_size": 0}}}}, "^recipe.stage1: model.grid_size must be in \\[1, 64\\]"),
    ({"crop_px": None}, "^crop_px: expected an integer, got NoneType"),
    ({"crop_px": 0}, "^crop_px must be >= 1"),
    ({"seed": 2**32}, r"^seed must be in \[0, 2\*\*32 - 1\]"),
    ({"seed": -1}, "^seed must be in"),
    ({"model": {"seed": 2**40}}, "^model.seed must be in"),
    ({"recipe": {"pseudo": {"seed": 2**40}}}, "^recipe.pseudo.seed must be in"),
    ({"recipe": {"simulate_seed": -1}}, "^recipe.simulate_seed must be in"),
    ({"threads": 0}, r"^threads must be in \[1, 1024\]"),
    ({"threads": 2**31}, "^threads must be in"),
    ({"num_workers": 10**6}, "^num_workers must be <= 1024"),
    ({"exposure_range": [1e-300, 1e300]}, "^exposure_range must be"),
    ({"exposure_range": [2.0, 1.0]}, "^exposure_range must be"),
    ({"path_probs": {"positive": 1e308, "neutral": 1e308}}, "^path_probs must be non-negative"),
    ({"path_probs": {"positive": 0, "neutral": 0, "negative": 0}}, "^path_probs must be"),
    ({"loss": {"mse": 1e308, "lpips": 1e308}}, "^loss weights must be"),
    ({"recipe": {"simulate": {"spec": {"grid_size": 0}}}}, r"^recipe.simulate: spec.grid_size must be in \[1, 64\]"),
    ({"recipe": {"simulate": {"colour": 1}}}, "^recipe.simulate: unknown config key 'colour'"),
    ({"recipe": {"simulate": {"raw_bits": 0}}}, "^recipe.simulate: raw_bits must be in"),
    ({"crop_px": 6}, r"^crop_px = 6 px is smaller than the SVDA grid \(model.grid_size = 7\)"),
    ({"val_crop_px": 8, "model": {"grid_size": 9}}, "^val_crop_px = 8 px is smaller than the SVDA grid"),
    ({"recipe": {"stage2": {"crop_px": 4}}}, "^recipe.stage2: crop_px = 4 px is smaller than the SVDA grid"),
    ({"recipe": {"pseudo": {"size_px": 8}, "stage1": {"model": {"grid_size": 9}, "crop_px": 16}}},
     "^recipe.pseudo.size_px = 8 px is smaller than the SVDA grid"),
])
def test_train_values_that_cannot_work_name_the_key(overrides, needle):
    from dmdiff.train.config import load_train_config

    with pytest.raises(ConfigError, match=needle):
        load_train_config(overrides)


def test_train_config_edges_that_do_work():
    from dmdiff.train.config import load_train_config

    cfg = load_train_config({"seed": 2**32 - 1, "threads": 1024, "exposure_range": [1e-3, 1e3],
                             "path_probs": {"positive": 1, "neutral": 0, "negative": 0},
                             "recipe": {"simulate": {}, "simulate_seed": 0}})
    assert cfg.seed == 2**32 - 1 and cfg.recipe.simulate == {}
    # without SVDA there is no grid to fill
    assert load_train_config({"crop_px": 4, "val_crop_px": 2, "model": {"svda": False}}).crop_px == 4


def test_cli_reports_a_bad_value_by_key_without_traceback(tmp_path, capsys):
    from dmdiff.cli import main

    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-3\nloss: {mse: .nan}\n")
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "loss.mse: nan is not allowed" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, needle", [
    ({"spec": {"grid_size": 0}}, r"^spec.grid_size must be in \[1, "),
    ({"spec": {"image_size_px": 10**18}}, r"^spec.image_size_px must be in \[8, 8192\] px, got 10{18}$"),
    ({"spec": {"psf_size_px": 16}}, "^spec.psf_size_px must be odd"),
    ({"spec": {"bands_m": [[1, 2]]}}, "^spec.bands_m must be three"),
    ({"spec": {"bands_m": [{"lo": 6e-7, "hi": 7e-7}, [5e-7, 5.8e-7], [4.2e-7, 4.9e-7]]}},
     r"^spec.bands_m\[R\] must be a \(lo, hi\) pair"),
    ({"spec": {"bands_m": [[6e-7, 7e-7], {5e-7, 5.8e-7}, [4.2e-7, 4.9e-7]]}},
     r"^spec.bands_m\[G\] must be a \(lo, hi\) pair"),
    ({"spec": {"nope": 1}}, "^unknown config key 'spec.nope'"),
    ({"crops_per_train_photo": 0, "crops_per_test_photo": 0, "dead_leaves_train": 0}, "would hold no images"),
])
def test_simulation_values_that_cannot_work_name_the_key(overrides, needle):
    from dmdiff.data.simulate import resolve_config

    for smoke in (False, True):
        with pytest.raises(ConfigError, match=needle):
            resolve_config(overrides, smoke=smoke)


def test_spec_from_json_with_a_huge_integer_is_a_spec_error():
    # lens.json (json allows any integer) does not go through the config merge
    from dmdiff.optics.spec import MetalensSpec, SpecError

    with pytest.raises(SpecError, match=r"^image_size_px must be in \[8, 8192\] px, got 1(0{400})$"):
        MetalensSpec.from_dict({"image_size_px": 10**400})


def test_check_device_support(monkeypatch):
    import torch

    from dmdiff.train.config import check_device_support, load_train_config

    fp16 = load_train_config({"mixed_precision": "fp16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^mixed_precision: fp16 needs a CUDA GPU.*use bf16 or no on a CPU"):
        check_device_support(fp16)
    for ok in ("bf16", "no"):
        check_device_support(load_train_config({"mixed_precision": ok}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device_support(fp16)


# ---- per-path losses and the adversarial term ----------------------------------------------------

@pytest.mark.parametrize("overrides, needle", [
    ({"adversarial": {"weight": -0.1}}, r"^adversarial.weight must be >= 0"),
    ({"adversarial": {"start_step": -1}}, r"^adversarial.start_step must be >= 0"),
    ({"adversarial": {"lr": 0.0}}, r"^adversarial.lr must be a positive number"),
    ({"adversarial": {"r1_weight": -1.0}}, r"^adversarial.r1_weight must be >= 0"),
    ({"adversarial": {"channels": 0}}, r"^adversarial.channels must be in \[1, 1024\]"),
    ({"adversarial": {"paths": []}}, r"^adversarial.paths must name at least one path"),
    ({"adversarial": {"paths": ["positive", "positive"]}}, r"^adversarial.paths lists a path twice"),
    ({"adversarial": {"paths": ["neutral"]}}, r"^adversarial.paths may not include 'neutral'"),
    ({"adversarial": {"paths": ["sharp"]}}, r"^adversarial.paths\[0\]: 'sharp' is not one of"),
    ({"adversarial": {"wieght": 0.1}}, r"^unknown config key 'adversarial.wieght'"),
    ({"adversarial": {"weight": NAN}}, r"^adversarial.weight: nan is not allowed"),
    ({"adversarial": 0.1}, r"^adversarial: .* matches none of"),
    ({"recipe": {"stage2": {"adversarial": {"lr": -1.0}}}}, r"^recipe.stage2: adversarial.lr must be a positive"),
    ({"loss_by_path": {"neutrl": {"lpips": 0}}}, r"^loss_by_path: unknown path 'neutrl'; the paths are positive"),
    ({"loss_by_path": {"": None, 0: None}}, r"^loss_by_path: unknown path ''; the paths are positive"),
    ({"loss_by_path": {"neutral": 3}}, r"^loss_by_path.neutral: expected a mapping of loss weights, got int"),
    ({"loss_by_path": {"neutral": {"lpips_net": "alex"}}}, r"^loss_by_path.neutral.lpips_net: only the weights"),
    ({"loss_by_path": {"neutral": {"mse": "a lot"}}}, r"^loss_by_path.neutral.mse: expected a number"),
    ({"loss_by_path": {"neutral": {"mse": 0, "lpips": 0}}}, r"^loss_by_path.neutral weights must be >= 0 and not all"),
    ({"loss_by_path": {"negative": {"substitute_weight": -1}}},
     r"^loss_by_path.negative.substitute_weight must be >= 0 or null"),
    ({"loss_by_path": {"neutral": {"mse": INF}}}, r"^loss_by_path.neutral.mse: inf is not allowed"),
    ({"loss_by_path": []}, r"^loss_by_path: expected a mapping"),
])
def test_adversarial_and_per_path_loss_values_name_the_key(overrides, needle):
    from dmdiff.train.config import load_train_config

    with pytest.raises(ConfigError, match=needle):
        load_train_config(overrides)


def test_adversarial_section_defaults_paths_and_round_trip(tmp_path):
    from dmdiff.config import dump_yaml
    from dmdiff.train.config import AdversarialConfig, load_train_config, stage_config

    plain = load_train_config({})
    assert plain.adversarial is None and plain.loss_by_path == {} and plain.adversarial_paths() == ()
    assert plain.path_losses() == {p: plain.loss for p in ("positive", "neutral", "negative")}
    on = load_train_config({"adversarial": {}, "loss_by_path": {"neutral": {"lpips": 0}}})
    assert on.adversarial == AdversarialConfig() and on.adversarial_paths() == ("positive",)
    assert on.path_losses()["neutral"].lpips == 0 and on.path_losses()["positive"] == on.loss
    assert load_train_config({"adversarial": {"weight": 0}}).adversarial_paths() == ()
    both = load_train_config({"adversarial": {"paths": ["negative", "positive"]},
                              "path_probs": {"positive": 1, "neutral": 1, "negative": 0}})
    assert both.adversarial_paths() == ("positive",)            # only trained paths get a critic
    assert stage_config(on, "stage1").adversarial_paths() == ()  # stage 1 trains the negative path only
    staged = load_train_config({"recipe": {"stage2": {"adversarial": {"weight": 0.01}}}})
    assert staged.adversarial is None and stage_config(staged, "stage2").adversarial.weight == 0.01
    for cfg in (plain, on, staged):
        f = tmp_path / "config.yaml"
        f.write_text(dump_yaml(to_dict(cfg)))
        assert load_train_config(f) == cfg
