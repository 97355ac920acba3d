"""``dmdiff evaluate``: the held-out quality report of a trained DMDiff model.

On the dataset's **test** split (held out from training; full frames, no crops) every image is
restored or reconstructed by each method of :mod:`dmdiff.evaluation.methods` and measured against
its reference with :func:`dmdiff.metrics.compute_metrics` (PSNR and SSIM on RGB and on BT.601 Y,
the gradient sharpness ratio, LPIPS only with its real weights), and each method's outputs as a set
with :mod:`dmdiff.perception` (set-level NIQE, and the set-level detail ratio against the
reference; the ground truth's own set-level NIQE is the reference line; see
:class:`dmdiff.evaluation.report.SetPerception` and docs/perception.md):

=====================  ==========================================================  =========
method key             what                                                        reference
=====================  ==========================================================  =========
``input``              the simulated/real capture itself (``lr``)                   gt
``wiener``             Wiener deconvolution with the lens's true central PSF        gt
``richardson_lucy``    Richardson–Lucy with the same PSF                            gt
``richardson_lucy_sv``  Richardson–Lucy with the lens's whole PSF grid (spatially    gt
                       varying, :func:`~dmdiff.evaluation.baselines.richardson_lucy_sv`)
``color_anchor``       the colour anchor alone, ``G_σ(RL_n(x))`` (anchored models)   gt
``untrained``          the model with untrained adapters (:mod:`.trivial`), α = 1   gt
``dmdiff_a0``          DMDiff at α = 0 (the neutral, fidelity path)                 gt
``dmdiff_arec``        DMDiff at the model's recommended α                          gt
                       (``DMDiffConfig.recommended_alpha``; no row when None)
``dmdiff_a1``          DMDiff at α = 1 (the positive path)                          gt
``dmdiff_a1_cc``       ``dmdiff_a1`` after ``dmdiff restore``'s default colour      gt
                       correction against the capture
                       (:func:`dmdiff.model.color.color_correct`); absent for a
                       model with a colour anchor (``auto`` adds no correction)
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
  dataset has them, else None. A deconvolved colour anchor likewise uses each image's own lens
  (its ``lens.json``: the dataset's lens, or in a lens family the image's), else the lens the
  model was saved with.
* **Baselines** deconvolve with the *true* per-channel PSF of the dataset's lens at the centre of
  the field (:func:`dmdiff.data.dataset.dataset_central_psf`). Their parameter (Wiener NSR, RL
  iterations) is tuned by mean RGB PSNR on at most ``tune_pairs`` full-frame **train** pairs,
  evenly spaced over the sorted names (:func:`dmdiff.evaluation.baselines.tune_baselines`; a best
  value at an end of the grid widens it once and is flagged ``at_grid_edge`` if it stays there).
  Cost on a 2-core CPU at 256²: RL about 60 ms per iteration and image, Wiener about 1 s per value
  and image, so the default 8 pairs take a few minutes. Without ``lens.json`` or a train split the
  baselines are skipped, with a warning, and the reason recorded.
* **Spatially varying RL** deconvolves with every node of the true PSF grid, its iteration count
  tuned on at most ``tune_pairs`` **validation** pairs (:func:`dmdiff.evaluation.baselines.varying_baseline`).
* **Field zones and intervals.** Every method is also scored per field zone (centre, mid, edge;
  :mod:`dmdiff.evaluation.field`) with the gain over the field drawn in ``gain_map.png``, and
  every method's paired PSNR difference to ``dmdiff_a1`` (whole frame and edge zone) gets a 95 %
  bootstrap interval over source photos (:mod:`dmdiff.evaluation.uncertainty`; ``dmdiff
  intervals`` pools the reports of several training seeds).
* **Ceiling.** The backbone's own reconstruction PSNR: ``decode(encode(gt))`` with the frozen
  base VAE (:meth:`dmdiff.model.dmdiff.DMDiff.reconstruct`: the model's VAE with its encoder
  LoRA switched off exactly), with the model's padding. It bounds what any output decoded by
  this VAE can reach.
* **Runtimes** (seconds per image, wall clock, after one untimed warm-up call of each network on a
  stand-in of the first test pair's size, :meth:`Sample.stand_in`, CUDA synchronised):
  the baselines' deconvolution only; DMDiff's one ``restore`` call, which always runs both paths
  (so α = 0, the recommended α and α = 1 cost the same and share that number: the UNet runs once
  per image and the other α are re-decoded from its cached latents); ``redecode_s`` of
  ``dmdiff_a0`` and ``dmdiff_arec`` is the extra cost of moving α on cached latents (VAE decoder
  only). An ablation's runtime is its own ``restore`` call, measured the same way;
  ``dmdiff_a1_x8``'s is its 8 ``restore`` calls: the shared α = 1 call (its unturned member) and
  the 7 turned ones. No restoration is computed twice.
* **Ablations** are found automatically only for a recipe run whose ``stage2/`` is the evaluated
  model; each is loaded as its own pipeline (its config, e.g. ``svda: false``, is recorded under
  ``settings.ablations``).

Outputs in ``out`` (default :func:`dmdiff.runs.eval_dir`: ``RUN/eval`` for a training or recipe
run, ``<PIPELINE>-eval`` next to a bare pipeline folder), see :mod:`dmdiff.evaluation.report`:
``metrics.json`` (per image, means and spreads, the set-level ``perception`` figures, tuned
baseline parameters with their tuning tables, the quality bar, settings, provenance),
``metrics.csv``, ``table.md`` (also printed), ``grid.png`` (a few test images, evenly spaced over
the names) and, with ablations, ``grid_ablations.png``, and ``images/``. The folder is written
atomically and replaces only an earlier report (:mod:`dmdiff.outputs`).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.config import to_dict
from dmdiff.data.dataset import LensGrids, PairedFolderDataset, dataset_central_psf, read_lens
from dmdiff.device import resolve_device
from dmdiff.errors import DmdiffError
from dmdiff.evaluation.baselines import dataset_varying_blur, tune_baselines, varying_baseline
from dmdiff.evaluation.field import GAIN_FILE, FieldScores, format_zone_table, plot_gain_maps
from dmdiff.evaluation.methods import (
    ABLATION_PREFIX,
    LABELS,
    RECOMMENDED,
    REFERENCES,
    Context,
    Sample,
    ablation_method,
    methods_for,
    to_hwc,
)
from dmdiff.evaluation.report import (
    ABLATION_GRID_FILE,
    BAR_VARIANTS,
    CSV_FILE,
    GRID_FILE,
    IMAGES_DIR,
    METRICS_FILE,
    TABLE_FILE,
    SetPerception,
    csv_text,
    format_table,
    quality_bar,
    write_grids,
)
from dmdiff.evaluation.trivial import untrained_pipeline
from dmdiff.evaluation.uncertainty import differences_table, format_differences, source_photos
from dmdiff.imageio import write_png
from dmdiff.metrics import LPIPSMetric, compute_metrics, lpips_status, summarize
from dmdiff.model.color import (
    DEFAULT_COLOR_CORRECTION,
    LOWPASS_SIGMA_PX,
    resolve_color_correction,
)
from dmdiff.optics.sensor import quantize
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import (
    atomic_directory,
    atomic_write_text,
    check_replaceable,
    folder_files,
    write_json,
)
from dmdiff.runinfo import provenance
from dmdiff.runs import (
    PIPELINE,
    STAGE1,
    STAGE2,
    eval_dir,
    find_ablations,
    load_pipeline,
    resolve_model,
)
from dmdiff.train.ablations import ABLATIONS

__all__ = ["EVALUATION_KIND", "EvaluationWarning", "evaluation_parts", "evaluate", "parse_ablation_args", "main"]

#: The kind of folder an evaluation report is (:mod:`dmdiff.outputs`).
EVALUATION_KIND = "evaluation"
#: Where the external check set's images go in a report.
EXTERNAL_DIR = "external"


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
    top = {METRICS_FILE, CSV_FILE, TABLE_FILE, GRID_FILE, ABLATION_GRID_FILE, GAIN_FILE}
    return {f for f in folder_files(folder) if f in top or f.startswith((IMAGES_DIR + "/", EXTERNAL_DIR + "/"))}


def _check_dataset(data: Path, limit: int | None, tune_pairs: int) -> None:
    """Refuse a dataset without a test split, or a bad ``limit`` / ``tune_pairs``, before any work."""
    if not data.is_dir():
        raise DmdiffError(f"dataset folder not found: {data}")
    if not ((data / "gt_test").is_dir() and (data / "lr_test").is_dir()):
        raise DmdiffError(f"{data}: no held-out test split (gt_test/ + lr_test/); evaluate needs one "
                          "(`dmdiff simulate` writes it)")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise DmdiffError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(tune_pairs, bool) or int(tune_pairs) < 1:
        raise DmdiffError(f"tune_pairs must be a positive integer, got {tune_pairs!r}")


def _baselines(data: Path, tune_pairs: int, grids: Mapping | None, progress: bool) -> tuple[Any, dict, dict, dict]:
    """The baselines' PSF and tuned parameters: ``(psf or None, params, metrics.json record, tuning)``."""
    psf, spec, skip = dataset_central_psf(data, progress)
    if psf is not None and not ((data / "gt_train").is_dir() and (data / "lr_train").is_dir()):
        psf, skip = None, f"{data} has no train split (gt_train/ + lr_train/) to tune the baselines on"
    if psf is None:
        warnings.warn(f"the Wiener and Richardson–Lucy baselines cannot run and are left out: {skip}",
                      EvaluationWarning, stacklevel=3)
        return None, {}, {"skipped": skip}, {}
    tuning = tune_baselines(data, psf, tune_pairs, grids, progress)
    params = {m: tuning[m][p] for m, p in (("wiener", "nsr"), ("richardson_lucy", "iterations"))}
    record = {"psf": "true per-channel PSF of the dataset's lens at the centre of the field "
                     "(lens.json spec → psf_grid → central_psf)",
              "spec": spec, "params": params, "tuned_on": "train split, full frames, mean RGB PSNR", **tuning}
    return psf, params, record, tuning


