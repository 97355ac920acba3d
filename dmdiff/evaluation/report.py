"""The evaluation report: the quality bar, the markdown table, the CSV and the image grids.

Everything here reads a ``metrics.json`` record (:func:`dmdiff.evaluation.job.evaluate`) or the
per-image records it is made of, so a report can be redrawn from a saved evaluation:
:func:`format_table` (the markdown report, with :func:`quality_bar_lines`), :func:`csv_text`,
:func:`write_grids` and :func:`plot_spread` (per-image PSNR and runtime). :class:`SetPerception`
gathers, while the images go by, the set-level perception figures of ``metrics.json``'s
``perception`` (:mod:`dmdiff.perception`; docs/perception.md):

* **set-level NIQE** of each method's outputs and of the ground truth: the 96-px patches of all
  the split's images pooled into one fit (256-px frames give 4 patches each, too few for a
  per-image NIQE); lower is closer to the statistics of pristine photos;
* the **set-level detail ratio** of each method against its reference (the "vs" column: the
  ground truth, or the capture for the learned degradation): the summed luminance variance in
  :data:`dmdiff.perception.DETAIL_BAND` of the outputs over that of the references; 1 = the
  reference's fine detail, < 1 smoother, > 1 more (noise and invented texture count too).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dmdiff.errors import DmdiffError
from dmdiff.evaluation.methods import (
    ABLATION_PREFIX,
    BASELINES,
    DEGRADE,
    LABELS,
    REFERENCES,
    ablation_label,
)
from dmdiff.perception import (
    DETAIL_BAND,
    NIQE_PACKAGE,
    NIQE_PATCH_PX,
    band_variance,
    niqe_features,
    niqe_from_features,
    niqe_model,
)
from dmdiff.viz import image_grid, save_figure

__all__ = ["METRICS_FILE", "CSV_FILE", "TABLE_FILE", "GRID_FILE", "ABLATION_GRID_FILE", "IMAGES_DIR",
           "QUALITY_BAR", "BAR_VARIANTS", "quality_bar", "quality_bar_lines", "format_table", "csv_text",
           "write_grids", "plot_spread", "OFF_GAIN_AXIS", "NIQE_COLUMN", "detail_column", "SetPerception"]

METRICS_FILE, CSV_FILE, TABLE_FILE, GRID_FILE = "metrics.json", "metrics.csv", "table.md", "grid.png"
ABLATION_GRID_FILE = "grid_ablations.png"
IMAGES_DIR = "images"
#: The quality bar: positive-path PSNR ≥ input + 3 dB and ≥ max(Wiener, RL) + 1 dB.
QUALITY_BAR = {"over_input_db": 3.0, "over_baselines_db": 1.0}
#: Variants of the positive path reported beside the bar (not the bar's figure):
#: method → (metrics.json key of its bar figures, what the report calls it).
BAR_VARIANTS = {"dmdiff_a1_cc": ("quality_bar_color_corrected", "dmdiff restore's colour correction"),
                "dmdiff_a1_x8": ("quality_bar_self_ensemble", "the ×8 self-ensemble (`dmdiff restore --self-ensemble`)")}


#: The table's NIQE column.
NIQE_COLUMN = "NIQE (set-level, lower is better)"


def detail_column(band) -> str:
    """The table's detail-ratio column for ``band`` (cycles/pixel)."""
    return f"detail ratio (band {band[0]:g}–{band[1]:g} cycles/px, vs ref.)"


