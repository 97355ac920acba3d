"""``dmdiff train --recipe NAME``: the two-stage pseudo-data recipe in one command (docs/method.md).

::

    RUN/
      stage1/     dmdiff train with the recipe's stage-1 overrides (negative path only: GT → capture)
      pseudo/     dmdiff pseudo with the stage-1 model (recipe.pseudo settings)
      stage2/     dmdiff train on data + extra_data + pseudo/ (stage-2 overrides; 0.7/0.2/0.1 paths)
                  then the recommended α, chosen on data's validation split (:mod:`dmdiff.train.alpha`)
                  and stored in stage2/pipeline
      recipe.json the stage reports, the α choice and provenance, written when all is done
      ablations/  variants of stage 2 (``--ablations``; :mod:`dmdiff.train.ablations`)

Each part is skipped when it is complete and resumed from its newest checkpoint when it was
interrupted, so rerunning the same command after a kill continues where it stopped. When
``recipe.simulate`` is set and ``data`` does not exist, the dataset is simulated there first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dmdiff.config import CONFIGS, SMOKE_FILE, merge, smoke_preset, to_dict
from dmdiff.data.simulate import resolve_config, simulate_dataset
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.outputs import claim_folder, write_json
from dmdiff.runinfo import provenance
from dmdiff.runs import (
    PIPELINE,
    PSEUDO,
    RECIPE_KIND,
    RECIPE_RECORD,
    REPORT,
    STAGE1,
    STAGE2,
    STAGES,
    is_complete,
    recipe_folder_parts,
    resolve_model,
)
from dmdiff.data.dataset import has_split
from dmdiff.model.pipeline import CONFIG_FILE
from dmdiff.train.alpha import alpha_sweep, recommend_alpha, set_recommended_alpha
from dmdiff.train.config import TrainConfig, load_train_config, stage_config
from dmdiff.train.loop import train
from dmdiff.train.processes import on_main
from dmdiff.train.pseudo import RECORD, make_pseudo_pairs


def recipe_config_path(name: str) -> Path:
    """``configs/<name>.yaml`` for a shipped recipe name, or ``name`` itself when it is a file.

    Raises:
        ConfigError: neither exists (the message lists the shipped names).
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIGS / f"{name}.yaml"
    if shipped.is_file() and shipped != SMOKE_FILE:
        return shipped
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p != SMOKE_FILE) if CONFIGS.is_dir() else []
    raise ConfigError(f"--recipe {name}: no such config file and no shipped recipe of that name "
                      f"(shipped: {', '.join(names) or 'none'} in {CONFIGS})")


def stage2_config(cfg: TrainConfig, out: str | Path) -> TrainConfig:
    """The config stage 2 of the recipe run ``out`` trains with: :func:`stage_config` ``(cfg, "stage2")``
    plus ``out/pseudo`` in ``extra_data`` and, with ``recipe.stage2_init: stage1``, ``out/stage1``'s
    weights as ``init_weights``.

    Raises:
        ConfigError: as :func:`stage_config`.
    """
    out = Path(out)
    stage2 = stage_config(cfg, "stage2")
    return replace(stage2, extra_data=(*stage2.extra_data, str(out / PSEUDO)),
                   init_weights=str(out / STAGE1) if cfg.recipe.stage2_init == "stage1" else stage2.init_weights)


