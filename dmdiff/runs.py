"""The folders that dmdiff's runs write, and finding and loading the trained models in them.

This module is the one place that knows the layout; everything else asks it. ::

    RUN/                     a training run (dmdiff train --config)
      config.yaml            the resolved TrainConfig (reloads with load_train_config)
      run.json               provenance (seed, versions, git revision, command) and resume records
      metrics.jsonl          one JSON record per line (dmdiff.train.rundir: MetricsLog); read_metrics
      checkpoint-N/          dmdiff.train.checkpoint (the newest keep_last)
      pipeline/              the final model, a pipeline folder (DMDiffPipeline.save_pretrained)
      train_report.json      written last: steps done, timings, final validation, loss notes
      eval/                  dmdiff evaluate's default report folder

    RECIPE/                  a recipe run (dmdiff train --recipe)
      stage1/  stage2/       training runs: GT → capture, then the restoration model
      pseudo/                pseudo pairs made with stage 1 (dmdiff.train.pseudo)
      ablations/NAME/        training runs of stage-2 variants (dmdiff.train.ablations)
      recipe.json            the stage reports and provenance, written when all is done
      eval/                  dmdiff evaluate's default report folder

A **model path** (what ``--model`` takes) is a pipeline folder, a training run or a recipe run:
:func:`resolve_model` finds the pipeline folder behind it and :func:`load_pipeline` loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dmdiff.device import resolve_device
from dmdiff.errors import DmdiffError
from dmdiff.model.dmdiff import DMDiff
from dmdiff.model.pipeline import CONFIG_FILE, DMDiffPipeline

__all__ = ["CONFIG", "RUN_INFO", "METRICS", "PIPELINE", "REPORT", "STAGE1", "STAGE2", "STAGES", "PSEUDO", "RECIPE_RECORD",
           "ABLATIONS_DIR", "EVAL_DIR", "RUN_KIND", "RECIPE_KIND", "run_folder_parts", "recipe_folder_parts",
           "is_complete", "read_metrics", "resolve_model", "eval_dir", "find_ablations", "Loaded",
           "load_pipeline"]

CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
PIPELINE = "pipeline"
REPORT = "train_report.json"
STAGE1, STAGE2 = "stage1", "stage2"
STAGES = (STAGE1, STAGE2)
PSEUDO = "pseudo"
RECIPE_RECORD = "recipe.json"
ABLATIONS_DIR = "ablations"
EVAL_DIR = "eval"
#: The kinds of output folder (:mod:`dmdiff.outputs`) a training run and a recipe run are.
RUN_KIND, RECIPE_KIND = "training-run", "recipe-run"


def run_folder_parts(folder: Path) -> set[str] | None:
    """Recognises a training run of a dmdiff version before output markers (its ``run.json`` and
    ``config.yaml``): an empty set (nothing to list), else None."""
    return set() if (folder / RUN_INFO).is_file() and (folder / CONFIG).is_file() else None


def recipe_folder_parts(folder: Path) -> set[str] | None:
    """Recognises a recipe run of a dmdiff version before output markers (its ``stage1/`` run or
    its ``recipe.json``): an empty set, else None."""
    return set() if (folder / STAGES[0] / RUN_INFO).is_file() or (folder / RECIPE_RECORD).is_file() else None


def is_complete(run: str | Path, steps: int | None = None) -> bool:
    """Whether the training run ``run`` finished (its ``train_report.json`` says so, for ``steps``
    steps if given)."""
    path = Path(run) / REPORT
    if not path.is_file() or not (Path(run) / PIPELINE).is_dir():
        return False
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and bool(report.get("completed")) and (steps is None or report.get("steps") == steps)


def read_metrics(run: str | Path) -> list[dict]:
    """The records of ``run/metrics.jsonl`` in order (empty when the run has not logged yet). A line
    that is not a JSON object (the half-written last line of a killed run) is left out."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def resolve_model(path: str | Path, stage: str = "stage2") -> tuple[Path, Path | None]:
    """The pipeline folder behind a model path, and the run folder it belongs to (None for a bare one).

    ``path`` may be a pipeline folder (``dmdiff_config.json``), a training run (``RUN/pipeline/``) or
    a recipe run (``RUN/<stage>/pipeline/``; ``stage`` is ``"stage2"`` for the restoration model,
    ``"stage1"`` for the GT → capture model).

    Raises:
        DmdiffError: none of these, or a run without its final model yet.
    """
    path = Path(path)
    if not path.is_dir():
        raise DmdiffError(f"{path}: no such folder (expected a pipeline folder, a training run or a recipe run)")
    if (path / CONFIG_FILE).is_file():
        return path, path.parent if (path.parent / CONFIG).is_file() else None
    if (path / PIPELINE / CONFIG_FILE).is_file():
        return path / PIPELINE, path
    if (path / stage / PIPELINE / CONFIG_FILE).is_file():
        return path / stage / PIPELINE, path
    if (path / CONFIG).is_file() or (path / stage / CONFIG).is_file():
        raise DmdiffError(f"{path}: the run has no final model ({PIPELINE}/) yet; finish it first "
                          "(dmdiff train ... --resume latest)")
    raise DmdiffError(f"{path} is neither a DMDiff pipeline folder ({CONFIG_FILE}), a training run "
                      f"({PIPELINE}/{CONFIG_FILE}) nor a recipe run ({stage}/{PIPELINE}/)")


