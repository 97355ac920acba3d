"""``dmdiff evaluate``: the held-out quality report of a trained DMDiff model.

On the dataset's **test** split (held out from training; full frames, no crops) every image is
restored or reconstructed by each method below and measured against its reference with
:func:`dmdiff.metrics.compute_metrics` (PSNR and SSIM on RGB and on BT.601 Y, the gradient
sharpness ratio, LPIPS only with its real weights):

=====================  ==========================================================  =========
method key             what                                                        reference
=====================  ==========================================================  =========
``input``              the simulated/real capture itself (``lr``)                   gt
``wiener``             Wiener deconvolution with the lens's true central PSF        gt
``richardson_lucy``    Richardson–Lucy with the same PSF                            gt
``dmdiff_a0``          DMDiff at α = 0 (the neutral, fidelity path)                 gt
``dmdiff_a1``          DMDiff at α = 1 (the positive path)                          gt
``dmdiff_a1_cc``       ``dmdiff_a1`` after ``dmdiff restore``'s default colour      gt
                       correction against the capture
                       (:func:`dmdiff.restore.color_correct`), as ``dmdiff
                       restore`` applies it by default; absent for a model
                       with a colour anchor (``auto`` adds no correction)
``dmdiff_a1_x8``       ``dmdiff_a1`` averaged over the 8 rotations/mirrorings of    gt
                       capture and maps (:mod:`dmdiff.model.ensemble`, as
                       ``dmdiff restore --self-ensemble``)
``ablation_<name>``    an ablation model at α = 1 (its positive path), as           gt
                       ``dmdiff_a1``: ``RUN/ablations/<name>/pipeline`` of a
                       recipe run (:mod:`dmdiff.train.ablations`) or ``--ablation
                       NAME=PATH``; in table order after ``dmdiff_a1_x8``
``vae_ceiling``        the frozen base VAE's encode → decode of the GT (no UNet)    gt
``stage1_degrade``     a stage-1 model's ``degrade(gt)`` (GT → capture)             lr
=====================  ==========================================================  =========

Protocol and choices (also written to ``metrics.json`` under ``settings``):

* **8-bit outputs.** Every output is clipped to ``[0, 1]`` and rounded to 8 bits *before* it is
  measured, and exactly those pixels are saved as PNGs under ``images/<method>/`` (captures and
  GT are 8-bit PNGs already), so every number can be recomputed from the files.
* **Maps.** DMDiff (and the stage-1 model) get the dataset's ``maps/<name>.npy`` when the
  dataset has them, else None.
* **Baselines** deconvolve with the *true* per-channel PSF of the dataset's lens at the centre of
  the field (``lens.json`` → :meth:`MetalensSpec.from_dict` → :func:`psf_grid` →
  :func:`central_psf`). Their parameter (Wiener NSR, RL iterations) is tuned by mean RGB PSNR on
  at most ``tune_pairs`` full-frame **train** pairs, evenly spaced over the sorted names, with
  :func:`dmdiff.baselines.tune_baseline`; when the best value sits at an end of the grid the grid
  is widened once (Wiener: two more half-decades; RL: one more doubling, or 1–3 iterations at the
  low end) and a best still at an end is flagged ``at_grid_edge``. Cost on a 2-core CPU at 256²:
  RL about 60 ms per iteration and image, Wiener about 1 s per value and image, so the default 8
  pairs take a few minutes. Without ``lens.json`` or a train split the baselines are skipped and
  the reason recorded.
* **Ceiling.** The backbone's own reconstruction PSNR: ``decode(encode(gt))`` with the model's
  VAE, its encoder LoRA switched off exactly by the modulation ``M = 0`` (``base(x) + B(0·A(x))
  = base(x)``, see :mod:`dmdiff.model.lora`), the decoder being frozen anyway; i.e. the frozen
  base VAE, with the same padding as the model. This reuses the loaded networks (no second copy
  of an SD-Turbo VAE) and equals ``load_backbone`` of the pipeline's embedded base backbone (the
  tests check it). It bounds what any output decoded by this VAE can reach.
* **Runtimes** (seconds per image, wall clock, after one untimed warm-up call, CUDA synchronised):
  the baselines' deconvolution only; DMDiff's one ``restore`` call, which always runs both paths
  (so α = 0 and α = 1 cost the same and share that number); ``redecode_s`` of ``dmdiff_a0`` is
  the extra cost of moving α on cached latents (VAE decoder only). An ablation's runtime is its
  own ``restore`` call, measured the same way; ``dmdiff_a1_x8``'s is its 8 ``restore`` calls.
* **Ablations** are found automatically only for a recipe run whose ``stage2/`` is the evaluated
  model; each is loaded as its own pipeline (its config, e.g. ``svda: false``, is recorded under
  ``settings.ablations``).

Outputs in ``out`` (default: ``RUN/eval`` for a training or recipe run, ``<PIPELINE>-eval`` next
to a bare pipeline folder): ``metrics.json`` (per image, means and spreads, tuned baseline
parameters with their tuning tables, the quality bar, settings, provenance), ``metrics.csv`` (one
row per image and method), ``table.md`` (the means, also printed), ``grid.png`` (a few test
images, evenly spaced over the names: gt, capture, Wiener, RL, DMDiff α = 0, α = 1), with
ablations ``grid_ablations.png`` (the same images: gt, capture, DMDiff α = 1, each ablation) and
``images/``. The folder is written atomically and replaced only when it holds an earlier
evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dmdiff.device import resolve_device
from dmdiff.errors import DmdiffError
from dmdiff.outputs import atomic_directory, atomic_write_text, check_replaceable, folder_files, write_json

__all__ = ["METHODS", "LABELS", "REFERENCES", "QUALITY_BAR", "BAR_VARIANTS", "ABLATION_PREFIX", "evaluate",
           "quality_bar", "format_table", "resolve_model", "find_ablations", "ablation_method", "vae_reconstruct",
           "tune_baselines", "main"]

#: Restoration methods measured against the GT, in table order.
METHODS = ("input", "wiener", "richardson_lucy", "dmdiff_a0", "dmdiff_a1", "dmdiff_a1_cc", "dmdiff_a1_x8",
           "vae_ceiling")
#: The learned-degradation check (measured against the capture).
DEGRADE = "stage1_degrade"
LABELS = {
    "input": "capture (input)",
    "wiener": "Wiener, true central PSF",
    "richardson_lucy": "Richardson–Lucy, true central PSF",
    "dmdiff_a0": "DMDiff α=0 (fidelity)",
    "dmdiff_a1": "DMDiff α=1 (positive path)",
    "dmdiff_a1_cc": "DMDiff α=1 + restore's colour correction",
    "dmdiff_a1_x8": "DMDiff α=1, ×8 self-ensemble",
    "vae_ceiling": "backbone VAE recon. of GT (ceiling)",
    DEGRADE: "stage-1 degrade(GT)",
}
REFERENCES = {**{m: "gt" for m in METHODS}, DEGRADE: "lr"}
#: The training issue's bar: positive-path PSNR ≥ input + 3 dB and ≥ max(Wiener, RL) + 1 dB.
QUALITY_BAR = {"over_input_db": 3.0, "over_baselines_db": 1.0}
#: Variants of the positive path reported beside the bar (not the bar's figure):
#: method → (metrics.json key of its bar figures, what the report calls it).
BAR_VARIANTS = {"dmdiff_a1_cc": ("quality_bar_color_corrected", "dmdiff restore's colour correction"),
                "dmdiff_a1_x8": ("quality_bar_self_ensemble", "the ×8 self-ensemble (`dmdiff restore --self-ensemble`)")}
METRICS_FILE, CSV_FILE, TABLE_FILE, GRID_FILE = "metrics.json", "metrics.csv", "table.md", "grid.png"
ABLATION_GRID_FILE = "grid_ablations.png"
IMAGES_DIR = "images"
#: The kind of folder an evaluation report is (:mod:`dmdiff.outputs`).
EVALUATION_KIND = "evaluation"


class EvaluationWarning(UserWarning):
    """Part of the evaluation cannot run (e.g. the baselines without the lens's PSF)."""


def evaluation_parts(folder: Path) -> set[str] | None:
    """The files of a report folder written by a dmdiff version before manifests (its
    ``metrics.json`` says it is one): the report files and everything under ``images/``; None
    for any other folder."""
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or "methods" not in metrics:
        return None
    top = {METRICS_FILE, CSV_FILE, TABLE_FILE, GRID_FILE, ABLATION_GRID_FILE}
    return {f for f in folder_files(folder) if f in top or f.startswith(IMAGES_DIR + "/")}
#: Method keys of ablation models: ``ablation_<name>``.
ABLATION_PREFIX = "ablation_"
BASELINES = ("wiener", "richardson_lucy")


# ---------------------------------------------------------------------------------------------
# where things are
# ---------------------------------------------------------------------------------------------


def resolve_model(path: str | Path, stage: str = "stage2") -> tuple[Path, Path | None]:
    """The pipeline folder behind ``path`` and the run folder it belongs to (None for a bare one).

    ``path`` may be a pipeline folder (``dmdiff_config.json``), a training run (``RUN/pipeline/``) or
    a recipe run (``RUN/<stage>/pipeline/``; ``stage`` is ``"stage2"`` for the restoration model,
    ``"stage1"`` for the GT → capture model).

    Raises:
        DmdiffError: none of these, or a run without its final model yet.
    """
    from dmdiff.model.pipeline import CONFIG_FILE
    from dmdiff.train.rundir import CONFIG, PIPELINE

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


def default_out(pipeline: Path, run: Path | None) -> Path:
    """``RUN/eval`` for a run, ``<PIPELINE>-eval`` beside a bare pipeline folder."""
    return run / "eval" if run is not None else pipeline.parent / f"{pipeline.name}-eval"


def find_ablations(run: str | Path) -> dict[str, Path]:
    """``{name: pipeline folder}`` of the finished ablations of a recipe run (``RUN/ablations/<name>/
    pipeline/``), in :data:`dmdiff.train.ablations.ABLATIONS` order, then other names sorted."""
    from dmdiff.model.pipeline import CONFIG_FILE
    from dmdiff.train.ablations import ABLATIONS, ABLATIONS_DIR
    from dmdiff.train.rundir import PIPELINE

    folder = Path(run) / ABLATIONS_DIR
    found = sorted(p.name for p in folder.iterdir()
                   if (p / PIPELINE / CONFIG_FILE).is_file()) if folder.is_dir() else []
    order = [n for n in ABLATIONS if n in found] + [n for n in found if n not in ABLATIONS]
    return {name: folder / name / PIPELINE for name in order}


def ablation_method(name: str) -> str:
    """The method key of ablation ``name`` (``ablation_<name>``); DmdiffError for names that could not
    be a folder (letters, digits, ``_`` and ``-`` only)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise DmdiffError(f"ablation name {name!r}: use letters, digits, '_' and '-' only")
    return f"{ABLATION_PREFIX}{name}"


def _ablation_label(name: str, short: bool = False) -> str:
    """``"ablation: no SVDA (α=1)"`` for the table, ``"no SVDA"`` (``short``) for the grid; the name
    itself for ablations not in :data:`dmdiff.train.ablations.ABLATIONS`."""
    from dmdiff.train.ablations import ABLATIONS

    label = ABLATIONS[name].label if name in ABLATIONS else name
    return label if short else f"ablation: {label} (α=1)"


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def quantize(image: np.ndarray) -> np.ndarray:
    """Clip to ``[0, 1]`` and round to 8 bits: float32 ``k / 255`` (what ``write_png`` stores)."""
    return (np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _np(image: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` tensor → float32 ``(H, W, 3)``."""
    image = image[0] if image.dim() == 4 else image
    return image.detach().float().cpu().permute(1, 2, 0).numpy()


def vae_reconstruct(model, images: torch.Tensor) -> torch.Tensor:
    """The frozen base VAE's ``decode(encode(x))`` (posterior mode), with the model's padding.

    The model's VAE encoder carries DMDiff's LoRA; the modulation ``M = 0`` switches that branch
    off exactly, so this is the base encoder; the decoder has no LoRA. No UNet is involved.

    Args:
        model: a :class:`~dmdiff.model.dmdiff.DMDiff`.
        images: ``(B, 3, H, W)`` sRGB in ``[0, 1]``.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]`` (clamped), on the model's device.
    """
    state, lora = model.vae_lora.state, model.vae_lora
    zeros = torch.zeros(len(images), state.n_blocks, lora.rank, lora.rank, device=model.device, dtype=model.dtype)
    with model._inference():
        x = images.to(model.device, model.dtype)
        padded, pad = model.pad(x)
        scaling = model.vae.config.scaling_factor
        with state.using(zeros):
            z = model.vae.encode(padded * 2 - 1).latent_dist.mode() * scaling
        return model._decode(z, tuple(x.shape[-2:]), pad).clamp(0, 1)


def _widened(method: str, values: Sequence, low: bool) -> list:
    """Grid values beyond the low or high end of ``values`` (empty when there is no room)."""
    if method == "richardson_lucy":     # one more doubling only: RL costs grow with the count
        lo, hi = int(min(values)), int(max(values))
        return [n for n in (1, 2, 3) if n < lo] if low else [2 * hi]
    lo, hi = float(min(values)), float(max(values))
    return [lo / 10 ** 1.0, lo / 10 ** 0.5] if low else [hi * 10 ** 0.5, hi * 10 ** 1.0]


def _tune_one(method: str, captures, targets, psf, grid, progress: bool) -> dict:
    from dmdiff.baselines import DEFAULT_GRIDS, METHODS as PARAMS, tune_baseline

    param = PARAMS[method]
    values = list(DEFAULT_GRIDS[method] if grid is None else grid)
    best, table = tune_baseline(method, captures, targets, psf, values, progress=progress)
    widened = []
    index = values.index(best)
    if len(values) > 1 and index in (0, len(values) - 1):
        extra = _widened(method, values, low=index == 0)
        if extra:
            _, more = tune_baseline(method, captures, targets, psf, extra, progress=progress)
            widened = extra
            table = sorted(table + more, key=lambda row: row[param])
            values = [row[param] for row in table]
            best = max(table, key=lambda row: row["psnr"])[param]
    index = values.index(best)
    return {param: best, "table": table, "grid": values, "widened_with": widened,
            "at_grid_edge": len(values) > 1 and index in (0, len(values) - 1)}


def tune_baselines(dataset: str | Path, psf: np.ndarray, pairs: int = 8, grids: Mapping | None = None,
                   progress: bool = True) -> dict:
    """Tune Wiener's NSR and RL's iteration count on ≤ ``pairs`` full-frame **train** pairs.

    Pairs are evenly spaced over the sorted train names (so crops of one photo do not dominate).

    Returns:
        ``{"train_names": [...], "wiener": {"nsr", "table", "grid", "widened_with", "at_grid_edge"},
        "richardson_lucy": {"iterations", ...}}``.
    """
    from dmdiff.data.dataset import PairedFolderDataset

    train = PairedFolderDataset(dataset, "train", use_maps=False)
    count = max(1, min(int(pairs), len(train)))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(train) - 1, count)})
    items = [train[i] for i in picks]
    captures = [_np(item["lr"]) for item in items]
    targets = [_np(item["gt"]) for item in items]
    record: dict[str, Any] = {"train_names": [item["name"] for item in items]}
    for method in BASELINES:
        record[method] = _tune_one(method, captures, targets, psf, (grids or {}).get(method), progress)
    return record