def _models(model, stage1, ablations: Mapping | None) -> tuple:
    """The pipeline folders an evaluation loads: ``(pipeline, run or None, stage-1 pipeline or None,
    where the stage-1 model came from, {ablation name: (pipeline, where it came from)})``; a recipe
    run's own stage 1 and ablations are found automatically."""
    pipeline_dir, run_dir = resolve_model(model, STAGE2)
    from_recipe = run_dir is not None and pipeline_dir == run_dir / STAGE2 / PIPELINE
    stage1_dir, stage1_source = None, None
    if stage1 is not None:
        stage1_dir, stage1_source = resolve_model(stage1, STAGE1)[0], str(stage1)
    elif from_recipe and (run_dir / STAGE1 / PIPELINE).is_dir():
        stage1_dir, stage1_source = run_dir / STAGE1 / PIPELINE, "the recipe run's stage1/ (automatic)"
    ablation_dirs: dict[str, tuple[Path, str]] = {}
    if from_recipe:
        ablation_dirs = {name: (path, "the recipe run's ablations/ (automatic)")
                         for name, path in _ordered_ablations(find_ablations(run_dir)).items()}
    for name, path in (ablations or {}).items():
        ablation_method(name)
        ablation_dirs[name] = (resolve_model(path, STAGE2)[0], str(path))
    return pipeline_dir, run_dir, stage1_dir, stage1_source, ablation_dirs


