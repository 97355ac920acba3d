"""``dmdiff train --recipe NAME``: the two-stage pseudo-data recipe in one command (DESIGN §2).

::

    RUN/
      stage1/     dmdiff train with the recipe's stage-1 overrides (negative path only: GT → capture)
      pseudo/     dmdiff pseudo with the stage-1 model (recipe.pseudo settings)
      stage2/     dmdiff train on data + extra_data + pseudo/ (stage-2 overrides; 0.7/0.2/0.1 paths)
      recipe.json the stage reports and provenance, written when all is done

Each part is skipped when it is complete and resumed from its newest checkpoint when it was
interrupted, so rerunning the same command after a kill continues where it stopped. When
``recipe.simulate`` is set and ``data`` does not exist, the dataset is simulated there first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dmdiff.errors import ConfigError
from dmdiff.train.config import TrainConfig, stage_config
from dmdiff.train.pseudo import RECORD, make_pseudo_pairs
from dmdiff.train.rundir import REPORT, is_complete

#: Folder of the shipped configs (``configs/`` at the repository root).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def recipe_config_path(name: str) -> Path:
    """``configs/<name>.yaml`` for a shipped recipe name, or ``name`` itself when it is a file.

    Raises:
        ConfigError: neither exists (the message lists the shipped names).
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIGS / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []
    raise ConfigError(f"--recipe {name}: no such config file and no shipped recipe of that name "
                      f"(shipped: {', '.join(names) or 'none'} in {CONFIGS})")


def run_recipe(cfg: TrainConfig, out: str | Path, progress: bool = True,
               on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or finish) the recipe of ``cfg`` in ``out``; returns the ``recipe.json`` record.

    ``on_log(step, record)``: as :func:`~dmdiff.train.loop.train`'s, for both training stages, each
    record with a ``"stage"`` key (``"stage1"`` / ``"stage2"``) added; stages skipped as finished log
    nothing (their ``metrics.jsonl`` has it all: :func:`~dmdiff.train.rundir.read_metrics`).

    Raises:
        ConfigError / DmdiffError: as :func:`~dmdiff.train.loop.train` and
            :func:`~dmdiff.train.pseudo.make_pseudo_pairs`, before each part starts.
    """
    from dmdiff.config import to_dict
    from dmdiff.runinfo import provenance, write_json
    from dmdiff.train.loop import train

    cfg.validate()
    out = Path(out)
    data = Path(cfg.data)
    if not data.exists() and cfg.recipe.simulate is not None:
        from dmdiff.data.simulate import simulate_dataset

        simulate_dataset(data, seed=cfg.recipe.simulate_seed, config=cfg.recipe.simulate, progress=progress)

    def tagged(stage: str):
        return None if on_log is None else lambda step, record: on_log(step, {**record, "stage": stage})

    stage1 = stage_config(cfg, "stage1")
    if not is_complete(out / "stage1", stage1.steps):
        train(stage1, out / "stage1", "latest", progress=progress, command="dmdiff train --recipe (stage 1)",
              on_log=tagged("stage1"))
    pseudo = out / "pseudo"
    if not (pseudo / RECORD).is_file():
        make_pseudo_pairs(out / "stage1", pseudo, dataset=data, settings=cfg.recipe.pseudo, overwrite=True,
                          progress=progress)
    stage2 = stage_config(cfg, "stage2")
    stage2 = replace(stage2, extra_data=(*stage2.extra_data, str(pseudo)),
                     init_weights=str(out / "stage1") if cfg.recipe.stage2_init == "stage1" else stage2.init_weights)
    if not is_complete(out / "stage2", stage2.steps):
        train(stage2, out / "stage2", "latest", progress=progress, command="dmdiff train --recipe (stage 2)",
              on_log=tagged("stage2"))
    record = {
        "stages": {s: json.loads((out / s / REPORT).read_text()) for s in ("stage1", "stage2")},
        "pseudo": {k: v for k, v in json.loads((pseudo / RECORD).read_text()).items() if k != "names"},
        "provenance": provenance(config=to_dict(cfg), seed=cfg.seed, command="dmdiff train --recipe"),
    }
    write_json(out / "recipe.json", record)
    return record
