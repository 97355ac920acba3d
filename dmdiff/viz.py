"""Figure helpers shared by the notebooks: image grids, map grids, training curves (also live),
saving figures and metrics.

All functions take numpy images ``(H, W, 3)`` or ``(H, W)`` float in ``[0, 1]`` (torch tensors
``(3, H, W)`` are accepted and converted) and return a matplotlib ``Figure``; nothing is shown
or saved unless asked, so the same calls work in JupyterLab and under papermill.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from dmdiff.outputs import atomic_write_text


def as_numpy_image(image) -> np.ndarray:
    """``(H, W, 3)`` / ``(H, W)`` numpy, or ``(3, H, W)`` / ``(1, 3, H, W)`` torch → ``(H, W[, 3])`` numpy."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 4:
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = np.moveaxis(image, 0, -1)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


def image_grid(images: Mapping[str, object], ncols: int | None = None, size: float = 3.0,
               title: str | None = None, zoom: tuple[slice, slice] | None = None) -> plt.Figure:
    """Show named images side by side (optionally all cropped to the same ``zoom`` window)."""
    names = list(images)
    ncols = ncols or min(len(names), 4)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        img = as_numpy_image(images[name])
        if zoom is not None:
            img = img[zoom]
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def map_grid(maps: np.ndarray, names: Sequence[str], units: Sequence[str] | None = None,
             ncols: int = 4, size: float = 2.6, title: str | None = None) -> plt.Figure:
    """Heat maps of ``maps`` ``(C, G, G)`` with one colour bar each (e.g. degradation maps)."""
    maps = np.asarray(maps)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, (ax, name) in enumerate(zip(axes.flat, names)):
        im = ax.imshow(maps[c], cmap="magma")
        ax.set_title(name + (f" [{units[c]}]" if units else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``out_dir/name.png`` and return the path (the notebook still displays it)."""
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def save_metrics(metrics: Mapping, out_dir: str | Path, name: str = "metrics") -> Path:
    """Atomically write a notebook's metrics as ``out_dir/name.json``."""
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
    return path


def psf_mosaic(psfs: np.ndarray, channel_names: Sequence[str] = ("R", "G", "B"), gamma: float = 0.4,
               size: float = 3.2, title: str | None = None) -> plt.Figure:
    """Each channel's PSF grid ``(C, G, G, K, K)`` tiled into one picture (display ``value**gamma``).

    Every kernel is scaled by the grid's maximum, so brightness compares across the field.
    """
    psfs = np.asarray(psfs, dtype=np.float64)
    c, g, _, k, _ = psfs.shape
    fig, axes = plt.subplots(1, c, figsize=(size * c, size), squeeze=False)
    for ch, ax in enumerate(axes[0]):
        tiles = psfs[ch] / psfs[ch].max()
        mosaic = np.ones((g * (k + 1) - 1, g * (k + 1) - 1))
        for i in range(g):
            for j in range(g):
                mosaic[i * (k + 1):i * (k + 1) + k, j * (k + 1):j * (k + 1) + k] = tiles[i, j] ** gamma
        ax.imshow(mosaic, cmap="inferno", vmin=0, vmax=1)
        ax.set_title(f"{channel_names[ch]}: {g}×{g} PSFs, {k} px", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: Line colour of each training path in :func:`plot_training`.
PATH_COLOURS = {"positive": "tab:green", "neutral": "tab:blue", "negative": "tab:red"}


def plot_training(stages: Mapping[str, Sequence[Mapping]], fig: plt.Figure | None = None,
                  title: str | None = None) -> plt.Figure:
    """Loss per path (left) and validation PSNR (right) of one or more training stages.

    Args:
        stages: stage name → its ``metrics.jsonl`` records in order
            (:func:`dmdiff.train.rundir.read_metrics`). Train records give the mean loss of each
            path (``path_loss``; runs logged before it existed: the overall ``loss``), validation
            records the PSNR of the validated path's output and of its input against the target.
            The stages are laid end to end on one step axis, a dotted line at each stage's start.
        fig: a figure to clear and draw into (live updates, :class:`TrainingMonitor`); None: a new
            pyplot figure.
        title: the figure's title.
    """
    if fig is None:
        fig = plt.figure(figsize=(11, 3.8))
    fig.clear()
    ax_loss, ax_val = fig.subplots(1, 2)
    offset, labelled = 0, set()
    for stage, records in stages.items():
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val"]
        if offset:
            for ax in (ax_loss, ax_val):
                ax.axvline(offset, color="gray", lw=0.8, ls=":")
        if records:
            first = offset + min(r["step"] for r in records)
            ax_loss.annotate(stage, (first, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -12),
                             textcoords="offset points", fontsize=8, color="gray", annotation_clip=True)
        for path, colour in (*PATH_COLOURS.items(), ("all paths", "black")):
            if path == "all paths":
                points = [(r["step"], r["loss"]) for r in train if "path_loss" not in r]
            else:
                points = [(r["step"], r["path_loss"][path]) for r in train if path in r.get("path_loss", {})]
            if points:
                steps, values = zip(*points)
                ax_loss.plot([s + offset for s in steps], values, ".-", color=colour, lw=1, ms=3,
                             label=None if path in labelled else path)
                labelled.add(path)
        for path in dict.fromkeys(r["path"] for r in val):
            rows = [r for r in val if r["path"] == path]
            steps = [r["step"] + offset for r in rows]
            colour = PATH_COLOURS.get(path, "black")
            ax_val.plot(steps, [r["psnr"] for r in rows], "o-", color=colour, ms=4, label=f"{stage}: {path} output")
            ax_val.plot(steps, [r["psnr_input"] for r in rows], "--", color=colour, lw=0.8,
                        label=f"{stage}: {path} input")
        offset += max((r["step"] for r in records), default=0)
    ax_loss.set(xlabel="step (stages end to end)", ylabel="training loss", title="loss per path")
    if labelled:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    ax_val.set(xlabel="step (stages end to end)", ylabel="PSNR (dB)", title="validation: output and input vs target")
    if ax_val.lines:
        ax_val.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class TrainingMonitor:
    """A live :func:`plot_training` figure for a notebook: pass it as ``on_log`` to
    :func:`dmdiff.train.loop.train` or :func:`dmdiff.train.recipe.run_recipe`.

    Each call stores the record (under its ``"stage"``, else ``default_stage``) and, at most every
    ``min_interval_s`` seconds, redraws the figure and replaces the cell's displayed copy through an
    IPython display handle (papermill records the last version). :meth:`close` draws the final state.
    The figure is not a pyplot one, so the notebook does not show it a second time at the cell's end.
    """

    def __init__(self, min_interval_s: float = 2.0, title: str | None = None, default_stage: str = "train"):
        self.min_interval_s, self.title, self.default_stage = min_interval_s, title, default_stage
        self.records: dict[str, list[dict]] = {}
        self.fig = Figure(figsize=(11, 3.8))
        self._handle = None
        self._last = -math.inf

    def __call__(self, step: int, record: Mapping) -> None:
        self.records.setdefault(record.get("stage", self.default_stage), []).append(dict(record))
        if time.monotonic() - self._last >= self.min_interval_s:
            self.refresh()

    def refresh(self) -> None:
        """Redraw the figure and update (or first show) its displayed copy."""
        from IPython.display import display  # local: only inside a notebook

        plot_training(self.records, fig=self.fig, title=self.title)
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)
        self._last = time.monotonic()

    def close(self) -> None:
        """Draw the final state (when anything was logged)."""
        if self.records:
            self.refresh()