def _ordered_ablations(found: Mapping[str, Path]) -> dict[str, Path]:
    """Ablations in :data:`dmdiff.train.ablations.ABLATIONS` order, then other names sorted."""
    return {name: found[name] for name in [n for n in ABLATIONS if n in found] + sorted(set(found) - set(ABLATIONS))}


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None, *,
             stage1: str | Path | None = None, ablations: Mapping[str, str | Path] | None = None,
             limit: int | None = None, tune_pairs: int = 8, grids: Mapping[str, Sequence] | None = None,
             device: str | None = None, model_path: str | None = None, grid_rows: int = 4,
             external: str | Path | None = None, self_ensemble: bool = True, progress: bool = True) -> dict:
    """Evaluate a trained model on the test split of ``data``; write the report into ``out``.

    Args:
        model: pipeline folder, training run or recipe run (:func:`dmdiff.runs.resolve_model`).
        data: dataset folder with ``gt_test/`` + ``lr_test/`` (and, for the baselines,
            ``gt_train/`` + ``lr_train/`` and ``lens.json``).
        out: report folder (default: see the module docstring). Replaced only if it holds an
            earlier report or is empty.
        stage1: a stage-1 (GT → capture) model, as ``model``; for a recipe run its ``stage1/`` is
            used when this is None.
        ablations: ``{name: model}`` (as ``model``) evaluated at α = 1 as ``ablation_<name>``, added
            to (or, for the same name, replacing) the ablations found in a recipe run
            (:func:`dmdiff.runs.find_ablations`, when ``model`` is the run or its ``stage2/``).
        limit: evaluate only the first ``limit`` test images (sorted names).
        tune_pairs: at most this many train pairs tune the baselines.
        grids: baseline tuning grids ``{"wiener": [...], "richardson_lucy": [...]}`` (default:
            :data:`dmdiff.evaluation.baselines.DEFAULT_GRIDS`).
        device: torch device (default: CUDA when available, else CPU).
        model_path: ``sd-turbo`` pipelines: where SD-Turbo is (see ``DMDiffPipeline.from_pretrained``).
        grid_rows: test images shown in ``grid.png`` (evenly spaced over the sorted names, so crops
            of one photo do not fill it).
        external: a second dataset (e.g. ``dmdiff simulate --external``: photos no training saw)
            whose test split gets the same methods, the baselines' parameters tuned on ``data``'s
            train split and its own lens's PSF (e.g. a lens no training saw, simulated with
            ``dmdiff simulate --config``); reported under ``external`` in ``metrics.json``, as a
            second table with its own field zones and paired differences in ``table.md``, with its
            images under ``external/images/`` and its ``external/gain_map.png``; ``dmdiff intervals
            --split external`` pools such reports over seeds.
        self_ensemble: include the ×8 self-ensemble row (8 restores per image; test split only).
        progress: progress bars.

    Returns:
        The ``metrics.json`` record, with ``"out"`` (the report folder) added.

    Raises:
        DmdiffError: bad folders or arguments (before any work starts).
    """
    # ---- check everything before any work: dataset, models, output folder, device
    data = Path(data)
    _check_dataset(data, limit, tune_pairs)
    if external is not None:
        _check_dataset(Path(external), None, tune_pairs)
    pipeline_dir, run_dir, stage1_dir, stage1_source, ablation_dirs = _models(model, stage1, ablations)
    out = Path(out) if out is not None else eval_dir(pipeline_dir, run_dir)
    if out.exists() or out.is_symlink():
        check_replaceable(out, EVALUATION_KIND, evaluation_parts)
    test = PairedFolderDataset(data, "test")
    count = len(test) if limit is None else min(int(limit), len(test))
    device = resolve_device(device)

    # ---- models, baselines (tuned on the train split only), LPIPS
    pipeline = load_pipeline(pipeline_dir, device=device, model_path=model_path).pipeline
    net = pipeline.model
    degrader = load_pipeline(stage1_dir, device=device, model_path=model_path).model if stage1_dir else None
    ablation_pipes = {ablation_method(name): load_pipeline(path, device=device, model_path=model_path).pipeline
                      for name, (path, _) in ablation_dirs.items()}
    psf, params, baselines_record, tuning = _baselines(data, tune_pairs, grids, progress)
    blur, baselines_record["richardson_lucy_sv"] = varying_baseline(data, tune_pairs, progress)
    if blur is not None:
        params["richardson_lucy_sv"] = baselines_record["richardson_lucy_sv"]["iterations"]
    lpips_ok, lpips_reason = lpips_status("alex")
    lpips = LPIPSMetric("alex", device=device) if lpips_ok else None
    correction = resolve_color_correction(DEFAULT_COLOR_CORRECTION, net)
    context = Context(pipeline, degrader, ablation_pipes, psf, params, correction, blur,
                      untrained_pipeline(net, model_path), self_ensemble, _lens_grids(data, blur))
    rows = methods_for(context)
    methods = ["input", *(m.name for m in rows)]
    labels = {**LABELS, **{m.name: m.label for m in rows}}
    references = {**REFERENCES, **{m.name: m.reference for m in rows}}

    # ---- every test image through every method
    with atomic_directory(out, EVALUATION_KIND, replace=True, legacy=evaluation_parts) as tmp:
        warm = Sample.stand_in(test[0])                             # networks only, untimed
        context.use_capture_lens(warm.name)
        for method in rows:
            if method.warm_up:
                method.run(context, warm)
        field = FieldScores(_lens_spec(data))
        records, shown, perception = _run_split(test, count, rows, context, lpips, tmp / IMAGES_DIR, grid_rows,
                                                progress, field)

        # ---- the report
        summary = {m: summarize(r["methods"][m] for r in records) for m in methods}
        metrics: dict[str, Any] = {
            "dataset": str(data), "split": "test", "count": count, "names": [r["name"] for r in records],
            "methods": methods, "labels": {m: labels[m] for m in methods},
            "references": {m: references[m] for m in methods},
            "means": {m: {k: v["mean"] for k, v in s.items()} for m, s in summary.items()},
            "summary": summary,
            "per_image": records,
            "perception": perception,
            "lpips": {"available": lpips_ok, "reason": lpips_reason, "net": "alex" if lpips_ok else None},
            "baselines": baselines_record,
            "field": field.record(),
            "sources": dict(zip([r["name"] for r in records], source_photos([r["name"] for r in records], data))),
            "settings": {**_settings(model, pipeline_dir, net, stage1_dir, stage1_source, ablation_dirs,
                                     ablation_pipes, methods, correction, device, limit, tune_pairs),
                         "anchor_psf": None if not net.config.anchor_deconvolves else
                         "each test image's own lens's PSF grid (lens.json)" if context.lenses is not None else
                         "the lens the model was saved with"},
        }
        metrics["quality_bar"] = quality_bar(metrics)
        for method, (key, _) in BAR_VARIANTS.items():
            if method in methods:
                metrics[key] = quality_bar(metrics, method=method)
        table = format_table(metrics) + _field_sections(metrics, tmp)
        if external is not None:
            ext = metrics["external"] = _external_split(Path(external), context, lpips, tmp, progress)
            view = {**metrics, **ext}                     # the main split's labels and references
            table += "\n" + format_table(view) + _field_sections(view, tmp / EXTERNAL_DIR, into=ext)
        metrics["provenance"] = provenance(command="dmdiff evaluate")
        write_json(tmp / METRICS_FILE, metrics)
        atomic_write_text(tmp / CSV_FILE, csv_text(records, methods, references))
        atomic_write_text(tmp / TABLE_FILE, table)
        if shown:
            write_grids(shown, methods, tmp)
    metrics["out"] = str(out)
    return metrics