class SetPerception:
    """The set-level perception figures of one split, gathered image by image.

    Per image, :meth:`add_reference` takes the ground truth and :meth:`add` each method's 8-bit
    output with its reference; :meth:`record` gives ``metrics.json``'s ``perception``. Only NIQE's
    patch features (``(4, 36)`` per 256-px image) and two band variances per output are kept.
    """

    def __init__(self, band=DETAIL_BAND):
        self.band = tuple(float(b) for b in band)
        try:
            niqe_model()
            self.unavailable: str | None = None
        except DmdiffError as e:
            self.unavailable = str(e)
        self.count = 0
        self.features: dict[str, list[np.ndarray]] = {}
        self.energy: dict[str, list[tuple[float, float]]] = {}

    def _features(self, key: str, image: np.ndarray) -> None:
        if self.unavailable is None and min(image.shape[:2]) < NIQE_PATCH_PX:
            self.unavailable = (f"a {image.shape[0]} × {image.shape[1]} px image is smaller than one "
                                f"{NIQE_PATCH_PX}-px NIQE patch")
        if self.unavailable is None:
            self.features.setdefault(key, []).append(niqe_features(image))

    def add_reference(self, gt: np.ndarray) -> None:
        """The next image's ground truth, float ``(H, W, 3)`` in ``[0, 1]`` (the NIQE reference line)."""
        self.count += 1
        self._features("gt", gt)

    def add(self, method: str, output: np.ndarray, reference: np.ndarray) -> None:
        """One output of ``method`` and its reference, float ``(H, W, 3)`` in ``[0, 1]``."""
        self._features(method, output)
        pair = (band_variance(output, self.band), band_variance(reference, self.band))
        self.energy.setdefault(method, []).append(pair)

    def _niqe(self, key: str) -> dict:
        """``{"niqe_set", "patches"}`` of ``key``'s pooled patches (None and 0 when unavailable)."""
        if self.unavailable is not None or sum(len(f) for f in self.features.get(key, [])) < 2:
            return {"niqe_set": None, "patches": 0}
        pooled = np.vstack(self.features[key])
        return {"niqe_set": niqe_from_features(pooled), "patches": int(len(pooled))}

    def record(self) -> dict:
        """``{"niqe", "niqe_unavailable", "detail", "detail_band_cpp", "count", "gt": {"niqe_set",
        "patches"}, "methods": {method: {"niqe_set", "patches", "detail_ratio"}}}``; a figure that
        cannot be computed is None (``niqe_unavailable`` says why NIQE is missing)."""
        methods = {}
        for method, pairs in self.energy.items():
            outputs, references = (sum(p[k] for p in pairs) for k in (0, 1))
            methods[method] = {**self._niqe(method), "detail_ratio": outputs / references if references > 0 else None}
        return {
            "niqe": f"set-level NIQE (Mittal et al. 2013; pristine model of {NIQE_PACKAGE}): the {NIQE_PATCH_PX}-px "
                    f"patches of all {self.count} images pooled into one fit; lower is closer to pristine photos",
            "niqe_unavailable": self.unavailable,
            "detail": "set-level detail ratio: summed luminance variance in the band of the outputs / of their "
                      "references (1: the reference's fine detail; < 1 smoother; > 1 more, noise included)",
            "detail_band_cpp": list(self.band), "count": self.count, "gt": self._niqe("gt"), "methods": methods,
        }


def csv_text(records: list[dict], methods: Sequence[str], references: Mapping[str, str]) -> str:
    """``metrics.csv``: one row per image and method (name, method, reference, every figure)."""
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


def write_grids(shown: list, methods: Sequence[str], out: Path) -> list[Path]:
    """``grid.png`` (gt, capture, baselines, DMDiff α = 0 / 1) and, with ablations,
    ``grid_ablations.png`` (gt, capture, DMDiff α = 1, each ablation) of the ``shown`` images."""
    titles = {"gt": "ground truth", "input": "capture", "wiener": "Wiener", "richardson_lucy": "Richardson–Lucy",
              "dmdiff_a0": "DMDiff α=0", "dmdiff_a1": "DMDiff α=1"}
    ablations = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    titles.update({method: ablation_label(method[len(ABLATION_PREFIX):], short=True) for method in ablations})
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




def _mean_psnr(metrics: Mapping, method: str) -> float | None:
    value = metrics.get("means", {}).get(method, {}).get("psnr")
    return None if value is None else float(value)


def quality_bar(metrics: Mapping, over_input_db: float = QUALITY_BAR["over_input_db"],
                over_baselines_db: float = QUALITY_BAR["over_baselines_db"], method: str = "dmdiff_a1") -> dict:
    """Check the quality bar on mean RGB PSNR (dB) of the test split.

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


def _verdict(check: Mapping, what: str) -> str:
    """One check of :func:`quality_bar` in words: ``"<what>: PASS (gain …, needs …, margin …)"``."""
    if check["gain_db"] is None:
        return f"{what}: FAIL ({check.get('reason')})"
    return (f"{what}: {'PASS' if check['pass'] else 'FAIL'} (gain {check['gain_db']:+.2f} dB, "
            f"needs {check['required_db']:+.1f}, margin {check['margin_db']:+.2f} dB)")


def _baseline_name(bar: Mapping) -> str:
    """The short name of the bar's best baseline (``"Wiener"``), or ``"best baseline"`` without one."""
    return LABELS[bar["best_baseline"]].split(",")[0] if bar["best_baseline"] else "best baseline"