def run_recipe(cfg: TrainConfig, out: str | Path, progress: bool = True,
               on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or finish) the recipe of ``cfg`` in ``out``; returns the ``recipe.json`` record.

    ``on_log(step, record)``: as :func:`~dmdiff.train.loop.train`'s, for both training stages, each
    record with a ``"stage"`` key (``"stage1"`` / ``"stage2"``) added; stages skipped as finished log
    nothing (their ``metrics.jsonl`` has it all: :func:`~dmdiff.train.rundir.read_metrics`).

    Under ``accelerate launch`` every process runs this: the stages train on all of them, the rest
    (the folder, the dataset, the pseudo pairs, α, ``recipe.json``) is done by the main process
    (:func:`~dmdiff.train.processes.on_main`).

    Raises:
        ConfigError / DmdiffError: as :func:`~dmdiff.train.loop.train` and
            :func:`~dmdiff.train.pseudo.make_pseudo_pairs`, before each part starts.
    """

    cfg.validate()
    out, data = Path(out), Path(cfg.data)
    on_main(lambda: prepare_recipe_run(cfg, out, progress))

    def tagged(stage: str):
        return None if on_log is None else lambda step, record: on_log(step, {**record, "stage": stage})

    stage1 = stage_config(cfg, "stage1")
    if not is_complete(out / STAGE1, stage1.steps):
        train(stage1, out / STAGE1, "latest", progress=progress, command="dmdiff train --recipe (stage 1)",
              on_log=tagged("stage1"))
    pseudo = out / PSEUDO
    if not (pseudo / RECORD).is_file():
        on_main(lambda: make_pseudo_pairs(out / STAGE1, pseudo, dataset=data, settings=cfg.recipe.pseudo,
                                          overwrite=True, progress=progress))
    stage2 = stage2_config(cfg, out)
    if not is_complete(out / STAGE2, stage2.steps):
        train(stage2, out / STAGE2, "latest", progress=progress, command="dmdiff train --recipe (stage 2)",
              on_log=tagged("stage2"))
    on_main(lambda: write_recipe_record(cfg, out, progress))
    return json.loads((out / RECIPE_RECORD).read_text())


def prepare_recipe_run(cfg: TrainConfig, out: Path, progress: bool) -> None:
    """Claim the recipe folder ``out`` and, when ``data`` is missing and ``recipe.simulate`` is set,
    simulate the dataset there (main process)."""
    claim_folder(out, RECIPE_KIND, recipe_folder_parts)
    data = Path(cfg.data)
    if not data.exists() and cfg.recipe.simulate is not None:
        simulate_dataset(data, seed=cfg.recipe.simulate_seed, config=cfg.recipe.simulate, progress=progress)


def write_recipe_record(cfg: TrainConfig, out: Path, progress: bool) -> None:
    """Choose the recommended α of the finished stage 2 and write ``recipe.json`` (main process)."""
    record = {
        "stages": {s: json.loads((out / s / REPORT).read_text()) for s in STAGES},
        "alpha": choose_alpha(out / STAGE2 / PIPELINE, Path(cfg.data), cfg.recipe.alpha_tolerance_db, progress),
        "pseudo": {k: v for k, v in json.loads((out / PSEUDO / RECORD).read_text()).items() if k != "names"},
        "provenance": provenance(config=to_dict(cfg), seed=cfg.seed, command="dmdiff train --recipe"),
    }
    write_json(out / RECIPE_RECORD, record)


def choose_alpha(pipeline_dir: Path, data: Path, tolerance_db: float, progress: bool) -> dict | None:
    """Choose and store the recommended α of the model in ``pipeline_dir`` on ``data``'s validation
    split (once: a pipeline that has one keeps it); returns the choice, or None when ``data`` has no
    validation split (the model then has no recommendation and restores at α = 1)."""
    meta = json.loads((pipeline_dir / CONFIG_FILE).read_text())
    if "alpha_choice" not in meta:
        if not has_split(data, "val"):
            return None
        sweep = alpha_sweep(pipeline_dir, data, "val", progress=progress)
        sweep.update(tolerance_db=tolerance_db, recommended=recommend_alpha(sweep, tolerance_db))
        set_recommended_alpha(pipeline_dir, sweep["recommended"], sweep)
        return sweep
    return meta["alpha_choice"]


def smoke_recipe_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` cut down to a smoke-sized recipe (CI, the notebooks' ``smoke=True``): seconds on a CPU.

    Lays the ``recipe`` smoke preset of configs/smoke.yaml (:func:`dmdiff.config.smoke_preset`:
    48 px crops, batch 2, 8 stage-1 and 16 stage-2 steps, two pseudo pairs) over ``cfg``, its
    ``recipe.stage1`` merged into ``cfg``'s own stage-1 overrides; when ``recipe.simulate`` is set,
    the dataset it simulates (only when ``data`` is missing) becomes the smoke one (the config's own
    simulation keys on top). The result is validated; everything else (data, seed, model, loss) is
    ``cfg``'s.

    Raises:
        ConfigError: the cut-down config is invalid (e.g. ``cfg`` sets keys it contradicts).
    """

    preset = smoke_preset("recipe")
    recipe = dict(preset.pop("recipe", {}))
    recipe["stage1"] = {**cfg.recipe.stage1, **recipe.get("stage1", {})}
    if cfg.recipe.simulate is not None:
        recipe["simulate"] = to_dict(resolve_config(cfg.recipe.simulate, smoke=True))
    return merge(cfg, {**preset, "recipe": recipe}).validate()


def ensure_recipe_model(run: str | Path, data: str | Path, *, smoke: bool, seed: int = 0, preset: str = "tiny",
                        recipe: str = "tiny", progress: bool = False) -> Path:
    """The trained restoration model's pipeline folder behind ``run``, for notebooks after 03.

    ``run`` is what :func:`dmdiff.evaluate.resolve_model` accepts (a recipe run: its
    ``stage2/pipeline/``; a training run; a pipeline folder). When it holds no final model and
    ``smoke`` is True, the smoke-sized recipe (:func:`smoke_recipe_config` of
    :func:`recipe_config_path` ``(recipe)`` with ``data``, ``seed`` and ``preset``) is run into
    ``run`` first — seconds on a CPU; ``data`` is simulated (smoke size) when it is missing.

    Raises:
        DmdiffError: no final model in ``run`` and ``smoke`` is False (the message says to run
            notebook 03 or ``dmdiff train --recipe tiny --out RUN``).
    """

    try:
        return resolve_model(run)[0]
    except DmdiffError as err:
        if not smoke:
            raise DmdiffError(f"no trained model to use: {err}. Train one first: run notebook "
                              f"03_multipath_training.ipynb with run_dir={str(run)!r}, or "
                              f"`dmdiff train --recipe tiny --out {run}`") from None
    cfg = load_train_config(recipe_config_path(recipe), data=str(data), seed=seed, model={"preset": preset})
    run_recipe(smoke_recipe_config(cfg), run, progress=progress)
    return resolve_model(run)[0]
