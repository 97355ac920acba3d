"""The smoke-sized recipe the notebooks use (dmdiff.train.recipe.smoke_recipe_config, ensure_recipe_model).

Running it end to end is covered by the notebook tests (03, 04); here: what the config holds, and
that a missing model is an error outside smoke mode while an existing one is used as it is.
"""

import pytest

from dmdiff.config import smoke_preset
from dmdiff.data.simulate import resolve_config
from dmdiff.errors import DmdiffError
from dmdiff.train.config import load_train_config
from dmdiff.train.recipe import (
    ensure_recipe_model,
    recipe_config_path,
    smoke_recipe_config,
)


def test_smoke_config_cuts_the_recipe_down_and_keeps_the_rest(tmp_path):
    cfg = load_train_config(recipe_config_path("tiny"), data=str(tmp_path / "data"), seed=3,
                            model={"preset": "tiny", "svda_spatial": True},
                            recipe={"stage1": {"steps": 200, "lr": 1e-3}, "simulate": {"raw_bits": 12}})
    smoke = smoke_recipe_config(cfg)
    for key, value in smoke_preset("recipe").items():
        if key != "recipe":
            assert getattr(smoke, key) == value
    assert smoke.steps < cfg.steps and smoke.recipe.stage1 == {"steps": 8, "lr": 1e-3}
    assert (smoke.recipe.pseudo.count, smoke.recipe.pseudo.batch_size) == (2, 2)
    assert (smoke.data, smoke.seed, smoke.model, smoke.loss) == (cfg.data, cfg.seed, cfg.model, cfg.loss)
    simulated = resolve_config(smoke.recipe.simulate)
    assert simulated == resolve_config({"raw_bits": 12}, smoke=True) and simulated.spec.image_size_px == 64
    no_simulation = smoke_recipe_config(load_train_config(recipe_config_path("tiny"), recipe={"simulate": None}))
    assert no_simulation.recipe.simulate is None


def test_ensure_recipe_model_uses_a_finished_run_and_refuses_to_train_outside_smoke(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DmdiffError, match=r"notebook 03.*dmdiff train --recipe tiny --out"):
        ensure_recipe_model(run, tmp_path / "data", smoke=False)
    assert not run.exists() and not (tmp_path / "data").exists()

    from dmdiff.model.backbone import load_backbone
    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
    from dmdiff.model.pipeline import DMDiffPipeline

    folder = run / "stage2" / "pipeline"
    DMDiffPipeline.from_model(DMDiff(DMDiffConfig(), load_backbone("tiny", pretrained=False))).save_pretrained(folder)
    assert ensure_recipe_model(run, tmp_path / "data", smoke=True) == folder
    assert not (tmp_path / "data").exists(), "a finished run must not trigger training"


def test_every_smoke_preset_loads_into_its_config():
    """configs/smoke.yaml is the one place of the smoke presets; each section is a valid overlay."""
    from dataclasses import replace

    from dmdiff.train.pretrain import PretrainConfig

    assert resolve_config(smoke=True).spec.image_size_px == smoke_preset("simulate")["spec"]["image_size_px"]
    assert replace(PretrainConfig(), **smoke_preset("pretrain")).vae_steps == smoke_preset("pretrain")["vae_steps"]
    with pytest.raises(DmdiffError, match="no 'nothing' section"):
        smoke_preset("nothing")
    with pytest.raises(DmdiffError, match="no shipped recipe"):
        recipe_config_path("smoke")          # the presets file is not a recipe
