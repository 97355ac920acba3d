"""Ablations of the recipe's stage 2: their configs, an end-to-end smoke run, clear errors."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_anchor import lens_like_grid  # noqa: E402
from test_dmdiff import _images, _maps, make_model  # noqa: E402
from test_train import SPEC, write_pairs  # noqa: E402

from dmdiff.cli import main as cli_main  # noqa: E402
from dmdiff.config import to_dict  # noqa: E402
from dmdiff.errors import ConfigError, DmdiffError  # noqa: E402
from dmdiff.model.pipeline import DMDiffPipeline  # noqa: E402
from dmdiff.runs import read_metrics  # noqa: E402
from dmdiff.train.ablations import (  # noqa: E402
    ABLATIONS,
    ablation_config,
    ablation_names,
    default_workers,
    run_ablations,
)
from dmdiff.train.config import load_train_config  # noqa: E402
from dmdiff.train.recipe import recipe_config_path, stage2_config  # noqa: E402

NO_SVDA = {"model.svda": False}
ONLY_POSITIVE = {"path_probs.positive": 1.0, "path_probs.neutral": 0.0, "path_probs.negative": 0.0}
NO_DECONVOLUTION = {"model.anchor_wiener_nsr": None, "model.input_rl_iterations": None}   # the tiny model's


def flat(d: dict, prefix: str = "") -> dict:
    """Every leaf of a config mapping under its dotted key (the test's own, independent of rundir)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "recipe":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(a, b) -> dict:
    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return {k: fb[k] for k in fa if fa[k] != fb[k]}


@pytest.mark.parametrize("main, expected", [
    ({}, {"single_path": {**NO_SVDA, **ONLY_POSITIVE}, "no_svda": NO_SVDA, "no_lens": {**NO_SVDA, **NO_DECONVOLUTION},
          "no_pseudo": {"extra_data": []}, "spatial_svda": {"model.svda_spatial": True}}),
    ({"model": {"svda_spatial": True}, "extra_data": ["more"]},
     {"single_path": {**NO_SVDA, "model.svda_spatial": False, **ONLY_POSITIVE},
      "no_svda": {**NO_SVDA, "model.svda_spatial": False},
      "no_lens": {**NO_SVDA, "model.svda_spatial": False, **NO_DECONVOLUTION}, "no_pseudo": {"extra_data": ["more"]},
      "global_svda": {"model.svda_spatial": False}}),
    # stage 2 starts from stage 1's SVDA weights: the models without SVDA cannot load them
    ({"recipe": {"stage2_init": "stage1", "stage2": {"lr": 3e-4}}},
     {"single_path": {**NO_SVDA, **ONLY_POSITIVE, "init_weights": None},
      "no_svda": {**NO_SVDA, "init_weights": None}, "no_lens": {**NO_SVDA, **NO_DECONVOLUTION, "init_weights": None},
      "no_pseudo": {"extra_data": []}, "spatial_svda": {"model.svda_spatial": True}}),
    # the central PSF's Richardson–Lucy anchor is lens knowledge too; without SVDA only no_lens removes it
    ({"model": {"svda": False, "anchor_wiener_nsr": None, "input_rl_iterations": None, "anchor_rl_iterations": 10}},
     {"single_path": ONLY_POSITIVE, "no_lens": {"model.anchor_rl_iterations": None}, "no_pseudo": {"extra_data": []}}),
])
def test_each_ablation_changes_exactly_its_keys(main, expected, tmp_path):
    cfg = load_train_config(recipe_config_path("tiny"), **main)
    assert ablation_names(cfg) == tuple(expected)
    stage2 = stage2_config(cfg, tmp_path)
    assert str(tmp_path / "pseudo") in stage2.extra_data
    for name, keys in expected.items():
        ablation = ablation_config(cfg, name, tmp_path)
        assert changed(stage2, ablation) == keys, name
        # the budget is stage 2's: steps, lr, batch, crops, seed
        assert (ablation.steps, ablation.lr, ablation.batch_size, ablation.crop_px, ablation.seed) == \
               (stage2.steps, stage2.lr, stage2.batch_size, stage2.crop_px, stage2.seed)


def test_unknown_and_inapplicable_ablations_are_refused(tmp_path, capsys):
    cfg = load_train_config(recipe_config_path("tiny"))
    with pytest.raises(ConfigError, match="unknown ablation 'no_lora'; choose from single_path, no_svda"):
        ablation_config(cfg, "no_lora", tmp_path)
    with pytest.raises(ConfigError, match="^ablation global_svda: stage 2 already trains with"):
        ablation_config(cfg, "global_svda", tmp_path)        # the main model is global already
    plain = load_train_config(recipe_config_path("tiny"), model={"svda": False, "anchor_wiener_nsr": None,
                                                                 "input_rl_iterations": None})
    assert ablation_names(plain) == ("single_path", "no_pseudo")
    with pytest.raises(ConfigError, match="^ablation no_lens: stage 2 already trains with"):
        ablation_config(plain, "no_lens", tmp_path)          # a model never told the lens already
    with pytest.raises(ConfigError, match="^ablation no_svda: "):
        ablation_config(plain, "no_svda", tmp_path)
    with pytest.raises(ConfigError, match="^ablation spatial_svda: model.svda_spatial=True needs svda=True"):
        ablation_config(plain, "spatial_svda", tmp_path)
    with pytest.raises(ConfigError, match="unknown ablation"):      # before anything is trained
        run_ablations(cfg, tmp_path / "r", ["no_svda", "bogus"], progress=False)
    assert not (tmp_path / "r").exists()
    out = str(tmp_path / "r2")
    assert cli_main(["train", "--recipe", "tiny", "--out", out, "--ablations", "bogus"]) == 2
    assert "unknown ablation 'bogus'" in capsys.readouterr().err
    assert cli_main(["train", "--config", "x.yaml", "--out", out, "--ablations"]) == 2
    assert "--ablations needs --recipe" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_default_workers_share_the_cores():
    cfg = load_train_config(recipe_config_path("tiny"))          # threads: 1
    cores = len(os.sched_getaffinity(0))
    expected = 1 if torch.cuda.is_available() else min(4, cores)
    assert default_workers(cfg, 4) == expected and default_workers(cfg, 1) == 1
    assert default_workers(load_train_config(recipe_config_path("tiny"), threads=None), 4) == 1


@pytest.mark.slow
def test_ablations_train_end_to_end_and_are_skipped_when_done(tmp_path_factory, psf_cache):
    data = tmp_path_factory.mktemp("abl-data") / "data"
    write_pairs(data, "train", [f"img_{i:02d}" for i in range(4)], seed=0)
    write_pairs(data, "test", ["val_00"], seed=1)
    (data / "lens.json").write_text(json.dumps({"spec": SPEC.to_dict(), "camera": {"image_size_px": 48}}))
    recipe = dict(data=str(data), crop_px=32, batch_size=2, steps=2, lr=1e-3, checkpoint_every=2, validate_every=2,
                  val_images=1, val_crop_px=32, log_every=1, seed=3, threads=1,
                  recipe={"stage1": {"steps": 2}, "pseudo": {"count": 2, "batch_size": 2}})
    config = tmp_path_factory.mktemp("abl-cfg") / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path_factory.mktemp("abl-run") / "run"
    names = ["single_path", "spatial_svda"]
    assert cli_main(["train", "--recipe", str(config), "--out", str(out), "--ablations", *names, "--workers", "1",
                     "--no-progress"]) == 0
    assert (out / "stage2" / "pipeline").is_dir() and (out / "recipe.json").is_file()   # the recipe ran first

    cfg = load_train_config(config)
    for name, svda, spatial in (("single_path", False, False), ("spatial_svda", True, True)):
        run = out / "ablations" / name
        model = DMDiffPipeline.from_pretrained(run / "pipeline").model
        assert (model.config.svda, model.config.svda_spatial) == (svda, spatial)
        assert (model.svda is not None) == svda
        assert to_dict(load_train_config(run / "config.yaml")) == to_dict(ablation_config(cfg, name, out))
    paths = [r["paths"] for r in read_metrics(out / "ablations" / "single_path") if r["kind"] == "train"]
    assert sum(p["positive"] for p in paths) == 2 * 2 and not any(p["neutral"] or p["negative"] for p in paths)
    record = json.loads((out / "ablations" / "ablations.json").read_text())
    assert list(record["ablations"]) == names
    entry = record["ablations"]["single_path"]
    assert entry["label"] == ABLATIONS["single_path"].label and entry["report"]["completed"]
    assert entry["changes"]["model.svda"] == {"stage2": True, "ablation": False}
    assert record["ablations"]["spatial_svda"]["changes"] == {"model.svda_spatial": {"stage2": False, "ablation": True}}

    # finished: nothing is retrained, and the record keeps both entries after a run of one name
    reports = [out / "ablations" / n / "train_report.json" for n in names] + [out / "stage2" / "train_report.json"]
    stamps = [p.stat().st_mtime_ns for p in reports]
    assert run_ablations(cfg, out, ["spatial_svda"], progress=False)["ablations"].keys() == set(names)
    assert [p.stat().st_mtime_ns for p in reports] == stamps

    # trained two at a time in spawned processes: the same weights as one after the other (with
    # `threads` set: torch's own choice of thread count may change the last bits of float sums)
    parallel = out.parent / "parallel"
    parallel.mkdir()
    for part in ("stage1", "pseudo", "stage2"):
        shutil.copytree(out / part, parallel / part)
    run_ablations(cfg, parallel, names, progress=False, workers=2)
    for name in names:
        ours, theirs = (load_file(str(r / "ablations" / name / "pipeline" / "dmdiff_trainable.safetensors"))
                        for r in (parallel, out))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ConfigError, match="workers=1"):
        run_ablations(cfg, parallel, names, progress=False, workers=2, on_log=lambda step, record: None)

    # a config with other weight-changing settings is refused before anything is trained
    with pytest.raises(DmdiffError, match=r"stage 2 was trained with other settings than this config \(lr\)"):
        run_ablations(load_train_config(config, lr=2e-3), out, ["no_svda"], progress=False)
    assert not (out / "ablations" / "no_svda").exists()


def test_the_no_lens_model_restores_the_same_whatever_lens_it_is_told(tmp_path):
    """``no_lens`` of the tiny recipe: its model neither reads maps nor deconvolves, so another lens's
    PSF grid and maps (or none) leave the output bit for bit the same; the stage-2 model does not."""
    cfg = load_train_config(recipe_config_path("tiny"))
    x, maps = _images(hw=(48, 40)), _maps()
    other_grid, other_maps = lens_like_grid()[[2, 0, 1]], maps * 0.5      # each colour blurred as another
    for name, told in (("no_lens", False), (None, True)):
        config = ablation_config(cfg, name, tmp_path).model if name else stage2_config(cfg, tmp_path).model
        model = make_model(**{k: getattr(config, k) for k in ("svda", "anchor_sigma_px", "anchor_wiener_nsr",
                                                              "input_wiener_nsr", "input_rl_iterations")})
        if config.anchor_deconvolves:
            model.set_anchor_psf(lens_like_grid())
        with torch.no_grad():
            own = model.restore(x, maps)
            model.use_capture_lens(other_grid)
            other = model.restore(x, other_maps)
            none = model.restore(x, None)
        assert told != (torch.equal(own, other) and torch.equal(own, none)), name or "stage 2"