def _external_split(data: Path, context: Context, lpips, out: Path, progress: bool) -> dict:
    """``metrics.json``'s ``external``: every test pair of ``data`` through the same methods (the
    baselines with its own lens's central PSF or PSF grid and the parameters tuned for the main dataset)
    except the ×8 self-ensemble (8 more restores of every frame: about 6 minutes on 60 frames on two
    cores, for a row the test split already reports), with its means, spreads, quality bar, field
    zones and source photos; images under ``out/external/images/`` (the caller adds the paired
    differences and ``out/external/gain_map.png``, :func:`_field_sections`)."""
    psf = dataset_central_psf(data)[0] if context.psf is not None else None
    blur = dataset_varying_blur(data) if context.blur is not None else None
    context = replace(context, psf=psf, blur=blur, self_ensemble=False, lenses=_lens_grids(data, blur))
    rows = methods_for(context)
    test = PairedFolderDataset(data, "test")
    field = FieldScores(_lens_spec(data))
    records, _, perception = _run_split(test, len(test), rows, context, lpips, out / EXTERNAL_DIR / IMAGES_DIR, 0,
                                        progress, field)
    methods = ["input", *(m.name for m in rows)]
    summary = {m: summarize(r["methods"][m] for r in records) for m in methods}
    names = [r["name"] for r in records]
    record = {"dataset": str(data), "split": "test", "count": len(records), "names": names,
              "sources": dict(zip(names, source_photos(names, data))), "methods": methods,
              "means": {m: {k: v["mean"] for k, v in s.items()} for m, s in summary.items()}, "summary": summary,
              "per_image": records, "perception": perception, "field": field.record()}
    record["quality_bar"] = quality_bar(record)
    record.update({key: quality_bar(record, method=method) for method, (key, _) in BAR_VARIANTS.items()
                   if method in methods})
    return record


