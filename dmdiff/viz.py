"""Figure helpers shared by the notebooks: image grids, map grids, saving figures and metrics.

All functions take numpy images ``(H, W, 3)`` or ``(H, W)`` float in ``[0, 1]`` (torch tensors
``(3, H, W)`` are accepted and converted) and return a matplotlib ``Figure``; nothing is shown
or saved unless asked, so the same calls work in JupyterLab and under papermill.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dmdiff.runinfo import atomic_write_text


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
