"""What the study's notebooks share: their folders, the dataset, the recipe config, torch's threads.

Each numbered notebook in ``notebooks/`` takes the same parameters (``seed``, ``smoke``,
``out_dir``, ``data_dir``, ``run_dir``, ``preset``, ``recipe_config``; see ``dmdiff repro``) and
starts the same way: :func:`prepare` makes its output folder and, when the simulated dataset is
missing, simulates it exactly as notebook 01 does (:func:`ensure_dataset`); :func:`load_recipe_config`
loads the recipe's training config with the notebook's dataset, seed and backbone, cut to smoke size
in smoke mode, and runs torch on the config's thread count (:func:`use_threads`) so the notebook's
own inference runs like the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from dmdiff.data.simulate import simulate_dataset
from dmdiff.train.config import TrainConfig, load_train_config
from dmdiff.train.recipe import smoke_recipe_config

__all__ = ["StudyPaths", "prepare", "ensure_dataset", "load_recipe_config", "use_threads"]


class StudyPaths(NamedTuple):
    """A notebook's folders (a named tuple: ``out, data, run = prepare(...)``).

    out: its figures and ``metrics.json`` (exists). data: the simulated dataset (None when the
    notebook reads none). run: the recipe run of notebook 03 (None when the notebook uses none).
    """

    out: Path
    data: Path | None = None
    run: Path | None = None


def ensure_dataset(data_dir: str | Path, *, seed: int = 0, smoke: bool = False) -> Path:
    """The dataset folder ``data_dir``, simulated first when it holds no ``lens.json``
    (:func:`dmdiff.data.simulate.simulate_dataset` with ``seed``; ``smoke``: the smoke-sized lens
    and photo set, 64 px images). A folder that has one is used as it is."""
    data = Path(data_dir)
    if not (data / "lens.json").is_file():
        simulate_dataset(data, seed=seed, smoke=smoke)
    return data


def prepare(out_dir: str | Path, data_dir: str | Path | None = None, run_dir: str | Path | None = None, *,
            seed: int = 0, smoke: bool = False, simulate: bool = True) -> StudyPaths:
    """A notebook's folders from its parameters: ``out_dir`` created (with its parents),
    ``data_dir`` passed through :func:`ensure_dataset` (``seed``, ``smoke``) when ``simulate``,
    ``run_dir`` as given (nothing is trained here).

    Args:
        simulate: False leaves a missing dataset missing, for a notebook whose dataset comes from
            elsewhere (later in the notebook, notebook 01, or the smoke recipe's own simulation).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = None if data_dir is None else Path(data_dir)
    if data is not None and simulate:
        ensure_dataset(data, seed=seed, smoke=smoke)
    return StudyPaths(out, data, None if run_dir is None else Path(run_dir))


def use_threads(threads: int | None) -> None:
    """Run torch on ``threads`` CPU threads (intra-op); None or 0 keep torch's default."""
    if threads:
        torch.set_num_threads(threads)


def load_recipe_config(path: str | Path, data: str | Path, *, seed: int = 0, preset: str = "tiny",
                  smoke: bool = False) -> TrainConfig:
    """The two-stage recipe's training config as the notebooks train it (``dmdiff train --recipe``).

    ``path`` (a YAML config, e.g. ``configs/tiny.yaml``) with ``data``, ``seed`` and the backbone
    ``preset`` laid over it; with ``smoke`` cut down to seconds on a CPU
    (:func:`dmdiff.train.recipe.smoke_recipe_config`). Also sets torch's CPU threads to the
    config's ``threads`` (:func:`use_threads`), so the notebook's own inference runs as the trainer
    does.

    Raises:
        ConfigError: an unreadable or invalid config.
    """
    cfg = load_train_config(path, data=str(data), seed=seed, model={"preset": preset})
    if smoke:
        cfg = smoke_recipe_config(cfg)
    use_threads(cfg.threads)
    return cfg