def _run_split(test: PairedFolderDataset, count: int, rows: Sequence, context: Context, lpips, images: Path,
               grid_rows: int, progress: bool, field: FieldScores) -> tuple[list[dict], list, dict]:
    """The first ``count`` pairs of ``test`` through every method of ``rows``: per image its record
    (``name``, size, ``maps``, ``methods``: figures per method), its 8-bit outputs saved under
    ``images/<method>/<name>.png``; returns the records, the ``(name, images, figures)`` of the
    ``grid_rows`` images evenly spaced over the names (for the grids) and the split's set-level
    perception figures (:class:`~dmdiff.evaluation.report.SetPerception`, of the same 8-bit images);
    ``field`` collects the per-zone scores and block errors of the same images."""
    records, shown, perception = [], [], SetPerception()
    show = {int(round(i)) for i in np.linspace(0, count - 1, min(max(int(grid_rows), 0), count))}
    for index in tqdm(range(count), desc="evaluate", disable=not progress):
        item = test[index]
        name, sample = item["name"], Sample.of(item)
        context.use_capture_lens(name)
        gt = to_hwc(item["gt"])
        row: dict[str, dict] = {"input": compute_metrics(sample.capture, gt, lpips=lpips)}
        perception.add_reference(gt)
        perception.add("input", sample.capture, gt)
        field.add(name, "input", sample.capture, gt)
        outputs = {}
        for method in rows:
            image, seconds, extra = method.run(context, sample)
            image = outputs[method.name] = quantize(image, 8)
            reference = sample.capture if method.reference == "lr" else gt
            row[method.name] = {**compute_metrics(image, reference, lpips=lpips), "runtime_s": seconds, **extra}
            perception.add(method.name, image, reference)
            field.add(name, method.name, image, reference)
            write_png(images / method.name / f"{name}.png", image)
        records.append({"name": name, "height": gt.shape[0], "width": gt.shape[1],
                        "maps": "maps" in item, "methods": row})
        if index in show:
            shown.append((name, {"gt": gt, "input": sample.capture, **outputs}, row))
    return records, shown, perception.record()


