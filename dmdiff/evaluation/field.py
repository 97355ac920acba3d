"""Field-aware scores: PSNR/SSIM per field zone (centre, mid, edge) and the gain map over the field.

A metalens blurs differently at every field angle, and SVDA's job is the spatially varying part,
so ``dmdiff evaluate`` scores every method in three zones of each frame as well as over the whole
frame, and keeps the squared error per field position to draw where each method gains.

**Field angle of a pixel.** ``dmdiff simulate`` resizes each crop of a photo to the whole sensor, so
a frame *is* the sensor: pixel ``(y, x)`` of an ``H × W`` frame sits at
``((x − (W−1)/2)·S/W, (y − (H−1)/2)·S/H)`` sensor pixels from the optical axis (``S`` the
sensor's ``image_size_px``; ``S/W = 1`` for the dataset's own frames) and sees the field angle
``θ = atan(r · pitch / f)`` (:mod:`dmdiff.optics.grid`, the same geometry as the PSF grid's nodes).
Without a ``lens.json`` (real captures) the distance from the frame centre stands in for ``θ``
(``zones_by: "radius"``), i.e. the same zones for a lens without distortion of ``tan θ``.

**Zones** (:data:`ZONES`), as fractions of the frame's largest field angle ``θ_max`` (its corner;
27.2° for the default lens): centre ``θ < θ_max/3``, mid ``θ_max/3 ≤ θ < 2θ_max/3``, edge
``θ ≥ 2θ_max/3``. For the default lens they hold about 15 %, 48 % and 37 % of the pixels (the
exact fractions are recorded).

**Zone scores.** Zone PSNR: per image, the MSE over the zone's pixels (all channels), then PSNR,
then the mean over images (as the whole-frame PSNR is a mean of per-image PSNRs). Zone SSIM: per
image, the local SSIM map of :func:`dmdiff.metrics.ssim_map` (the same windows as
:func:`dmdiff.metrics.ssim`) averaged over the zone's pixels less the border ``ssim`` leaves out,
then the mean over images.

**Gain map.** The frame is cut into ``cells × cells`` blocks (default 8); per method, the block MSE
is averaged over the images; the gain of a method over a reference (the capture, or a baseline)
is ``10·log10(MSE_reference / MSE_method)`` per block, in dB: positive where the method is better,
drawn by :func:`plot_gain_maps` (``gain_map.png`` in the report).
"""

from __future__ import annotations

import math
import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dmdiff.metrics import ssim_map
from dmdiff.optics.spec import MetalensSpec

__all__ = ["ZONES", "GAIN_CELLS", "GAIN_FILE", "field_angle_map", "zone_masks", "FieldScores", "gain_map",
           "zone_gains", "format_zone_table", "plot_gain_maps"]

#: Zone name → (lower, upper) bound as a fraction of the frame's largest field angle (upper exclusive,
#: except for the edge zone, which includes the corners).
ZONES = {"centre": (0.0, 1 / 3), "mid": (1 / 3, 2 / 3), "edge": (2 / 3, 1.0)}
#: Blocks per side of the gain map.
GAIN_CELLS = 8
#: The gain-map figure of a report.
GAIN_FILE = "gain_map.png"


def field_angle_map(height: int, width: int, spec: MetalensSpec | None) -> np.ndarray:
    """Field angle of every pixel of a frame that covers the whole sensor (module docstring).

    Args:
        height, width: frame size in pixels.
        spec: the lens and sensor; None: the distance from the frame centre in units of its corner
            distance (``[0, 1]``), standing in for the angle.

    Returns:
        float64 ``(H, W)``: degrees, or the relative radius without a spec.
    """
    y = np.arange(height) - (height - 1) / 2
    x = np.arange(width) - (width - 1) / 2
    if spec is None:
        r = np.hypot(*np.meshgrid(x / ((width - 1) / 2 or 1), y / ((height - 1) / 2 or 1)))
        return r / math.sqrt(2)
    s = spec.image_size_px
    r_m = np.hypot(*np.meshgrid(x * s / width, y * s / height)) * spec.pitch_m
    return np.degrees(np.arctan(r_m / spec.sensor_distance_m))


def zone_masks(field: np.ndarray) -> dict[str, np.ndarray]:
    """``{zone: bool (H, W)}`` of :data:`ZONES` on a field-angle map (fractions of its maximum)."""
    relative = field / field.max() if field.max() > 0 else np.zeros_like(field)
    last = list(ZONES)[-1]
    return {zone: (relative >= lo) & ((relative < hi) if zone != last else (relative <= hi))
            for zone, (lo, hi) in ZONES.items()}


