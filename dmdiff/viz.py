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
from dmdiff.perception import radial_power_spectrum


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


def add_scale_bar(ax: plt.Axes, length_px: float, label: str, colour: str = "white") -> None:
    """Draw a scale bar of ``length_px`` image pixels with ``label`` in the lower left of an image axis."""
    x0, x1 = sorted(ax.get_xlim())
    y_bottom = max(ax.get_ylim())
    width = x1 - x0
    x, y = x0 + 0.06 * width, y_bottom - 0.07 * width
    ax.plot([x, x + length_px], [y, y], color=colour, lw=3, solid_capstyle="butt")
    ax.text(x + length_px / 2, y - 0.03 * width, label, color=colour, ha="center", va="bottom", fontsize=8)


def image_grid(images: Mapping[str, object], ncols: int | None = None, size: float = 3.0,
               title: str | None = None, zoom: tuple[slice, slice] | None = None,
               scale_bar: tuple[float, str] | None = None) -> plt.Figure:
    """Show named images side by side (optionally all cropped to the same ``zoom`` window).

    ``scale_bar``: ``(length_px, label)``, e.g. ``(20e-6 / pitch_m, "20 µm")``, drawn on every panel.
    """
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
        if scale_bar is not None:
            add_scale_bar(ax, *scale_bar)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def map_grid(maps: np.ndarray, names: Sequence[str], units: Sequence[str] | None = None,
             ncols: int = 4, size: float = 2.6, title: str | None = None) -> plt.Figure:
    """Heat maps of ``maps`` ``(C, G, G)`` with one colour bar each (e.g. degradation maps).

    A map that is constant over the field gets its value written on a flat grey panel instead: a
    colour bar would suggest a variation that is not there.
    """
    maps = np.asarray(maps)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, (ax, name) in enumerate(zip(axes.flat, names)):
        ax.set_title(name + (f" [{units[c]}]" if units else ""), fontsize=9)
        if np.ptp(maps[c]) <= 1e-6 * max(abs(float(maps[c].flat[0])), 1e-12):
            ax.imshow(np.full(maps[c].shape, 0.85), cmap="gray", vmin=0, vmax=1)
            ax.text(0.5, 0.5, f"{float(maps[c].flat[0]):.3g}\nthe same\neverywhere", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9)
            continue
        im = ax.imshow(maps[c], cmap="magma")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def map_rows(rows: Mapping[str, np.ndarray], names: Sequence[str], units: Sequence[str] | None = None,
             size: float = 2.0, title: str | None = None) -> plt.Figure:
    """Maps of several sources side by side, e.g. the degradation maps of two lenses: one row per
    ``rows`` entry (label → ``(C, G, G)``), one column per map name, each column on one colour scale
    (its colour bar under the column), so equal colours mean equal values across the rows."""
    labels = list(rows)
    stacked = np.stack([np.asarray(rows[label], dtype=np.float64) for label in labels])   # (R, C, G, G)
    fig, axes = plt.subplots(len(labels), len(names), figsize=(size * len(names), size * len(labels) + 0.9),
                             squeeze=False)
    for c, name in enumerate(names):
        low, high = float(stacked[:, c].min()), float(stacked[:, c].max())
        high = high if high > low else low + max(abs(low), 1e-12) * 1e-3
        for r, label in enumerate(labels):
            ax = axes[r, c]
            image = ax.imshow(stacked[r, c], cmap="magma", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name + (f" [{units[c]}]" if units else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
        fig.colorbar(image, ax=axes[:, c].tolist(), orientation="horizontal", fraction=0.08, pad=0.04)
    if title:
        fig.suptitle(title)
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
               size: float = 3.2, title: str | None = None, pitch_m: float | None = None) -> plt.Figure:
    """Each channel's PSF grid ``(C, G, G, K, K)`` tiled into one picture (display ``value**gamma``).

    Every kernel is scaled by the grid's maximum, so brightness compares across the field. With the
    sensor ``pitch_m`` a scale bar (a round number of µm, about a third of a kernel) is drawn.
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
        if pitch_m is not None:
            microns = round_length(k * pitch_m * 1e6 / 3)
            add_scale_bar(ax, microns * 1e-6 / pitch_m, f"{microns:g} µm")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def round_length(value: float) -> float:
    """The largest of 1, 2, 5 × 10^n not above ``value`` (> 0): a scale bar's length."""
    power = 10.0 ** math.floor(math.log10(value))
    return max(m * power for m in (1, 2, 5) if m * power <= value)


def small_multiples(x: np.ndarray, curves: Mapping[str, np.ndarray], xlabel: str, ylabel: str,
                    ncols: int | None = None, size: tuple[float, float] = (3.4, 2.4),
                    title: str | None = None, yticks: Sequence[float] | None = None,
                    yticklabels: Sequence[str] | None = None) -> plt.Figure:
    """One small panel per named curve over the same ``x`` (shared axes), so none hides another."""
    names = list(curves)
    ncols = ncols or len(names)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             sharex=True, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ax.plot(x, curves[name], lw=0.7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        if yticks is not None:
            ax.set_yticks(yticks, yticklabels)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: Line colour of each training path in :func:`plot_training`.
PATH_COLOURS = {"positive": "tab:green", "neutral": "tab:blue", "negative": "tab:red"}


def plot_training(stages: Mapping[str, Sequence[Mapping]], fig: plt.Figure | None = None,
                  title: str | None = None, stage_axes: bool = False) -> plt.Figure:
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
        stage_axes: give each stage's losses an axis of its own (one per stage, left of the
            validation axis, which stays last), for stages whose losses have different terms or
            weights and so no common scale; False: all losses on one axis.
    """
    names = list(stages)
    n_loss = max(len(names), 1) if stage_axes else 1
    if fig is None:
        fig = plt.figure(figsize=(11 + 4 * (n_loss - 1), 3.8))
    fig.clear()
    *loss_axes, ax_val = fig.subplots(1, n_loss + 1)
    offset, labelled = 0, set()
    for index, (stage, records) in enumerate(stages.items()):
        ax_loss = loss_axes[index if stage_axes else 0]
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val"]
        if offset:
            for ax in (ax_val,) if stage_axes else (ax_loss, ax_val):
                ax.axvline(offset, color="gray", lw=0.8, ls=":")
        if stage_axes:
            labelled = set()
        shift = 0 if stage_axes else offset      # a stage's own axis counts its own steps
        if records and not stage_axes:
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
                ax_loss.plot([s + shift for s in steps], values, ".-", color=colour, lw=1, ms=3,
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
        if stage_axes:
            ax_loss.set(xlabel=f"{stage} step", ylabel="training loss",
                        title=f"{stage}: loss per path (its own terms and scale)")
            if labelled:
                ax_loss.set_yscale("log")
                ax_loss.legend(fontsize=8)
    if not stage_axes:
        ax_loss = loss_axes[0]
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


def plot_power_spectra(image_sets: Mapping[str, Sequence], band: tuple[float, float] | None = None,
                       title: str | None = None) -> plt.Figure:
    """Radially averaged power spectra of the luminance, one line per named set of images, each the
    mean over the set's frames (:func:`dmdiff.perception.radial_power_spectrum`), on a log y axis.

    Args:
        image_sets: name → its images (numpy ``(H, W, 3)`` or torch ``(3, H, W)``, in ``[0, 1]``);
            the frames of one set share one size. The DC annulus (0 after mean removal) is not drawn.
        band: ``(low, high)`` in cycles/pixel to shade (e.g. :data:`dmdiff.perception.DETAIL_BAND`);
            None: no shading.
        title: the axes' title.
    """

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if band is not None:
        ax.axvspan(*band, color="gold", alpha=0.25, label=f"detail band {band[0]:g}–{band[1]:g} cycles/px")
    for name, images in image_sets.items():
        spectra = [radial_power_spectrum(as_numpy_image(image)) for image in images]
        power = np.mean([p for _, p in spectra], axis=0)
        ax.semilogy(spectra[0][0][1:], np.where(power[1:] > 0, power[1:], np.nan), lw=1.4,
                    label=f"{name} ({len(spectra)} frame{'s' if len(spectra) != 1 else ''})")
    ax.set(xlabel="spatial frequency (cycles/pixel; 0.5 = Nyquist)", ylabel="power (luminance², log)",
           xlim=(0, 0.5), title=title or "radially averaged power spectra")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def difference_figure(first, second, labels: tuple[str, str] = ("first", "second"), factor: float = 8.0,
                      zoom: tuple[slice, slice] | None = None, size: float = 3.2,
                      title: str | None = None) -> plt.Figure:
    """Two images side by side and their amplified difference ``|second − first| × factor``
    (per channel, clipped to 1; say the factor wherever the figure is shown).

    With ``zoom`` (a ``(rows, cols)`` slice pair), a second row shows the same three panels cropped
    to that window (nearest-neighbour, so pixels stay pixels) and the window is outlined above.
    """
    from matplotlib.patches import Rectangle

    a, b = as_numpy_image(first), as_numpy_image(second)
    panels = {labels[0]: a, labels[1]: b,
              f"|{labels[1]} − {labels[0]}| × {factor:g}": np.clip(np.abs(b - a) * factor, 0, 1)}
    windows = [None] if zoom is None else [None, zoom]
    fig, axes = plt.subplots(len(windows), 3, figsize=(3 * size, size * len(windows)), squeeze=False)
    for row, window in zip(axes, windows):
        for ax, (name, image) in zip(row, panels.items()):
            ax.imshow(np.clip(image if window is None else image[window], 0, 1), interpolation="nearest")
            ax.set_title(name + ("" if window is None else " (zoom)"), fontsize=9)
            ax.axis("off")
            if window is not None:
                rows, cols = window
                axes[0][list(panels).index(name)].add_patch(Rectangle(
                    (cols.start or 0, rows.start or 0), (cols.stop or a.shape[1]) - (cols.start or 0),
                    (rows.stop or a.shape[0]) - (rows.start or 0), fill=False, ec="white", lw=1, ls="--"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _sweep_limits(x: np.ndarray, y: np.ndarray, include_y: Sequence[float] = ()) -> tuple[tuple, tuple]:
    """Axis limits ``(xlim, ylim)`` around the sweep's points (and the ``include_y`` levels), with a
    margin of a tenth of each span (at least 0.05 dB in x, 2 % of the level in y)."""
    ys = np.concatenate([y, np.asarray(include_y, float)])
    xpad = max(0.1 * np.ptp(x), 0.05)
    ypad = max(0.1 * np.ptp(ys), 0.02 * max(np.abs(ys).max(), 1e-6))
    return (x.min() - xpad, x.max() + xpad), (ys.min() - ypad, ys.max() + ypad)


def _label_alphas(ax, x: np.ndarray, y: np.ndarray, alphas: np.ndarray, label_px: float) -> None:
    """Write ``α=a`` beside each point: consecutive points within ``label_px`` display pixels of
    the first of their run share one label ``α=a…b``, and each label takes the first of four places
    around its point (upper right, lower right, upper left, lower left) where it overlaps no label
    written before it."""
    where, runs = ax.transData.transform(np.column_stack([x, y])), [[0]]
    for i in range(1, len(alphas)):
        if np.hypot(*(where[i] - where[runs[-1][0]])) < label_px:
            runs[-1].append(i)
        else:
            runs.append([i])
    renderer, placed = ax.figure.canvas.get_renderer(), []
    places = [((4, 3), "left", "bottom"), ((4, -3), "left", "top"), ((-4, 3), "right", "bottom"),
              ((-4, -3), "right", "top")]
    for run in runs:
        text = f"α={alphas[run[0]]:g}" + (f"…{alphas[run[-1]]:g}" if len(run) > 1 else "")
        for n, (offset, ha, va) in enumerate(places):
            label = ax.annotate(text, (x[run[0]], y[run[0]]), xytext=offset, textcoords="offset points",
                                fontsize=7, ha=ha, va=va)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or n == len(places) - 1:
                placed.append(box)
                break
            label.remove()


def plot_perception_distortion(sweep: Mapping[str, Sequence], recommended_alpha: float | None = None,
                               capture: Mapping[str, float] | None = None,
                               reference: Sequence[Mapping[str, float]] | None = None,
                               reference_title: str = "reference", label_px: float = 12.0,
                               title: str | None = None) -> plt.Figure:
    """The perception–distortion plane of an α sweep: mean PSNR (x) against each perception-side
    measure of ``sweep`` that has a value at every α — ``niqe_set`` (set-level NIQE, lower: more
    natural) and ``detail_ratio`` (set-level, 1 = the scene's fine detail) — one panel each.

    The axes frame the sweep (and the scene's level 1 of the detail ratio), so the trade-off along α
    is readable; points are joined in α order, coloured and labelled by α without overlapping labels
    (:func:`_label_alphas`); the recommended α is ringed in red. The capture, when given, is a grey
    star where it falls inside the axes, else its figures are given in the legend. ``reference``:
    rows of other figures (e.g. a paper's own), drawn as a table in a last panel titled
    ``reference_title``; not plotted on the axes, since they are other metrics on other data.

    Args:
        sweep: ``{"alpha": [...], "psnr": [...], "niqe_set": [...] or None, "detail_ratio": [...]}``.
        capture: ``{"psnr", "niqe_set", "detail_ratio"}`` of the captures themselves (None values skipped).
    """
    labels = {"niqe_set": "set-level NIQE (lower: more natural)",
              "detail_ratio": "detail ratio vs scene (1: the scene's fine detail)"}
    keys = [k for k in labels if sweep.get(k) is not None and all(v is not None for v in sweep[k])]
    alphas, psnr_db = np.asarray(sweep["alpha"], float), np.asarray(sweep["psnr"], float)
    ncols = max(len(keys) + (reference is not None), 1)
    fig, axes = plt.subplots(1, ncols, figsize=(5.4 * ncols, 4.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        y = np.asarray(sweep[key], float)
        ax.plot(psnr_db, y, "-", color="lightgray", lw=1, zorder=1)
        ax.scatter(psnr_db, y, c=alphas, cmap="viridis", vmin=0.0, vmax=1.2, s=30, zorder=2)
        if recommended_alpha is not None and np.isclose(alphas, recommended_alpha).any():
            i = int(np.argmin(np.abs(alphas - recommended_alpha)))
            ax.plot(psnr_db[i], y[i], "o", ms=14, mfc="none", mec="tab:red", mew=1.6, zorder=3,
                    label=f"recommended α = {recommended_alpha:g} (chosen on val)")
        xlim, ylim = _sweep_limits(psnr_db, y, [1.0] if key == "detail_ratio" else [])
        if key == "detail_ratio":
            ax.axhline(1.0, color="gray", ls=":", lw=1)
        if capture and capture.get(key) is not None:
            cx, cy = capture["psnr"], capture[key]
            if xlim[0] <= cx <= xlim[1] and ylim[0] <= cy <= ylim[1]:
                ax.plot(cx, cy, "*", color="gray", ms=12, label="capture")
            else:
                ax.plot([], [], "*", color="gray", ms=12, label=f"capture: {cx:.2f} dB, {cy:.2f} (off the axes)")
        ax.set(xlabel="mean PSNR vs scene (dB): fidelity →", ylabel=labels[key], xlim=xlim, ylim=ylim)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if reference is not None:
        ax = axes[0][-1]
        ax.axis("off")
        columns = list(reference[0])
        table = ax.table(cellText=[[f"{row[c]:g}" for c in columns] for row in reference], colLabels=columns,
                         loc="center", cellLoc="center")
        table.scale(1, 1.6)
        ax.set_title(reference_title, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    for ax, key in zip(axes[0], keys):                 # labels placed in the final layout's pixels
        _label_alphas(ax, psnr_db, np.asarray(sweep[key], float), alphas, label_px)
    return fig