def _lens_grids(data: Path, blur) -> LensGrids | None:
    """Each test image's lens's PSF grid for the models' colour anchors: the grids the spatially
    varying Richardson–Lucy (``blur``, a :class:`~dmdiff.evaluation.baselines.LensBlurs`) already
    loaded, else the dataset's own (None without a ``lens.json``)."""
    return blur.grids if blur is not None else LensGrids.of_dataset(data)


def _lens_spec(data: Path) -> MetalensSpec | None:
    """The dataset's lens (``lens.json``), or None for real captures."""
    lens = read_lens(data)
    return MetalensSpec.from_dict(lens["spec"]) if lens and "spec" in lens else None


def _field_sections(metrics: Mapping, out: Path, into: dict | None = None) -> str:
    """``table.md``'s per-zone and paired-difference sections of one split's report ``metrics``
    (the differences also go into ``into["differences"]``, ``into`` defaulting to ``metrics``);
    draws ``gain_map.png`` into ``out``."""
    labels, field = metrics["labels"], metrics["field"]
    gt_methods = [m for m in metrics["methods"] if metrics["references"][m] == "gt" and m != "vae_ceiling"]
    text = "\n## PSNR / SSIM per field zone\n\n" + format_zone_table(field, labels, gt_methods)
    if "dmdiff_a1" in gt_methods:
        rows = differences_table([metrics], "dmdiff_a1", [m for m in gt_methods if m != "dmdiff_a1"],
                                 zones=(None, "edge"))
        (metrics if into is None else into)["differences"] = rows
        text += "\n## Paired PSNR differences to DMDiff α=1\n\n" + format_differences(rows, labels)
    shown = [m for m in gt_methods if m not in ("input", "color_anchor")]   # the anchor is a low-pass: off the scale
    figure = plot_gain_maps(field, shown, [r for r in ("input", "richardson_lucy", "richardson_lucy_sv")
                                           if r in gt_methods], labels)
    figure.savefig(out / GAIN_FILE, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return text


def _settings(model, pipeline_dir: Path, net, stage1_dir: Path | None, stage1_source: str | None,
              ablation_dirs: Mapping[str, tuple[Path, str]], ablation_pipes: Mapping, methods: Sequence[str],
              correction: str, device: torch.device, limit: int | None, tune_pairs: int) -> dict:
    """``metrics.json``'s ``settings``: what was evaluated and how."""
    ablation_keys = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    return {
        "model": str(model), "pipeline": str(pipeline_dir), "model_config": to_dict(net.config),
        "stage1": None if stage1_dir is None else {"pipeline": str(stage1_dir), "source": stage1_source},
        "ablations": {name: {"method": ablation_method(name), "pipeline": str(path), "source": source,
                             "model_config": to_dict(ablation_pipes[ablation_method(name)].model.config)}
                      for name, (path, source) in ablation_dirs.items()},
        "device": str(device), "dtype": str(net.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "limit": limit, "tune_pairs": tune_pairs,
        "full_frames": True,
        "protocol": "outputs clipped to [0, 1] and rounded to 8 bits before measuring; the saved "
                    "images/<method>/<name>.png hold exactly those pixels",
        "alphas": {"dmdiff_a0": 0.0, **({RECOMMENDED: net.config.recommended_alpha} if RECOMMENDED in methods else {}),
                   "dmdiff_a1": 1.0, **({"dmdiff_a1_cc": 1.0} if "dmdiff_a1_cc" in methods else {}),
                   "dmdiff_a1_x8": 1.0, **{m: 1.0 for m in ablation_keys}},
        "recommended_alpha": net.config.recommended_alpha,
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
        "runtime": "seconds per image after one untimed warm-up; DMDiff α=0, the recommended α and α=1 "
                   "share one restore call (both paths); redecode_s: moving α on cached latents; "
                   "dmdiff_a1_cc: the restore call plus the colour correction; dmdiff_a1_x8: "
                   "its 8 restore calls (the shared α=1 call and 7 turned ones); an ablation: its own restore call",
    }


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    parser.add_argument("--model", required=True, metavar="RUN_OR_PIPELINE",
                        help="training run, recipe run (its stage2/) or pipeline folder")
    parser.add_argument("--data", required=True, metavar="DATASET", help="dataset folder (its test split is evaluated)")
    parser.add_argument("--external", default=None, metavar="DATASET",
                        help="also evaluate the test split of this dataset (e.g. `dmdiff simulate --external`: "
                             "photos no training saw) with the same methods, as a second table")
    parser.add_argument("--out", default=None, help="report folder (default: RUN/eval, or <PIPELINE>-eval)")
    parser.add_argument("--stage1", default=None, metavar="RUN",
                        help="stage-1 (GT → capture) run or pipeline: PSNR of degrade(GT) vs the capture "
                             "(default: a recipe run's stage1/)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=PIPELINE_OR_RUN",
                        help="also evaluate this model at α=1 as ablation_NAME (repeatable; a recipe run's "
                             "ablations/*/pipeline are added automatically)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N test images")
    parser.add_argument("--tune-pairs", type=int, default=8, metavar="N",
                        help="train pairs that tune the Wiener/RL parameters (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--model-path", default=None, help="sd-turbo pipelines: the SD-Turbo folder")
    parser.add_argument("--no-self-ensemble", action="store_true",
                        help="leave out the ×8 self-ensemble row (it restores every image 8 more times)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``dmdiff evaluate`` (args: model, data, out, stage1, ablation, limit, tune_pairs,
    device, threads, model_path, no_self_ensemble, no_progress)."""
    if args.threads is not None:
        if args.threads < 1:
            raise DmdiffError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    metrics = evaluate(args.model, args.data, args.out, stage1=args.stage1,
                       ablations=parse_ablation_args(args.ablation), limit=args.limit,
                       tune_pairs=args.tune_pairs, device=args.device, model_path=args.model_path,
                       external=args.external, self_ensemble=not args.no_self_ensemble,
                       progress=not args.no_progress)
    out = Path(metrics["out"])
    print((out / TABLE_FILE).read_text())
    grids = f"{GRID_FILE}, {ABLATION_GRID_FILE}" if (out / ABLATION_GRID_FILE).is_file() else GRID_FILE
    print(f"dmdiff evaluate: wrote {METRICS_FILE}, {CSV_FILE}, {TABLE_FILE}, {grids} and images/ to {out}")
    return 0