def eval_dir(pipeline: Path, run: Path | None) -> Path:
    """Where ``dmdiff evaluate`` reports by default: ``RUN/eval`` for a run, ``<PIPELINE>-eval``
    beside a bare pipeline folder."""
    return run / EVAL_DIR if run is not None else pipeline.parent / f"{pipeline.name}-{EVAL_DIR}"


def find_ablations(run: str | Path) -> dict[str, Path]:
    """``{name: pipeline folder}`` of the finished ablations of a recipe run
    (``RUN/ablations/<name>/pipeline/``), by name."""
    folder = Path(run) / ABLATIONS_DIR
    if not folder.is_dir():
        return {}
    return {p.name: p / PIPELINE for p in sorted(folder.iterdir()) if (p / PIPELINE / CONFIG_FILE).is_file()}


@dataclass
class Loaded:
    """A trained model and where it came from.

    pipeline: its :class:`~dmdiff.model.pipeline.DMDiffPipeline` (on the requested device);
    pipeline_dir: its pipeline folder; run_dir: the training or recipe run holding it, or None.
    """

    pipeline: DMDiffPipeline
    pipeline_dir: Path
    run_dir: Path | None

    @property
    def model(self) -> DMDiff:
        """The :class:`~dmdiff.model.dmdiff.DMDiff` model of :attr:`pipeline`."""
        return self.pipeline.model


def load_pipeline(path: str | Path, stage: str = "stage2", device: str | torch.device | None = None,
                  model_path: str | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load the model behind a model path (:func:`resolve_model`).

    Args:
        path: a pipeline folder, a training run or a recipe run.
        stage: the recipe stage (``"stage2"``: restoration, ``"stage1"``: GT → capture).
        device: torch device (:func:`dmdiff.device.resolve_device`; default CUDA when available).
        model_path: ``sd-turbo`` pipelines: where SD-Turbo is (:meth:`DMDiffPipeline.from_pretrained`).
        dtype: the networks' precision.

    Raises:
        DmdiffError: not a model path, a device that is not there, a damaged model folder.
    """
    pipeline_dir, run_dir = resolve_model(path, stage)
    pipeline = DMDiffPipeline.from_pretrained(pipeline_dir, model_path=model_path, device=resolve_device(device),
                                              torch_dtype=dtype)
    return Loaded(pipeline, pipeline_dir, run_dir)
