"""What the study's notebooks share: their folders, the dataset, the recipe config, torch's threads,
the trained model (or a fresh one) and held-out captures to look at.

Each numbered notebook in ``notebooks/`` takes the same parameters (``seed``, ``smoke``,
``out_dir``, ``data_dir``, ``run_dir``, ``preset``, ``recipe_config``; see ``dmdiff repro``) and
starts the same way: :func:`prepare` makes its output folder and, when the simulated dataset is
missing, simulates it exactly as notebook 01 does (:func:`ensure_dataset`); :func:`load_recipe_config`
loads the recipe's training config with the notebook's dataset, seed and backbone, cut to smoke size
in smoke mode, and runs torch on the config's thread count (:func:`use_threads`) so the notebook's
own inference runs like the trainer. :func:`model_or_fresh` loads notebook 03's trained model, or
says how to get one and builds a freshly initialised model instead; :func:`held_out_pairs` gives
test captures with their maps, from the dataset or captured on the spot.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dmdiff.data.dataset import PairedFolderDataset, has_split, image_lens_spec, read_lens
from dmdiff.data.simulate import centre_square, resolve_config, simulate_dataset
from dmdiff.data.sources import TEST_PHOTOS, load_photo
from dmdiff.errors import DmdiffError
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.optics import MetalensCamera
from dmdiff.optics.spec import MetalensSpec
from dmdiff.runs import load_pipeline
from dmdiff.train.config import TrainConfig, load_train_config
from dmdiff.train.recipe import smoke_recipe_config

__all__ = ["StudyPaths", "prepare", "ensure_dataset", "load_recipe_config", "use_threads", "model_or_fresh",
           "held_out_pairs"]


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


def model_or_fresh(run_dir: str | Path, *, grid_size: int, seed: int = 0,
                   spatial: bool = False) -> tuple[DMDiff, str | None]:
    """The trained model behind ``run_dir`` (a recipe run, a training run or a pipeline folder:
    :func:`dmdiff.runs.load_pipeline`) and None; without one, a freshly initialised, untrained
    model (``grid_size`` SVDA cells per side, ``spatial`` SVDA, initialised from ``seed``) and a note
    that says so and how to train one."""
    try:
        return load_pipeline(run_dir).model, None
    except DmdiffError as err:
        note = (f"no trained model: {err}. Showing a freshly initialised, UNTRAINED model instead (its modulation "
                f"is exactly M = I, plain LoRA). To see a trained one, run notebook 03_multipath_training.ipynb "
                f"with run_dir={str(run_dir)!r} (or `dmdiff repro --until 02`, or `dmdiff train --recipe tiny "
                f"--out {run_dir}`) and run this notebook again.")
    return DMDiff(DMDiffConfig(svda_spatial=spatial, grid_size=grid_size, seed=seed)), note


def held_out_pairs(data: str | Path | None, count: int, *, smoke: bool = False,
                   seed: int = 0) -> tuple[list[dict], MetalensSpec]:
    """Up to ``count`` held-out test captures and their lens.

    From the dataset ``data`` when it has a test split: its first pairs and the lens of the first
    (``lens.json``). Otherwise the bundled test photos are captured here with the lens
    ``dmdiff simulate`` would use (``smoke``: the smoke lens), noise drawn from ``seed``.

    Returns:
        ``(pairs, spec)``; each pair a dict of ``name``, ``lr`` and ``gt`` (numpy ``(H, W, 3)``
        float32 sRGB), ``maps`` (``(7, G, G)`` float32) and ``noise`` (the capture's
        ``(shot, read)`` variance factors).
    """
    if data is not None and has_split(data, "test"):
        meta, test_set = read_lens(data), PairedFolderDataset(data, "test")
        pairs = []
        for item in (test_set[i] for i in range(min(count, len(test_set)))):
            noise = tuple(meta["images"][item["name"]]["noise"])
            pairs.append({"name": item["name"], "lr": item["lr"].permute(1, 2, 0).numpy(),
                          "gt": item["gt"].permute(1, 2, 0).numpy(), "maps": item["maps"].numpy(), "noise": noise})
        return pairs, image_lens_spec(meta, pairs[0]["name"])
    spec = resolve_config(smoke=smoke).spec
    camera = MetalensCamera(spec)
    pairs = []
    for index, name in enumerate(TEST_PHOTOS[:count]):
        scene = centre_square(load_photo(name), spec.image_size_px)
        capture = camera.capture(scene, seed=np.random.SeedSequence([seed, index]))
        pairs.append({"name": name, "lr": capture.image, "gt": scene, "maps": capture.maps,
                      "noise": capture.noise})
    return pairs, spec