class _Timer:
    """Wall-clock timing of a call, synchronising CUDA around it when the device is a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None, *,
             stage1: str | Path | None = None, ablations: Mapping[str, str | Path] | None = None,
             limit: int | None = None, tune_pairs: int = 8, grids: Mapping[str, Sequence] | None = None,
             device: str | None = None, model_path: str | None = None, grid_rows: int = 4,
             progress: bool = True) -> dict:
    """Evaluate a trained model on the test split of ``data``; write the report into ``out``.

    Args:
        model: pipeline folder, training run or recipe run (:func:`resolve_model`).
        data: dataset folder with ``gt_test/`` + ``lr_test/`` (and, for the baselines,
            ``gt_train/`` + ``lr_train/`` and ``lens.json``).
        out: report folder (default: see the module docstring). Replaced only if it holds an
            earlier report (``metrics.json``) or is empty.
        stage1: a stage-1 (GT → capture) model, as ``model``; for a recipe run its ``stage1/`` is
            used when this is None.
        ablations: ``{name: model}`` (as ``model``) evaluated at α = 1 as ``ablation_<name>``, added
            to (or, for the same name, replacing) the ablations found in a recipe run
            (:func:`find_ablations`, when ``model`` is the run or its ``stage2/``).
        limit: evaluate only the first ``limit`` test images (sorted names).
        tune_pairs: at most this many train pairs tune the baselines.
        grids: baseline tuning grids ``{"wiener": [...], "richardson_lucy": [...]}`` (default:
            :data:`dmdiff.baselines.DEFAULT_GRIDS`).
        device: torch device (default: CUDA when available, else CPU).
        model_path: ``sd-turbo`` pipelines: where SD-Turbo is (see ``DMDiffPipeline.from_pretrained``).
        grid_rows: test images shown in ``grid.png`` (evenly spaced over the sorted names, so crops
            of one photo do not fill it).
        progress: progress bars.

    Returns:
        The ``metrics.json`` record.

    Raises:
        DmdiffError: bad folders or arguments (before any work starts).
    """
    from tqdm.auto import tqdm

    from dmdiff.baselines import richardson_lucy, wiener_deconvolve
    from dmdiff.data.dataset import PairedFolderDataset
    from dmdiff.imageio import write_png
    from dmdiff.metrics import LPIPSMetric, compute_metrics, lpips_status, summarize
    from dmdiff.model.ensemble import self_ensemble
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.restore import DEFAULT_COLOR_CORRECTION, LOWPASS_SIGMA_PX, color_correct, resolve_color_correction
    from dmdiff.runinfo import provenance

    data = Path(data)
    if not data.is_dir():
        raise DmdiffError(f"dataset folder not found: {data}")
    if not ((data / "gt_test").is_dir() and (data / "lr_test").is_dir()):
        raise DmdiffError(f"{data}: no held-out test split (gt_test/ + lr_test/); evaluate needs one "
                          "(`dmdiff simulate` writes it)")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise DmdiffError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(tune_pairs, bool) or int(tune_pairs) < 1:
        raise DmdiffError(f"tune_pairs must be a positive integer, got {tune_pairs!r}")
    pipeline_dir, run_dir = resolve_model(model, "stage2")
    stage1_dir, stage1_source = None, None
    if stage1 is not None:
        stage1_dir, _ = resolve_model(stage1, "stage1")
        stage1_source = str(stage1)
    elif run_dir is not None and pipeline_dir == run_dir / "stage2" / "pipeline" and \
            (run_dir / "stage1" / "pipeline").is_dir():
        stage1_dir, stage1_source = run_dir / "stage1" / "pipeline", "the recipe run's stage1/ (automatic)"
    ablation_dirs: dict[str, tuple[Path, str]] = {}
    if run_dir is not None and pipeline_dir == run_dir / "stage2" / "pipeline":
        ablation_dirs = {name: (path, "the recipe run's ablations/ (automatic)")
                         for name, path in find_ablations(run_dir).items()}
    for name, path in (ablations or {}).items():
        ablation_method(name)
        ablation_dirs[name] = (resolve_model(path, "stage2")[0], str(path))
    out = Path(out) if out is not None else default_out(pipeline_dir, run_dir)
    if out.exists() or out.is_symlink():
        check_replaceable(out, EVALUATION_KIND, evaluation_parts)
    test = PairedFolderDataset(data, "test")
    count = len(test) if limit is None else min(int(limit), len(test))
    device = resolve_device(device)
    timer = _Timer(device)

    # ---- models, PSF, tuning (train split only), LPIPS
    pipe = DMDiffPipeline.from_pretrained(pipeline_dir, model_path=model_path, device=device)
    net = pipe.model
    degrader = (DMDiffPipeline.from_pretrained(stage1_dir, model_path=model_path, device=device).model
                if stage1_dir is not None else None)
    ablation_nets = {ablation_method(name): DMDiffPipeline.from_pretrained(path, model_path=model_path,
                                                                          device=device).model
                     for name, (path, _) in ablation_dirs.items()}
    labels = {**LABELS, **{ablation_method(name): _ablation_label(name) for name in ablation_dirs}}
    references = {**REFERENCES, **{method: "gt" for method in ablation_nets}}
    from dmdiff.baselines import dataset_central_psf

    psf, spec, skip = dataset_central_psf(data, progress)
    tuning: dict[str, Any] = {}
    if psf is not None and not ((data / "gt_train").is_dir() and (data / "lr_train").is_dir()):
        psf, skip = None, f"{data} has no train split (gt_train/ + lr_train/) to tune the baselines on"
    if psf is None:
        warnings.warn(f"the Wiener and Richardson–Lucy baselines cannot run and are left out: {skip}",
                      EvaluationWarning, stacklevel=2)
    if psf is not None:
        tuning = tune_baselines(data, psf, tune_pairs, grids, progress)
    params = {m: tuning[m][p] for m, p in (("wiener", "nsr"), ("richardson_lucy", "iterations")) if m in tuning}
    lpips_ok, lpips_reason = lpips_status("alex")
    lpips = LPIPSMetric("alex", device=device) if lpips_ok else None

    correction = resolve_color_correction(DEFAULT_COLOR_CORRECTION, net)
    methods = [m for m in METHODS if (m not in BASELINES or psf is not None)
               and (m != "dmdiff_a1_cc" or correction != "none")]
    after = methods.index("dmdiff_a1_x8") + 1
    methods[after:after] = list(ablation_nets)
    if degrader is not None:
        methods.append(DEGRADE)

    def run_all(item: dict, warmup: bool = False) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        lr_t, gt_t = item["lr"][None], item["gt"][None]
        maps = item["maps"][None] if "maps" in item else None
        lr = _np(item["lr"])
        outputs, seconds = {}, {}
        if psf is not None and not warmup:
            outputs["wiener"], seconds["wiener"] = timer(wiener_deconvolve, lr, psf, params["wiener"])
            outputs["richardson_lucy"], seconds["richardson_lucy"] = timer(
                richardson_lucy, lr, psf, params["richardson_lucy"])
        (y1, cached), seconds["dmdiff_a1"] = timer(net.restore, lr_t, maps, alpha=1.0, return_latents=True)
        y0, seconds["redecode"] = timer(net.decode, cached, 0.0)
        seconds["dmdiff_a0"] = seconds["dmdiff_a1"]           # one restore call gives any α
        outputs["dmdiff_a1"], outputs["dmdiff_a0"] = _np(y1), _np(y0)
        if "dmdiff_a1_cc" in methods:
            outputs["dmdiff_a1_cc"], seconds["dmdiff_a1_cc"] = timer(color_correct, outputs["dmdiff_a1"], lr, correction)
            seconds["dmdiff_a1_cc"] += seconds["dmdiff_a1"]
        y8, seconds["dmdiff_a1_x8"] = timer(self_ensemble, lambda x, m: net.restore(x, m, alpha=1.0), lr_t, maps)
        outputs["dmdiff_a1_x8"] = _np(y8)
        for method, other in ablation_nets.items():
            y, seconds[method] = timer(other.restore, lr_t, maps, alpha=1.0)
            outputs[method] = _np(y)
        recon, seconds["vae_ceiling"] = timer(vae_reconstruct, net, gt_t)
        outputs["vae_ceiling"] = _np(recon)
        if degrader is not None:
            fake, seconds[DEGRADE] = timer(degrader.degrade, gt_t, maps)
            outputs[DEGRADE] = _np(fake)
        return {k: quantize(v) for k, v in outputs.items()}, seconds

    records, shown = [], []
    show = {int(round(i)) for i in np.linspace(0, count - 1, min(max(int(grid_rows), 0), count))}
    with atomic_directory(out, EVALUATION_KIND, replace=True, legacy=evaluation_parts) as tmp:
        run_all(test[0], warmup=True)                            # networks only, untimed
        for index in tqdm(range(count), desc="evaluate", disable=not progress):
            item = test[index]
            name = item["name"]
            gt, lr = _np(item["gt"]), _np(item["lr"])
            outputs, seconds = run_all(item)
            row: dict[str, dict] = {"input": compute_metrics(lr, gt, lpips=lpips)}
            for method, image in outputs.items():
                reference = lr if references[method] == "lr" else gt
                row[method] = {**compute_metrics(image, reference, lpips=lpips), "runtime_s": seconds[method]}
                write_png(tmp / IMAGES_DIR / method / f"{name}.png", image)
            row["dmdiff_a0"]["redecode_s"] = seconds["redecode"]
            records.append({"name": name, "height": gt.shape[0], "width": gt.shape[1],
                            "maps": "maps" in item, "methods": row})
            if index in show:
                shown.append((name, {"gt": gt, "input": lr, **outputs}, row))

        summary = {m: summarize(r["methods"][m] for r in records) for m in methods}
        metrics: dict[str, Any] = {
            "dataset": str(data), "split": "test", "count": count, "names": [r["name"] for r in records],
            "methods": methods, "labels": {m: labels[m] for m in methods},
            "references": {m: references[m] for m in methods},
            "means": {m: {k: v["mean"] for k, v in s.items()} for m, s in summary.items()},
            "summary": summary,
            "per_image": records,
            "lpips": {"available": lpips_ok, "reason": lpips_reason, "net": "alex" if lpips_ok else None},
            "baselines": ({"psf": "true per-channel PSF of the dataset's lens at the centre of the field "
                                  "(lens.json spec → psf_grid → central_psf)",
                           "spec": spec, "params": params, "tuned_on": "train split, full frames, mean RGB PSNR",
                           **tuning} if psf is not None else {"skipped": skip}),
            "settings": {
                "model": str(model), "pipeline": str(pipeline_dir), "model_config": _config(net),
                "stage1": None if stage1_dir is None else {"pipeline": str(stage1_dir), "source": stage1_source},
                "ablations": {name: {"method": ablation_method(name), "pipeline": str(path), "source": source,
                                     "model_config": _config(ablation_nets[ablation_method(name)])}
                              for name, (path, source) in ablation_dirs.items()},
                "device": str(device), "dtype": str(net.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "limit": limit, "tune_pairs": tune_pairs,
                "full_frames": True,
                "protocol": "outputs clipped to [0, 1] and rounded to 8 bits before measuring; the saved "
                            "images/<method>/<name>.png hold exactly those pixels",
                "alphas": {"dmdiff_a0": 0.0, "dmdiff_a1": 1.0, **({"dmdiff_a1_cc": 1.0} if "dmdiff_a1_cc" in methods else {}),
                           "dmdiff_a1_x8": 1.0, **{m: 1.0 for m in ablation_nets}},
                "self_ensemble": {"dmdiff_a1_x8": "mean of the positive path over the 8 rotations/mirrorings of "
                                                  "capture and maps (dmdiff.model.ensemble), no colour correction"},
                "color_correction": (
                    {"dmdiff_a1_cc": {"method": correction, "sigma_px": LOWPASS_SIGMA_PX, "reference": "the capture"}}
                    if "dmdiff_a1_cc" in methods else
                    {"dmdiff_a1_cc": None, "reason": f"the model has a colour anchor (anchor_sigma_px = "
                                                     f"{net.config.anchor_sigma_px:g}): restore's default adds no correction"}),
                "maps": "the dataset's maps/<name>.npy when present (per image: per_image[].maps)",
                "ceiling": "model VAE with the encoder LoRA modulation M = 0 (= the frozen base VAE), "
                           "decode(encode(gt)) at the posterior mode, model padding, no UNet",
                "runtime": "seconds per image after one untimed warm-up; DMDiff α=0 and α=1 share one "
                           "restore call (both paths); redecode_s: moving α on cached latents; "
                           "dmdiff_a1_cc: the restore call plus the colour correction; dmdiff_a1_x8: "
                           "its 8 restore calls; an ablation: its own restore call",
            },
        }
        metrics["quality_bar"] = quality_bar(metrics)
        for method, (key, _) in BAR_VARIANTS.items():
            if method in methods:
                metrics[key] = quality_bar(metrics, method=method)
        metrics["provenance"] = provenance(command="dmdiff evaluate")
        table = format_table(metrics)
        write_json(tmp / METRICS_FILE, metrics)
        atomic_write_text(tmp / CSV_FILE, _csv(records, methods, references))
        atomic_write_text(tmp / TABLE_FILE, table)
        if shown:
            _grids(shown, methods, tmp)
    metrics["out"] = str(out)
    return metrics


def _config(net) -> dict:
    from dmdiff.config import to_dict

    return to_dict(net.config)


def _csv(records: list[dict], methods: Sequence[str], references: Mapping[str, str]) -> str:
    keys: list[str] = []
    for record in records:
        for method in methods:
            keys += [k for k in record["methods"].get(method, {}) if k not in keys]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "method", "reference", *keys])
    for record in records:
        for method in methods:
            values = record["methods"].get(method)
            if values is not None:
                writer.writerow([record["name"], method, references[method],
                                 *("" if values.get(k) is None else repr(float(values[k])) for k in keys)])
    return buf.getvalue()


def _grids(shown: list, methods: Sequence[str], out: Path) -> list[Path]:
    """``grid.png`` (gt, capture, baselines, DMDiff α = 0 / 1) and, with ablations,
    ``grid_ablations.png`` (gt, capture, DMDiff α = 1, each ablation) of the ``shown`` images."""
    import matplotlib.pyplot as plt

    from dmdiff.viz import image_grid, save_figure

    titles = {"gt": "ground truth", "input": "capture", "wiener": "Wiener", "richardson_lucy": "Richardson–Lucy",
              "dmdiff_a0": "DMDiff α=0", "dmdiff_a1": "DMDiff α=1"}
    ablations = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    titles.update({method: _ablation_label(method[len(ABLATION_PREFIX):], short=True) for method in ablations})
    figures = [(GRID_FILE, [c for c in ("gt", "input", "wiener", "richardson_lucy", "dmdiff_a0", "dmdiff_a1")
                            if c == "gt" or c in methods], "held-out test images (PSNR vs ground truth)")]
    if ablations:
        figures.append((ABLATION_GRID_FILE, ["gt", "input", "dmdiff_a1", *ablations],
                        "DMDiff and its ablations at α=1 on the same test images (PSNR vs ground truth)"))
    paths = []
    for filename, columns, title in figures:
        panels = {}
        for name, images, row in shown:
            for column in columns:
                detail = "" if column == "gt" else f"\n{row[column]['psnr']:.2f} dB"
                panels[f"{name}: {titles[column]}{detail}"] = images[column]
        fig = image_grid(panels, ncols=len(columns), size=2.4, title=title)
        paths.append(save_figure(fig, out, Path(filename).stem))
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# the bar and the table
# ---------------------------------------------------------------------------------------------


def _mean_psnr(metrics: Mapping, method: str) -> float | None:
    value = metrics.get("means", {}).get(method, {}).get("psnr")
    return None if value is None else float(value)


def quality_bar(metrics: Mapping, over_input_db: float = QUALITY_BAR["over_input_db"],
                over_baselines_db: float = QUALITY_BAR["over_baselines_db"], method: str = "dmdiff_a1") -> dict:
    """Check the training issue's bar on mean RGB PSNR (dB) of the test split.

    The positive path (``dmdiff_a1``) must reach ``input + over_input_db`` and
    ``max(wiener, richardson_lucy) + over_baselines_db``.

    Args:
        metrics: a ``metrics.json`` record, or any mapping with ``{"means": {method: {"psnr": dB}}}``.
        method: the method held to the bar (a :data:`BAR_VARIANTS` key: the same figures for that
            variant of the positive path).

    Returns:
        ``{"positive_psnr", "input_psnr", "best_baseline", "best_baseline_psnr",
        "over_input": {"gain_db", "required_db", "margin_db", "pass"},
        "over_baselines": {... same, "reason" when no baseline was measured}, "pass"}``;
        ``margin_db = gain_db − required_db`` (≥ 0 passes). A missing baseline fails the second
        check (the bar cannot be shown met), as does a missing positive path or input.
    """
    positive, captured = _mean_psnr(metrics, method), _mean_psnr(metrics, "input")
    baselines = {m: _mean_psnr(metrics, m) for m in BASELINES if _mean_psnr(metrics, m) is not None}
    best = max(baselines, key=baselines.get) if baselines else None

    def check(reference: float | None, required: float, missing: str) -> dict:
        if positive is None or reference is None or not math.isfinite(positive) or not math.isfinite(reference):
            return {"gain_db": None, "required_db": required, "margin_db": None, "pass": False,
                    "reason": missing if reference is None else "the positive-path PSNR is missing or not finite"}
        gain = positive - reference
        return {"gain_db": gain, "required_db": required, "margin_db": gain - required, "pass": bool(gain >= required)}

    over_input = check(captured, float(over_input_db), "the input PSNR is missing")
    over_baselines = check(baselines.get(best), float(over_baselines_db), "no baseline (Wiener / RL) was evaluated")
    return {"positive_psnr": positive, "input_psnr": captured, "best_baseline": best,
            "best_baseline_psnr": baselines.get(best), "over_input": over_input, "over_baselines": over_baselines,
            "pass": bool(over_input["pass"] and over_baselines["pass"])}


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def format_table(metrics: Mapping) -> str:
    """The markdown report: a table of means (method × PSNR/SSIM on RGB and Y, LPIPS, runtime),
    the learned-degradation row when present, the tuned baseline parameters and the quality bar."""
    means, methods = metrics["means"], metrics["methods"]
    labels, references = {**LABELS, **metrics.get("labels", {})}, {**REFERENCES, **metrics.get("references", {})}
    lpips = metrics.get("lpips", {})
    lpips_key = f"lpips_{lpips['net']}" if lpips.get("available") else None
    lines = [f"## Held-out evaluation: {metrics['count']} test images of {metrics['dataset']} (full frames)", "",
             "| method | vs | PSNR (dB) | PSNR-Y (dB) | SSIM | SSIM-Y | LPIPS | runtime (s/img) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        m = means[method]
        lp = _fmt(m.get(lpips_key), 4) if lpips_key else "unavailable"
        runtime = _fmt(m.get("runtime_s"), 4)
        if method == "dmdiff_a0" and m.get("redecode_s") is not None:
            runtime += f" (α change: {_fmt(m['redecode_s'], 4)})"
        lines.append(f"| {labels[method]} | {references[method]} | {_fmt(m.get('psnr'), 2)} | "
                     f"{_fmt(m.get('psnr_y'), 2)} | {_fmt(m.get('ssim'), 4)} | {_fmt(m.get('ssim_y'), 4)} | "
                     f"{lp} | {runtime} |")
    lines.append("")
    if not lpips_key:
        lines += [f"LPIPS: unavailable ({lpips.get('reason', 'unknown reason')})", ""]
    base = metrics.get("baselines", {})
    if "skipped" in base:
        lines += [f"Baselines skipped: {base['skipped']}", ""]
    elif base:
        parts = []
        for method, param in (("wiener", "nsr"), ("richardson_lucy", "iterations")):
            edge = " (at the grid's edge)" if base[method].get("at_grid_edge") else ""
            parts.append(f"{LABELS[method].split(',')[0]} {param} = {base[method][param]:g}{edge}")
        lines += [f"Baselines tuned on {len(base['train_names'])} train pairs: " + "; ".join(parts), ""]
    if DEGRADE in methods:
        lines += [f"Learned degradation: stage-1 degrade(GT) vs the simulated capture: "
                  f"{_fmt(means[DEGRADE]['psnr'], 2)} dB (GT itself vs the capture: {_fmt(means['input']['psnr'], 2)} dB).",
                  ""]
    bar = metrics.get("quality_bar") or quality_bar(metrics)

    def verdict(check: dict, what: str) -> str:
        if check["gain_db"] is None:
            return f"{what}: FAIL ({check.get('reason')})"
        return (f"{what}: {'PASS' if check['pass'] else 'FAIL'} (gain {check['gain_db']:+.2f} dB, "
                f"needs {check['required_db']:+.1f}, margin {check['margin_db']:+.2f} dB)")

    best = LABELS[bar["best_baseline"]].split(",")[0] if bar["best_baseline"] else "best baseline"
    lines += [f"Quality bar (positive path {_fmt(bar['positive_psnr'], 2)} dB): "
              f"{'PASS' if bar['pass'] else 'FAIL'}",
              f"- {verdict(bar['over_input'], 'over the input')}",
              f"- {verdict(bar['over_baselines'], f'over {best}')}", ""]
    for method, (key, name) in BAR_VARIANTS.items():
        if method not in methods:
            continue
        variant = metrics.get(key) or quality_bar(metrics, method=method)
        gains = [f"{variant[k]['gain_db']:+.2f} dB {what}" for k, what in
                 (("over_input", "over the input"), ("over_baselines", f"over {best}"))
                 if variant[k]["gain_db"] is not None]
        lines += [f"With {name} (not the bar's figure): "
                  f"{_fmt(variant['positive_psnr'], 2)} dB ({', '.join(gains) or 'no reference'}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_ablation_args(pairs: Sequence[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` (``--ablation``) → ``{NAME: PATH}``; DmdiffError on a malformed or
    repeated name."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not path:
            raise DmdiffError(f"--ablation expects NAME=PIPELINE_OR_RUN, got {pair!r}")
        ablation_method(name)
        if name in found:
            raise DmdiffError(f"--ablation {name} is given twice")
        found[name] = path
    return found


def main(args) -> int:
    """Entry point of ``dmdiff evaluate`` (args: model, data, out, stage1, ablation, limit, tune_pairs,
    device, threads, model_path, no_progress)."""
    if args.threads is not None:
        if args.threads < 1:
            raise DmdiffError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    metrics = evaluate(args.model, args.data, args.out, stage1=args.stage1,
                       ablations=parse_ablation_args(args.ablation), limit=args.limit,
                       tune_pairs=args.tune_pairs, device=args.device, model_path=args.model_path,
                       progress=not args.no_progress)
    out = Path(metrics["out"])
    print((out / TABLE_FILE).read_text())
    grids = f"{GRID_FILE}, {ABLATION_GRID_FILE}" if (out / ABLATION_GRID_FILE).is_file() else GRID_FILE
    print(f"dmdiff evaluate: wrote {METRICS_FILE}, {CSV_FILE}, {TABLE_FILE}, {grids} and images/ to {out}")
    return 0
