"""Ablations of the recipe's stage 2 (``dmdiff train --recipe NAME --ablations [NAME ...]``).

Each ablation is stage 2 of the recipe run with one thing changed, trained as an ordinary
``dmdiff train`` run next to the main model, so that ``dmdiff evaluate`` can put it in the same
table::

    RUN/
      stage1/ pseudo/ stage2/   the recipe (run or finished first: dmdiff.train.recipe)
      ablations/
        <name>/                 config.yaml, checkpoints, metrics.jsonl, pipeline/, train_report.json
        ablations.json          per ablation: label, description, the keys it changes (stage-2 value
                                → its value), its train report; provenance

=================  ====================================================================================
name               what changes against stage 2 (all else — steps, lr, batch, crops, seed, data — kept)
=================  ====================================================================================
``single_path``    the single-path one-step baseline: ``path_probs`` positive only, ``model.svda`` false
                   (plain LoRA, no optics maps); same data (real + pseudo pairs) and budget
``no_svda``        ``model.svda`` false (and ``svda_spatial`` false): DMDiff without SVDA. Where the model
                   deconvolves its input or colour anchor with the lens's PSFs it still does: the lens
                   reaches the network that way, only SVDA's maps are gone
``no_lens``        ``no_svda`` and no deconvolution either (``anchor_rl_iterations``, ``anchor_wiener_nsr``,
                   ``input_wiener_nsr``, ``input_rl_iterations`` null): the network sees the capture as
                   it is, its colour anchor is the capture's own low-pass — a model never told the lens
``no_pseudo``      without the stage-1 pseudo pairs (``extra_data`` as the config gives it)
``spatial_svda``   ``model.svda_spatial`` true — the SVDA-mode flip of a main model with global SVDA
``global_svda``    ``model.svda_spatial`` false — the flip of a main model with spatially varying SVDA
=================  ====================================================================================

Two consequences of the strict weight loading: an ablation without SVDA cannot start from stage-2
``init_weights`` of a model with SVDA (``recipe.stage2_init: stage1``, or an explicit file), so it
starts from the untrained adapters (``init_weights`` null, listed among its changes); ``no_pseudo``
keeps stage 2's initialisation (with ``stage2_init: stage1`` that is a stage-1 model trained on
the real pairs only, without pseudo data). An ablation that would change nothing (``no_svda`` of a
main model without SVDA, ``global_svda`` of a global one) is refused with a :class:`ConfigError`
naming it; :func:`ablation_names` gives the ones that apply to a config.

Ablations are independent runs, so several train at once when there are cores for them
(:func:`default_workers`: on a CPU one per ``threads`` cores — two on a 2-core machine at the tiny
config's ``threads: 1`` — and one on a GPU), each in its own process; a run trains exactly as it
would alone (same seed, same batches, and with ``threads`` set the same weights, bit for bit).
A finished ablation is skipped and an interrupted one resumes from its newest checkpoint, as the
recipe's stages are; a run folder whose stage 2 or ablation was trained with other settings than
the config now given is refused (paths — ``data``, ``extra_data``, ``init_weights`` — are not
compared, so a run folder may be moved).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from dmdiff.config import merge, to_dict
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.outputs import write_json
from dmdiff.runinfo import provenance, usable_cores
from dmdiff.runs import ABLATIONS_DIR, CONFIG, REPORT, STAGE2, is_complete
from dmdiff.train.config import TrainConfig, load_train_config, stage_config
from dmdiff.train.loop import train
from dmdiff.train.processes import on_main, process_state
from dmdiff.train.recipe import run_recipe, stage2_config
from dmdiff.train.rundir import config_differences

__all__ = ["Ablation", "ABLATIONS", "RECORD", "ablation_names", "ablation_config",
           "ablation_changes", "default_workers", "run_ablations"]


@dataclass(frozen=True)
class Ablation:
    """One named variant of stage 2: ``label`` (short, for tables) and ``description`` (one sentence)."""

    label: str
    description: str


#: The ablations, in table order.
ABLATIONS = {
    "single_path": Ablation("single-path baseline",
                            "the single-path one-step baseline: positive path only, plain LoRA without SVDA, "
                            "same data (real + pseudo pairs) and budget as stage 2"),
    "no_svda": Ablation("no SVDA", "DMDiff without SVDA (plain LoRA, no optics maps; a deconvolved input or colour "
                                   "anchor stays); otherwise stage 2"),
    "no_lens": Ablation("no lens knowledge",
                        "DMDiff never told the lens: no SVDA and no deconvolution with the lens's PSFs (the capture "
                        "as input, its own low-pass as colour anchor); otherwise stage 2"),
    "no_pseudo": Ablation("no pseudo pairs", "stage 2 without the stage-1 pseudo pairs (real pairs only)"),
    "spatial_svda": Ablation("spatially varying SVDA",
                             "stage 2 with one SVDA modulation per grid cell instead of one per image"),
    "global_svda": Ablation("global SVDA", "stage 2 with one SVDA modulation per image instead of one per grid cell"),
}
#: The record written in a recipe run's ablations folder (:data:`dmdiff.runs.ABLATIONS_DIR`).
RECORD = "ablations.json"
#: Config keys that name files or folders: not compared when checking a run's settings.
PATH_KEYS = ("data", "extra_data", "init_weights")

_NO_SVDA = {"model": {"svda": False, "svda_spatial": False}}
_OVERRIDES = {
    "single_path": {**_NO_SVDA, "path_probs": {"positive": 1.0, "neutral": 0.0, "negative": 0.0}},
    "no_svda": _NO_SVDA,
    "no_lens": {"model": {**_NO_SVDA["model"], "anchor_rl_iterations": None, "anchor_wiener_nsr": None,
                          "input_wiener_nsr": None, "input_rl_iterations": None}},
    "spatial_svda": {"model": {"svda_spatial": True}},
    "global_svda": {"model": {"svda_spatial": False}},
}


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")


def ablation_names(cfg: TrainConfig) -> tuple[str, ...]:
    """The ablations that apply to ``cfg``'s stage 2, in table order: ``single_path``, ``no_pseudo``;
    when the main model has SVDA, ``no_svda`` and the SVDA-mode flip (``spatial_svda`` for global
    SVDA, ``global_svda`` for spatial); when it deconvolves with the lens's PSFs (its input or its
    colour anchor), ``no_lens``."""
    model = stage_config(cfg, "stage2").model
    wanted = {"single_path", "no_pseudo"}
    if model.svda:
        wanted |= {"no_svda", "global_svda" if model.svda_spatial else "spatial_svda"}
    if model.anchor_deconvolves:        # the input's deconvolution needs the anchor's (DMDiffConfig)
        wanted.add("no_lens")
    return tuple(name for name in ABLATIONS if name in wanted)


def ablation_config(cfg: TrainConfig, name: str, out: str | Path) -> TrainConfig:
    """The training config of ablation ``name`` of the recipe run ``out`` (see the module docstring).

    Starts from :func:`~dmdiff.train.recipe.stage2_config` ``(cfg, out)`` — stage 2 with
    ``out/pseudo`` in its data — and applies the ablation's changes.

    Raises:
        ConfigError: unknown name (the message lists the known ones); the changed config is invalid
            or identical to stage 2's (the message starts with ``ablation <name>:``).
    """
    if name not in ABLATIONS:
        raise _unknown(name)
    stage2 = stage2_config(cfg, out)
    try:
        if name == "no_pseudo":
            result = replace(stage2, extra_data=stage_config(cfg, "stage2").extra_data)
        else:
            result = merge(stage2, _OVERRIDES[name])
            if stage2.model.svda and not result.model.svda and stage2.init_weights is not None:
                result = replace(result, init_weights=None)     # SVDA weights do not load without SVDA
        result.validate_fields()
        if not config_differences(stage2, result):
            raise ConfigError(f"stage 2 already trains with what it changes ({_describe(_OVERRIDES.get(name, {}))}), "
                              f"so it would be stage 2 itself; the ablations of this config: "
                              f"{', '.join(ablation_names(cfg))}")
    except ConfigError as err:
        raise ConfigError(f"ablation {name}: {err}") from None
    return result


def _describe(overrides: dict, prefix: str = "") -> str:
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            parts.append(_describe(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}: {json.dumps(value)}")
    return ", ".join(parts)


def _lookup(record: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def ablation_changes(stage2: TrainConfig, ablation: TrainConfig) -> dict[str, dict[str, Any]]:
    """``{dotted key: {"stage2": value, "ablation": value}}`` for every setting that differs."""

    a, b = to_dict(stage2), to_dict(ablation)
    return {key: {"stage2": _lookup(a, key), "ablation": _lookup(b, key)}
            for key in config_differences(stage2, ablation)}


def _check_settings(run: Path, expected: TrainConfig, what: str) -> None:
    """Refuse a run folder trained with other weight-changing settings than ``expected`` (paths aside)."""

    if not (run / CONFIG).is_file():
        return
    diff = [k for k in config_differences(load_train_config(run / CONFIG), expected)
            if k.split(".")[0] not in PATH_KEYS]
    if diff:
        raise DmdiffError(f"{run}: {what} was trained with other settings than this config ({', '.join(diff)}); "
                          "its ablations would not compare like with like. Use the config the run was trained "
                          f"with (its {CONFIG}) or another run folder")


def _resolve_names(cfg: TrainConfig, names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(ablation_names(cfg))
    for name in names:
        if name not in ABLATIONS:
            raise _unknown(name)
    return list(dict.fromkeys(names))


def default_workers(cfg: TrainConfig, pending: int) -> int:
    """How many of ``pending`` ablations :func:`run_ablations` trains at once by default: on a CPU,
    the usable cores divided by ``cfg.threads`` (at most ``pending``); 1 on a GPU (one device) or
    when ``cfg.threads`` is unset (torch then uses every core already)."""

    if pending <= 1 or cfg.threads is None or torch.cuda.is_available():
        return 1
    return max(1, min(pending, usable_cores() // cfg.threads))


def _train_ablation(config: TrainConfig, run: Path, name: str) -> None:
    """One ablation run in a worker process (no progress bar: the parent shows one over the runs)."""

    train(config, run, "latest", progress=False, command=f"dmdiff train --recipe --ablations ({name})")


def run_ablations(cfg: TrainConfig, out: str | Path, names: Sequence[str] | None = None, progress: bool = True,
                  on_log: Callable[[int, dict], None] | None = None, workers: int | None = None) -> dict:
    """Finish the recipe of ``cfg`` in ``out`` (:func:`~dmdiff.train.recipe.run_recipe`), then train
    each ablation into ``out/ablations/<name>``; returns the ``ablations.json`` record.

    Args:
        cfg: the recipe config the run was (or is to be) trained with.
        out: the recipe run folder.
        names: ablations to run (None or empty: :func:`ablation_names` of ``cfg``); each is
            skipped when finished and resumed when interrupted.
        progress: progress bars.
        on_log: as :func:`~dmdiff.train.recipe.run_recipe`'s; ablation records carry
            ``"stage": "ablations/<name>"`` (only with ``workers = 1``: the callback cannot follow
            runs in other processes).
        workers: how many ablations train at once, each in a spawned process (None:
            :func:`default_workers`, or 1 with ``on_log`` or under ``accelerate launch``, where each
            ablation trains on all processes); 1 trains them one after the other here.
            With ``cfg.threads`` set the weights do not depend on it (unset, torch picks each
            process's thread count, which can change the last bits of float sums).

    Raises:
        ConfigError: an unknown or inapplicable ablation, or ``workers`` > 1 with ``on_log`` or
            several processes, before anything is trained.
        DmdiffError: ``out``'s stage 2 or an ablation folder was trained with other settings.
    """

    cfg.validate()
    out = Path(out)
    names = _resolve_names(cfg, names)
    configs = {name: ablation_config(cfg, name, out) for name in names}
    stage2 = stage2_config(cfg, out)
    _check_settings(out / STAGE2, stage2, "the recipe's stage 2")
    for name, config in configs.items():
        _check_settings(out / ABLATIONS_DIR / name, config, f"ablation {name}")

    pending = {name: config for name, config in configs.items()
               if not is_complete(out / ABLATIONS_DIR / name, config.steps)}
    workers = _workers(cfg, workers, len(pending), on_log)
    run_recipe(cfg, out, progress=progress, on_log=on_log)
    if workers == 1:
        for name, config in pending.items():
            tag = f"{ABLATIONS_DIR}/{name}"
            log = None if on_log is None else (lambda step, record, tag=tag: on_log(step, {**record, "stage": tag}))
            train(config, out / ABLATIONS_DIR / name, "latest", progress=progress,
                  command=f"dmdiff train --recipe --ablations ({name})", on_log=log)
    elif pending:
        _train_in_parallel(pending, out, workers, progress)
    on_main(lambda: write_record(cfg, out, configs, stage2))
    return json.loads((out / ABLATIONS_DIR / RECORD).read_text())


def _workers(cfg: TrainConfig, workers: int | None, pending: int, on_log) -> int:
    """The ``workers`` :func:`run_ablations` uses: as given, or :func:`default_workers` (1 with
    ``on_log``, and always 1 under a launcher: each ablation then trains on all processes).

    Raises:
        ConfigError: ``workers`` is not a positive integer, or > 1 with ``on_log`` or with several
            processes.
    """
    processes = process_state().num_processes
    if workers is None:
        workers = 1 if on_log is not None or processes > 1 else default_workers(cfg, pending)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer or None, got {workers!r}")
    if workers > 1 and on_log is not None:
        raise ConfigError("on_log follows ablations trained in this process only: use workers=1 with it")
    if workers > 1 and processes > 1:
        raise ConfigError(f"--workers {workers}: this command runs as {processes} processes (accelerate launch), "
                          "which train each ablation together, one after the other; leave --workers out")
    return workers


def write_record(cfg: TrainConfig, out: Path, configs: dict[str, TrainConfig], stage2: TrainConfig) -> None:
    """Merge the entries of the finished ablations ``configs`` into ``out/ablations/ablations.json``
    (main process)."""
    path = out / ABLATIONS_DIR / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    entries = record.get("ablations", {})
    for name, config in configs.items():
        entries[name] = {"label": ABLATIONS[name].label, "description": ABLATIONS[name].description,
                         "folder": f"{ABLATIONS_DIR}/{name}", "changes": ablation_changes(stage2, config),
                         "report": json.loads((out / ABLATIONS_DIR / name / REPORT).read_text())}
    record = {"ablations": {name: entries[name] for name in ABLATIONS if name in entries}, "stage2": "stage2",
              "provenance": provenance(config=to_dict(cfg), seed=cfg.seed, command="dmdiff train --recipe --ablations")}
    write_json(path, record)


def _train_in_parallel(pending: dict[str, TrainConfig], out: Path, workers: int, progress: bool) -> None:
    """Train ``pending`` ablations ``workers`` at a time in spawned processes; a failed run's error
    is raised after the others have finished (their checkpoints stay, so a rerun resumes)."""

    context = multiprocessing.get_context("spawn")     # no fork of a process that holds torch threads
    failures = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_train_ablation, config, out / ABLATIONS_DIR / name, name): name
                   for name, config in pending.items()}
        with tqdm(total=len(futures), desc=f"ablations ({workers} at a time)", unit="run",
                  disable=not progress) as bar:
            for future in as_completed(futures):
                if future.exception() is not None:
                    failures.append((futures[future], future.exception()))
                bar.set_postfix_str(f"{futures[future]} done")
                bar.update()
    if failures:
        name, error = failures[0]
        raise DmdiffError(f"ablation {name} failed: {error}") from error