def _cells(n: int, cells: int) -> np.ndarray:
    """Block index along an axis of ``n`` pixels cut into ``cells`` blocks."""
    return np.minimum(np.arange(n) * cells // n, cells - 1)


class FieldScores:
    """Collects per-image zone scores and per-block squared errors of every method of a split.

    Args:
        spec: the dataset's lens (None: zones by radius, see the module docstring).
        cells: blocks per side of the gain map.
    """

    def __init__(self, spec: MetalensSpec | None, cells: int = GAIN_CELLS):
        self.spec, self.cells = spec, int(cells)
        self.per_image: dict[str, dict[str, dict]] = {}
        self._sq: dict[str, list[np.ndarray]] = {}
        self._masks: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def masks(self, height: int, width: int) -> dict[str, np.ndarray]:
        """The zone masks of an ``H × W`` frame (cached per size)."""
        if (height, width) not in self._masks:
            self._masks[height, width] = zone_masks(field_angle_map(height, width, self.spec))
        return self._masks[height, width]

    def add(self, name: str, method: str, output: np.ndarray, reference: np.ndarray) -> dict:
        """Score one ``(H, W, 3)`` output against its reference per zone; returns (and keeps)
        ``{zone: {"psnr", "ssim", "mse"}}`` and adds its block MSE to the gain map's sums."""
        output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
        height, width = output.shape[:2]
        masks = self.masks(height, width)
        squared = ((output - reference) ** 2).mean(axis=-1)                  # (H, W)
        local, border = ssim_map(output, reference)
        inside = np.zeros((height, width), bool)
        inside[border:height - border, border:width - border] = True
        scores = {}
        for zone, mask in masks.items():
            mse = float(squared[mask].mean())
            keep = mask & inside
            scores[zone] = {"psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "mse": mse,
                            "ssim": float(local[keep].mean()) if keep.any() else math.nan}
        self.per_image.setdefault(name, {})[method] = scores
        rows, cols = _cells(height, self.cells), _cells(width, self.cells)
        sums = np.zeros((self.cells, self.cells))
        counts = np.zeros((self.cells, self.cells))
        np.add.at(sums, (rows[:, None], cols[None, :]), squared)
        np.add.at(counts, (rows[:, None], cols[None, :]), 1)
        self._sq.setdefault(method, []).append(sums / np.maximum(counts, 1))
        return scores

    def record(self) -> dict:
        """``metrics.json``'s ``field``: the zone definition, per-image and mean zone scores, and
        the mean block MSE per method (``mse_grid``, ``cells × cells``)."""
        some = next(iter(self._masks.values()), None)
        methods = list(self._sq)
        means = {m: {zone: {key: float(np.mean([self.per_image[n][m][zone][key] for n in self.per_image
                                                if m in self.per_image[n]]))
                            for key in ("psnr", "ssim")} for zone in ZONES} for m in methods}
        return {
            "zones": {zone: {"field_fraction": [lo, hi]} for zone, (lo, hi) in ZONES.items()},
            "zones_by": "field angle" if self.spec is not None else "radius",
            "max_field_deg": (float(field_angle_map(*next(iter(self._masks)), self.spec).max())
                              if some is not None and self.spec is not None else None),
            "pixel_fractions": {zone: float(mask.mean()) for zone, mask in some.items()} if some else {},
            "definition": "zone PSNR: per image the MSE over the zone's pixels, then PSNR, then the mean over "
                          "images; zone SSIM: the local SSIM map averaged over the zone (less the SSIM border), "
                          "then the mean over images; zones by fractions of the frame's largest field angle",
            "per_image": self.per_image,
            "means": means,
            "cells": self.cells,
            "mse_grid": {m: np.mean(grids, axis=0).tolist() for m, grids in self._sq.items()},
            "relative_field": self._relative_field(),
        }

    def _relative_field(self, samples: int = 32) -> list:
        """The field as a fraction of its maximum on a ``samples × samples`` grid over the frame (for
        drawing the zone borders on the gain map); empty before any image."""
        if not self._masks:
            return []
        field = field_angle_map(samples, samples, self.spec)
        return (field / field.max()).round(4).tolist()


def gain_map(field: Mapping, method: str, reference: str) -> np.ndarray:
    """``(cells, cells)`` gain in dB of ``method`` over ``reference`` from a ``field`` record
    (:meth:`FieldScores.record`): ``10·log10(MSE_reference / MSE_method)`` per block."""
    grids = field["mse_grid"]
    for key in (method, reference):
        if key not in grids:
            raise KeyError(f"no squared errors of {key!r} in the field record (methods: {sorted(grids)})")
    return 10 * np.log10(np.asarray(grids[reference]) / np.asarray(grids[method]))


def zone_gains(field: Mapping, method: str, reference: str) -> dict[str, float]:
    """``{zone: dB}``: the mean zone PSNR of ``method`` less that of ``reference`` (the mean over
    images of the per-image PSNR gain) from a ``field`` record (:meth:`FieldScores.record`)."""
    means = field["means"]
    for key in (method, reference):
        if key not in means:
            raise KeyError(f"no zone scores of {key!r} in the field record (methods: {sorted(means)})")
    return {zone: means[method][zone]["psnr"] - means[reference][zone]["psnr"] for zone in ZONES}


def format_zone_table(field: Mapping, labels: Mapping[str, str], methods: Sequence[str] | None = None) -> str:
    """A markdown table of the mean PSNR / SSIM per zone of each method (and the zone definition)."""
    methods = [m for m in (methods or field["means"]) if m in field["means"]]
    zones = list(ZONES)
    header = "| method | " + " | ".join(f"PSNR {z}" for z in zones) + " | " + " | ".join(f"SSIM {z}" for z in zones)
    lines = [header + " |", "|---" * (1 + 2 * len(zones)) + "|"]
    for m in methods:
        cells = [f"{field['means'][m][z]['psnr']:.2f}" for z in zones]
        cells += [f"{field['means'][m][z]['ssim']:.4f}" for z in zones]
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    bounds = ", ".join(f"{z} {lo:.2g}–{hi:.2g}" for z, (lo, hi) in ZONES.items())
    share = ", ".join(f"{z} {100 * f:.0f} %" for z, f in field.get("pixel_fractions", {}).items())
    by = field.get("zones_by", "field angle")
    top = field.get("max_field_deg")
    largest = f"the frame's largest ({top:.1f}°)" if top else "the frame's largest"
    definition = field["definition"][0].upper() + field["definition"][1:]
    note = f"Zones by {by} as fractions of {largest}: {bounds}; pixels {share}. {definition}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_gain_maps(field: Mapping, methods: Sequence[str], references: Sequence[str],
                   labels: Mapping[str, str] | None = None, limit_db: float | None = None):
    """The gain over the field of each of ``methods`` (columns) against each of ``references``
    (rows), in dB (:func:`gain_map`), with the zone borders drawn; one symmetric colour scale for
    all panels, ``limit_db`` or the 95th percentile of ``|gain|`` over the panels (outliers such as
    the colour anchor alone saturate rather than flatten the rest); returns the figure."""
    labels = labels or {}
    methods = [m for m in methods if m in field["mse_grid"]]
    references = [r for r in references if r in field["mse_grid"]]
    maps = {(r, m): gain_map(field, m, r) for r in references for m in methods if m != r}
    scale = limit_db or max(float(np.quantile(np.abs(np.concatenate([g.ravel() for g in maps.values()])), 0.95))
                            if maps else 1.0, 0.1)
    fig, axes = plt.subplots(len(references), len(methods), squeeze=False,
                             figsize=(1.5 * len(methods) + 1.5, 1.7 * len(references) + 0.8))
    relative = np.asarray(field.get("relative_field", []), dtype=np.float64)
    image = None
    for (row, reference), (col, method) in ((rc, mc) for rc in enumerate(references) for mc in enumerate(methods)):
        ax = axes[row, col]
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(f"vs {reference}", fontsize=7)
        if row == 0:
            ax.set_title(method, fontsize=6)
        gains = maps.get((reference, method))
        if gains is None:
            ax.set_frame_on(False)
            continue
        image = ax.imshow(gains, cmap="RdBu", vmin=-scale, vmax=scale)
        if relative.size:
            n, cells = relative.shape[0], gains.shape[0]
            coords = (np.arange(n) + 0.5) * cells / n - 0.5
            ax.contour(coords, coords, relative, levels=[b for _, b in list(ZONES.values())[:-1]],
                       colors="k", linewidths=0.5)
        overall = 10 * np.log10(np.mean(field["mse_grid"][reference]) / np.mean(field["mse_grid"][method]))
        ax.text(0.5, -0.08, f"{overall:+.2f} dB", transform=ax.transAxes, ha="center", va="top", fontsize=6)
    title = ("gain over the field: 10·log10(MSE_ref / MSE_method) per block, mean over images; "
             "frame centre = optical axis, lines = zone borders; under each panel the gain of the mean MSE")
    width_chars = int(fig.get_figwidth() * 72 / (0.55 * 7))      # about what a 7-pt line holds across the figure
    lines = textwrap.wrap(title, max(width_chars, 40))
    fig.suptitle("\n".join(lines), fontsize=7)
    fig.subplots_adjust(top=1 - (0.12 * len(lines) + 0.3) / fig.get_figheight())   # inches: title lines, panel titles
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, extend="both", label="gain (dB)")
    return fig