def quality_bar_lines(bar: Mapping) -> list[str]:
    """The verdict on :func:`quality_bar`'s result, as markdown lines: the overall PASS / FAIL with
    the positive path's mean PSNR (dB), then each check as a list item with its gain, requirement
    and margin in dB (or FAIL and why it could not be measured). :func:`format_table` writes them
    into the report."""
    return [f"Quality bar (positive path {_fmt(bar['positive_psnr'], 2)} dB): {'PASS' if bar['pass'] else 'FAIL'}",
            f"- {_verdict(bar['over_input'], 'over the input')}",
            f"- {_verdict(bar['over_baselines'], f'over {_baseline_name(bar)}')}"]


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def format_table(metrics: Mapping) -> str:
    """The markdown report: a table of means (method × PSNR/SSIM on RGB and Y, LPIPS, runtime)
    with the set-level NIQE and detail ratio of ``metrics["perception"]`` (and a ground-truth
    NIQE line) when the record has them, the learned-degradation row when present, the tuned
    baseline parameters and the quality bar."""
    means, methods = metrics["means"], metrics["methods"]
    labels, references = {**LABELS, **metrics.get("labels", {})}, {**REFERENCES, **metrics.get("references", {})}
    lpips = metrics.get("lpips", {})
    lpips_key = f"lpips_{lpips['net']}" if lpips.get("available") else None
    perception = metrics.get("perception", {})
    seen = perception.get("methods", {})
    band = perception.get("detail_band_cpp", DETAIL_BAND)
    lines = [f"## Held-out evaluation: {metrics['count']} test images of {metrics['dataset']} (full frames)", "",
             "| method | vs | PSNR (dB) | PSNR-Y (dB) | SSIM | SSIM-Y | LPIPS | runtime (s/img) "
             f"| {NIQE_COLUMN} | {detail_column(band)} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if perception:
        lines.append(f"| ground truth (NIQE reference) | – | – | – | – | – | – | – "
                     f"| {_fmt(perception['gt']['niqe_set'], 2)} | – |")
    for method in methods:
        m = means[method]
        lp = _fmt(m.get(lpips_key), 4) if lpips_key else "unavailable"
        runtime = _fmt(m.get("runtime_s"), 4)
        if m.get("redecode_s") is not None:
            runtime += f" (α change: {_fmt(m['redecode_s'], 4)})"
        p = seen.get(method, {})
        lines.append(f"| {labels[method]} | {references[method]} | {_fmt(m.get('psnr'), 2)} | "
                     f"{_fmt(m.get('psnr_y'), 2)} | {_fmt(m.get('ssim'), 4)} | {_fmt(m.get('ssim_y'), 4)} | "
                     f"{lp} | {runtime} | {_fmt(p.get('niqe_set'), 2)} | {_fmt(p.get('detail_ratio'), 3)} |")
    lines.append("")
    if not lpips_key:
        lines += [f"LPIPS: unavailable ({lpips.get('reason', 'unknown reason')})", ""]
    if perception:
        niqe_note = (f"unavailable ({perception['niqe_unavailable']})" if perception["niqe_unavailable"] else
                     f"{perception['niqe']} ({perception['gt']['patches']} patches per method)")
        lines += [f"NIQE: {niqe_note}. Detail ratio: {perception['detail']}; band {band[0]:g}–{band[1]:g} "
                  "cycles/pixel (docs/perception.md). Neither is LPIPS.", ""]
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
    best = _baseline_name(bar)
    lines += [*quality_bar_lines(bar), ""]
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


#: Rows of :func:`plot_spread` kept off its gain axis (not restorations of the capture).
OFF_GAIN_AXIS = ("vae_ceiling", "color_anchor")


def plot_spread(metrics: Mapping, seed: int = 0):
    """Per-image spread of an evaluation: PSNR, paired gain over the capture, runtime. Returns a
    matplotlib ``Figure`` of three panels sharing one row per method (the table's order, top down):

    * every image's PSNR against the ground truth (dB; box: quartiles, dots: images);
    * each image's PSNR minus the capture's on the same image (dB; dotted line: no gain); its axis
      spans the restorations only: a row that is not a restoration of the capture
      (:data:`OFF_GAIN_AXIS`: the VAE ceiling, the colour anchor alone) is drawn only where all its
      gains fall inside that span; otherwise it would stretch the axis and hide the differences
      between the others, so its mean gain is written in the row instead;
    * seconds per image (log scale; bar: mean, whiskers: min–max over the images), for the
      methods that were timed.

    Only methods measured against the ground truth are shown (not the stage-1 degradation row).

    Args:
        metrics: a ``metrics.json`` record of :func:`dmdiff.evaluation.job.evaluate` (``methods``,
            ``references``, ``labels``, ``means``, ``per_image``, ``count``; the ``input`` method).
        seed: of the dots' vertical jitter.
    """
    shown = [m for m in metrics["methods"] if metrics["references"][m] == "gt"]
    labels = [metrics["labels"][m] for m in shown]
    per_image = {m: np.array([r["methods"][m]["psnr"] for r in metrics["per_image"]]) for m in shown}
    gain = {m: per_image[m] - per_image["input"] for m in shown}
    timed = [m for m in shown if "runtime_s" in metrics["means"][m]]
    seconds = {m: np.array([r["methods"][m]["runtime_s"] for r in metrics["per_image"]]) for m in timed}

    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(shown) + 2.2), sharey=True,
                             gridspec_kw={"width_ratios": [1, 1, 0.7]})
    scaled = np.concatenate([gain[m] for m in shown if m not in OFF_GAIN_AXIS] or [np.zeros(1)])
    low, high = min(scaled.min(), 0.0), max(scaled.max(), 0.0)
    pad = 0.08 * (high - low or 1.0)
    on_gain_axis = [m for m in shown if m not in OFF_GAIN_AXIS
                    or (gain[m].min() >= low - pad and gain[m].max() <= high + pad)]
    rng = np.random.default_rng(seed)
    for ax, values, drawn, xlabel in ((axes[0], per_image, shown, "PSNR vs ground truth (dB)"),
                                      (axes[1], gain, on_gain_axis, "PSNR − capture's PSNR, same image (dB)")):
        rows = [shown.index(m) + 1 for m in drawn]
        ax.boxplot([values[m] for m in drawn], positions=rows, orientation="horizontal", widths=0.6,
                   showfliers=False, manage_ticks=False)
        for row, m in zip(rows, drawn):
            ax.plot(values[m], row + rng.uniform(-0.15, 0.15, len(values[m])), "o", ms=3, alpha=0.6)
        ax.set(xlabel=xlabel)
    axes[0].set(yticks=range(1, len(shown) + 1), yticklabels=labels, ylim=(0.5, len(shown) + 0.5))
    axes[0].invert_yaxis()   # shared: the table's order, top to bottom
    axes[1].axvline(0, color="k", lw=0.8, ls=":")
    axes[1].set_xlim(low - pad, high + pad)
    for k, m in enumerate(shown):
        if m not in on_gain_axis:
            axes[1].text(0.5, k + 1, f"off this axis: mean {gain[m].mean():+.2f} dB", ha="center", va="center",
                         transform=axes[1].get_yaxis_transform(), fontsize=8, bbox={"fc": "white", "ec": "0.7"})
    rows = [k + 1 for k, m in enumerate(shown) if m in seconds]
    means = np.array([seconds[m].mean() for m in timed])
    spread = np.array([[means[k] - seconds[m].min(), seconds[m].max() - means[k]] for k, m in enumerate(timed)]).T
    axes[2].barh(rows, means, xerr=spread, color="tab:gray")
    axes[2].set(xscale="log", xlabel="seconds per image (log; capture: none)")
    fig.suptitle(f"{metrics['count']} held-out test images: per-image PSNR, paired gain over the capture, runtime")
    fig.tight_layout()
    return fig
