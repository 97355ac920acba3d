"""Classical restoration baselines for metalens captures: Wiener and Richardson–Lucy deconvolution,
and the tuning of their one parameter on training pairs; and Richardson–Lucy with the lens's whole
PSF grid (:func:`richardson_lucy_sv`), tuned on the validation split.

Both deconvolve each colour channel with one shift-invariant PSF — for metalens captures, the true
**central** PSF (:func:`dmdiff.optics.deconvolution.central_psf`: the on-axis grid node), so they ignore that the real blur
varies over the field; that, and the lack of any image prior beyond a noise-to-signal ratio or
early stopping, is what a learned method is compared against.

Pipeline (per channel, numpy float64):

1. sRGB → linear light (:func:`dmdiff.optics.sensor.srgb_to_linear`, input clipped to ``[0, 1]``),
   because blur acts on light, not on gamma-encoded values.
2. Deconvolve with the channel's PSF renormalised to sum 1 (see boundaries below).
3. Clip to ``[0, 1]``, linear → sRGB. Output float32 ``(H, W, 3)``.

**White-balance assumption.** A PSF window holds only the fraction ``Σh < 1`` of the light (the
rest is unfocused haze; see :mod:`dmdiff.optics.camera`), and the camera then white-balances so
that a uniform white scene comes out white (``MetalensCamera.wb_gains``, a flat-field
calibration). So the white-balanced capture has unit gain at zero frequency in every channel,
which is why each PSF is renormalised to sum 1 here: the deconvolution then keeps the mean
brightness and colour of the capture. The haze itself is not in the window PSF, so these
baselines leave the veil it causes (lower contrast at large scales, strongest in R and B) in place.
Real captures white-balanced differently violate this only by a per-channel gain.

**Boundaries.** FFT deconvolution assumes a periodic image, and the jump between opposite borders
of a photo makes ringing; zero padding (what ``scipy.signal.convolve(mode="same")`` and hence
``skimage.restoration.richardson_lucy`` do) makes dark-border errors that RL spreads inwards by
about ``K/2`` pixels per iteration (measured: 1.6 % of the grey level at the border after 80
iterations with a ``K`` -pixel reflect pad). Both baselines therefore work on the image's **even
(mirror) extension** — the image followed by its reflection, ``2H − 2`` by ``2W − 2`` pixels,
reflecting without repeating the edge pixel like ``numpy.pad(mode="reflect")`` — which is periodic
and continuous, so circular convolution by FFT has no border jump. For a PSF symmetric under
horizontal and vertical flips (the on-axis PSF of a rotationally symmetric lens) this is exactly
the reflect-padded blur of ``dmdiff.optics.blur``, and a uniform capture is restored uniform.
Wiener uses ``skimage.restoration.wiener`` on that extension. Richardson–Lucy is scikit-image's
algorithm (same update, same constant 0.5 start, same ``1e-12`` guard) with circular FFT
convolutions on the extension (:mod:`dmdiff.optics.deconvolution`, shared with the model's
deconvolved colour anchor); the tests check it against ``skimage.restoration.richardson_lucy``
away from the borders. Doing the iterations here also lets :func:`tune_baseline` read every
candidate iteration count off one run.

**Spatially varying Richardson–Lucy** (:func:`richardson_lucy_sv`) knows what SVDA knows: the
true PSF of every grid node, interpolated between nodes exactly as the simulation blurred
(:class:`dmdiff.optics.blur.SpatiallyVaryingBlur`, reflect padding, each node's kernel normalised
to sum 1 as above), and deconvolves with that operator and its adjoint
(:func:`dmdiff.optics.deconvolution.richardson_lucy_varying`). Geometry: ``dmdiff simulate``
crops a *photo* and resizes the crop to the whole sensor before the camera sees it, so every
frame is a full sensor image and the grid's nodes sit on the frame as on the sensor (a frame of
another size is taken to cover the whole sensor, the nodes scaled with it). Its iteration count is
tuned on the **validation** split (``gt_val``/``lr_val``; the train split only for datasets
without one) by mean RGB PSNR (:func:`tune_richardson_lucy_sv`). Cost on a 2-core CPU at
256² with the default 7 × 7 grid of 63-px kernels: about 0.1 s per iteration and image (a blur and
its adjoint, float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from skimage.restoration import wiener
from tqdm.auto import tqdm

from dmdiff.data.dataset import LensGrids, PairedFolderDataset, has_split
from dmdiff.metrics import psnr
from dmdiff.optics.blur import SpatiallyVaryingBlur
from dmdiff.optics.deconvolution import (
    DeconvolutionInputError,
    check_psf,
    check_psf_grid,
    richardson_lucy_linear,
    richardson_lucy_varying,
)
from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

__all__ = ["wiener_deconvolve", "richardson_lucy", "richardson_lucy_sv", "varying_blur", "LensBlurs", "tune_baseline",
           "tune_baselines", "tune_richardson_lucy_sv", "dataset_varying_blur", "varying_baseline",
           "METHODS", "DEFAULT_GRIDS", "VARYING_GRID"]

#: Method name → the name of its tuned parameter.
METHODS = {"wiener": "nsr", "richardson_lucy": "iterations"}
#: Default tuning grids: NSR on a half-decade log grid (noisy metalens captures of a small test lens
#: tuned to 0.1–0.3, so the grid reaches 1), RL iteration counts doubling.
DEFAULT_GRIDS = {"wiener": tuple(float(v) for v in np.logspace(-5, 0, 11)),
                 "richardson_lucy": (5, 10, 20, 40, 80, 160)}
#: Iteration counts tried for the spatially varying Richardson–Lucy (one run to the largest).
VARYING_GRID = (5, 10, 20, 40, 80)


def _check_image(image, psf_size: int, name: str = "image") -> np.ndarray:
    """Validate an ``(H, W, 3)`` float sRGB image; return it float64, clipped to ``[0, 1]``."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DeconvolutionInputError(f"{name} must be an (H, W, 3) RGB image, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise DeconvolutionInputError(f"{name} must hold float sRGB values in [0, 1], got dtype {a.dtype} "
                                      "(for 8-bit data divide by 255)")
    if not np.all(np.isfinite(a)):
        raise DeconvolutionInputError(f"{name} contains NaN or infinite values")
    if min(a.shape[:2]) < psf_size // 2 + 2:
        raise DeconvolutionInputError(f"{name} is {a.shape[1]}×{a.shape[0]} px, too small for a {psf_size}×{psf_size} "
                                      f"PSF (each side needs at least {psf_size // 2 + 2} px)")
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def _check_nsr(values) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                np.isfinite(v) and v > 0):
            raise DeconvolutionInputError(f"nsr must be a finite number > 0, got {v!r}")


def _even_extension(channel: np.ndarray) -> np.ndarray:
    """(H, W) → (2H − 2, 2W − 2): the image and its mirror images, periodic and continuous."""
    height, width = channel.shape
    return np.pad(channel, ((0, height - 2), (0, width - 2)), mode="reflect")


def _to_srgb(linear: np.ndarray) -> np.ndarray:
    return np.clip(linear_to_srgb(np.clip(linear, 0.0, 1.0)), 0.0, 1.0).astype(np.float32)


def wiener_deconvolve(image_srgb: np.ndarray, psf_rgb: np.ndarray, nsr: float) -> np.ndarray:
    """Wiener deconvolution with a constant noise-to-signal ratio, per channel, in linear light.

    Each channel ``y`` (linear) is restored as ``x̂ = F⁻¹[ conj(H) · Y / (|H|² + nsr) ]``, with
    ``H`` the transfer function of the channel's PSF (normalised to sum 1, so ``H(0) = 1``):
    ``skimage.restoration.wiener(..., balance=nsr, reg=delta)`` — skimage's Wiener–Hunt filter
    with an identity regulariser, i.e. the classical Wiener filter for white signal and noise.
    Computed on the image's even mirror extension (module docstring: boundaries). Like any
    constant-NSR Wiener filter it scales the mean (zero frequency) by ``1 / (1 + nsr)`` in linear
    light — 0.1 % at ``nsr = 1e-3``.

    Args:
        image_srgb: ``(H, W, 3)`` float sRGB capture in ``[0, 1]`` (values outside are clipped).
        psf_rgb: ``(3, K, K)`` PSF per channel (R, G, B), ``K`` odd, centred at ``K // 2``, any
            positive sum (renormalised to 1, see the module docstring on white balance).
        nsr: noise-to-signal power ratio, > 0 (linear-light units); larger is smoother.
            :func:`tune_baseline` picks it on training pairs.

    Returns:
        ``(H, W, 3)`` float32 sRGB in ``[0, 1]``.
    """
    psf = check_psf(psf_rgb)
    x = srgb_to_linear(_check_image(image_srgb, psf.shape[1]))
    _check_nsr([nsr])
    height, width, _ = x.shape
    delta = np.ones((1, 1))
    out = np.empty_like(x)
    for c in range(3):
        ext = _even_extension(x[:, :, c])
        out[:, :, c] = wiener(ext, psf[c], balance=float(nsr), reg=delta, clip=False)[:height, :width]
    return _to_srgb(out)


def _rl_outputs(image_srgb, psf_rgb, iterations: Sequence[int]) -> dict[int, np.ndarray]:
    """Richardson–Lucy sRGB results after each requested iteration count, from one float64 run
    (:func:`dmdiff.optics.deconvolution.richardson_lucy_linear`)."""
    psf = torch.from_numpy(check_psf(psf_rgb))
    x = srgb_to_linear(_check_image(image_srgb, psf.shape[1]))
    linear = richardson_lucy_linear(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None], psf,
                                    iterations)
    return {n: _to_srgb(v[0].numpy().transpose(1, 2, 0)) for n, v in linear.items()}


def _check_iterations(values) -> None:
    for n in values:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DeconvolutionInputError(f"iterations must be an integer >= 1, got {n!r}")


def richardson_lucy(image_srgb: np.ndarray, psf_rgb: np.ndarray, iterations: int) -> np.ndarray:
    """Richardson–Lucy deconvolution, per channel, in linear light (scikit-image's algorithm).

    The maximum-likelihood iteration for Poisson noise, ``x ← x · (h̃ ⋆ (y / (h ⋆ x + 1e-12)))``
    (``h̃`` the flipped PSF), started from a constant 0.5, as ``skimage.restoration.richardson_lucy``;
    the iteration count is the regulariser (early stopping: more iterations recover more detail and
    amplify more noise). Convolutions are circular FFTs on the even mirror extension (module
    docstring: boundaries). Cost: about 4 FFTs of ``(2H − 2) × (2W − 2)`` per iteration and channel.

    Args:
        image_srgb: ``(H, W, 3)`` float sRGB capture in ``[0, 1]`` (values outside are clipped).
        psf_rgb: ``(3, K, K)`` PSF per channel, ``K`` odd, renormalised to sum 1.
        iterations: number of RL iterations, an integer >= 1.

    Returns:
        ``(H, W, 3)`` float32 sRGB in ``[0, 1]``.
    """
    _check_iterations([iterations])
    return _rl_outputs(image_srgb, psf_rgb, [iterations])[int(iterations)]


def tune_baseline(method: str, captures: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  psf_rgb: np.ndarray, grid: Sequence | None = None, *, on: str = "rgb",
                  progress: bool = True) -> tuple[float | int, list[dict]]:
    """Pick a baseline's parameter by mean PSNR on **training** pairs (the caller must not pass test data).

    Args:
        method: ``"wiener"`` (tunes ``nsr``) or ``"richardson_lucy"`` (tunes ``iterations``).
        captures: training captures, each ``(H, W, 3)`` float sRGB (a list, or an ``(N, H, W, 3)`` array).
        targets: the matching ground truths, same shapes.
        psf_rgb: ``(3, K, K)`` PSF (e.g. :func:`~dmdiff.optics.deconvolution.central_psf` of the lens's grid).
        grid: candidate values (default :data:`DEFAULT_GRIDS`: NSR ``1e-5 … 1`` in half-decade
            steps, RL 5, 10, 20, 40, 80, 160 iterations). Check that the best value is not at an
            end of the grid; if it is, widen the grid.
        on: PSNR on ``"rgb"`` or ``"y"`` (see :func:`dmdiff.metrics.psnr`).
        progress: show a tqdm bar over the training pairs.

    Returns:
        ``(best, table)``: the grid value with the highest mean PSNR (the first one on ties), and
        one row per grid value, ``{<param name>: value, "psnr": mean dB, "psnr_std": std dB,
        "n": pairs}``, in grid order.
    """
    if method not in METHODS:
        raise DeconvolutionInputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    param = METHODS[method]
    values = tuple(DEFAULT_GRIDS[method] if grid is None else grid)
    if not values:
        raise DeconvolutionInputError("the tuning grid is empty")
    captures, targets = list(captures), list(targets)
    if not captures or len(captures) != len(targets):
        raise DeconvolutionInputError(f"need matching, non-empty lists of captures and targets, got "
                                      f"{len(captures)} and {len(targets)}")
    psf = check_psf(psf_rgb)
    for i, (cap, tgt) in enumerate(zip(captures, targets)):
        _check_image(cap, psf.shape[1], f"captures[{i}]")
        _check_image(tgt, psf.shape[1], f"targets[{i}]")
        if np.shape(cap) != np.shape(tgt):
            raise DeconvolutionInputError(f"captures[{i}] and targets[{i}] differ in shape: "
                                          f"{np.shape(cap)} vs {np.shape(tgt)}")
    if method == "richardson_lucy":
        _check_iterations(values)
    else:
        _check_nsr(values)
    scores = np.empty((len(values), len(captures)))
    for j, (cap, tgt) in enumerate(tqdm(list(zip(captures, targets)), desc=f"tuning {method}",
                                        disable=not progress, leave=False)):
        tgt = np.asarray(tgt, dtype=np.float32)
        if method == "richardson_lucy":  # one run gives every iteration count
            outputs = _rl_outputs(cap, psf, values)
            scores[:, j] = [psnr(outputs[int(v)], tgt, on=on) for v in values]
        else:
            scores[:, j] = [psnr(wiener_deconvolve(cap, psf, v), tgt, on=on) for v in values]
    table = [{param: value, "psnr": float(row.mean()), "psnr_std": float(row.std()), "n": len(row)}
             for value, row in zip(values, scores)]
    best = max(range(len(table)), key=lambda i: (table[i]["psnr"], -i))
    return values[best], table


def _widened(method: str, values: Sequence, low: bool) -> list:
    """Grid values beyond the low or high end of ``values`` (empty when there is no room)."""
    if method == "richardson_lucy":     # one more doubling only: RL costs grow with the count
        lo, hi = int(min(values)), int(max(values))
        return [n for n in (1, 2, 3) if n < lo] if low else [2 * hi]
    lo, hi = float(min(values)), float(max(values))
    return [lo / 10 ** 1.0, lo / 10 ** 0.5] if low else [hi * 10 ** 0.5, hi * 10 ** 1.0]


def _tune_one(method: str, captures, targets, psf, grid, progress: bool) -> dict:
    """Tune ``method`` on the pairs, widening a grid whose best value sits at an end once."""
    param = METHODS[method]
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
    train = PairedFolderDataset(dataset, "train", use_maps=False)
    count = max(1, min(int(pairs), len(train)))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(train) - 1, count)})
    items = [train[i] for i in picks]
    captures = [item["lr"].permute(1, 2, 0).numpy() for item in items]
    targets = [item["gt"].permute(1, 2, 0).numpy() for item in items]
    record: dict[str, Any] = {"train_names": [item["name"] for item in items]}
    for method in METHODS:
        record[method] = _tune_one(method, captures, targets, psf, (grids or {}).get(method), progress)
    return record


def _varying_outputs(image_srgb, blur: SpatiallyVaryingBlur, iterations: Sequence[int]) -> dict[int, np.ndarray]:
    """Spatially varying RL sRGB results after each requested count, from one float32 run."""
    x = srgb_to_linear(_check_image(image_srgb, 1)).astype(np.float32)
    observed = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        linear = richardson_lucy_varying(observed, blur, iterations)
    return {n: _to_srgb(v[0].numpy().transpose(1, 2, 0)) for n, v in linear.items()}


def varying_blur(psf_grid) -> SpatiallyVaryingBlur:
    """The blur operator of a ``(3, G, G, K, K)`` PSF grid (or ``PSFGrid``), each kernel normalised to
    sum 1 (:func:`dmdiff.optics.deconvolution.check_psf_grid`); build it once, reuse it per image."""
    return SpatiallyVaryingBlur(check_psf_grid(psf_grid))


def richardson_lucy_sv(image_srgb: np.ndarray, blur: SpatiallyVaryingBlur, iterations: int) -> np.ndarray:
    """Richardson–Lucy with the lens's spatially varying PSF (module docstring), in linear light.

    Args:
        image_srgb: ``(H, W, 3)`` float sRGB capture in ``[0, 1]``, a full sensor frame.
        blur: :func:`varying_blur` of the lens's PSF grid.
        iterations: number of RL iterations, an integer >= 1.

    Returns:
        ``(H, W, 3)`` float32 sRGB in ``[0, 1]``.
    """
    _check_iterations([iterations])
    return _varying_outputs(image_srgb, blur, [iterations])[int(iterations)]


def tune_richardson_lucy_sv(dataset: str | Path, blurs: Callable[[str], SpatiallyVaryingBlur], pairs: int = 8,
                                 grid: Sequence[int] = VARYING_GRID, progress: bool = True) -> dict:
    """The iteration count of :func:`richardson_lucy_sv` by mean RGB PSNR on ≤ ``pairs`` pairs of
    the **validation** split (the train split when the dataset has none), evenly spaced over the
    sorted names, each deconvolved with its own lens's blur (``blurs``); one run per pair gives
    every count of ``grid``.

    Returns:
        ``{"iterations": best, "split": "val" | "train", "names": [...], "table": [{"iterations",
        "psnr", "psnr_std", "n"}, ...], "grid": [...], "at_grid_edge": bool}``.
    """
    values = [int(v) for v in grid]
    _check_iterations(values)
    split = "val" if has_split(dataset, "val") else "train"
    data = PairedFolderDataset(dataset, split, use_maps=False)
    count = max(1, min(int(pairs), len(data)))
    items = [data[i] for i in sorted({int(round(i)) for i in np.linspace(0, len(data) - 1, count)})]
    scores = np.empty((len(values), len(items)))
    for j, item in enumerate(tqdm(items, desc="tuning SV Richardson–Lucy", disable=not progress, leave=False)):
        outputs = _varying_outputs(item["lr"].permute(1, 2, 0).numpy(), blurs(item["name"]), values)
        target = item["gt"].permute(1, 2, 0).numpy()
        scores[:, j] = [psnr(outputs[v], target) for v in values]
    table = [{"iterations": v, "psnr": float(row.mean()), "psnr_std": float(row.std()), "n": len(row)}
             for v, row in zip(values, scores)]
    best = max(range(len(values)), key=lambda i: (table[i]["psnr"], -i))
    return {"iterations": values[best], "split": split, "names": [item["name"] for item in items], "table": table,
            "grid": values, "at_grid_edge": len(values) > 1 and best in (0, len(values) - 1)}


class LensBlurs:
    """The spatially varying blur of each image's own lens in a simulated dataset: ``blurs(name)``
    is :func:`varying_blur` of the grid :class:`dmdiff.data.dataset.LensGrids` gives image ``name``
    (the dataset's lens, or in a lens-family dataset the image's), one operator per distinct lens.
    ``grids``: that :class:`~dmdiff.data.dataset.LensGrids`."""

    def __init__(self, grids: LensGrids):
        self.grids = grids
        self._blurs: dict[str, SpatiallyVaryingBlur] = {}

    def __call__(self, name: str) -> SpatiallyVaryingBlur:
        key = self.grids.spec(name).cache_key()
        if key not in self._blurs:
            self._blurs[key] = varying_blur(self.grids(name))
        return self._blurs[key]


def dataset_varying_blur(dataset: str | Path, progress: bool = False) -> LensBlurs | None:
    """The :class:`LensBlurs` of a simulated dataset (``lens.json`` → each image's lens → PSF grid),
    or None without a lens spec (real captures)."""
    grids = LensGrids.of_dataset(dataset, progress)
    return None if grids is None else LensBlurs(grids)


def varying_baseline(dataset: str | Path, pairs: int = 8,
                     progress: bool = True) -> tuple[LensBlurs | None, dict]:
    """The spatially varying Richardson–Lucy of a simulated dataset's lens, tuned: ``(blur, record)``
    with ``record`` = :func:`tune_richardson_lucy_sv`'s plus what the PSFs are, or ``(None,
    {"skipped": reason})`` without a ``lens.json`` lens spec or a split to tune on."""
    blur = dataset_varying_blur(dataset, progress)
    if blur is None:
        return None, {"skipped": f"{dataset} has no lens.json with a lens spec: no PSF grid to deconvolve with"}
    if not (has_split(dataset, "val") or has_split(dataset, "train")):
        return None, {"skipped": f"{dataset} has no val or train split to tune the iteration count on"}
    record = tune_richardson_lucy_sv(dataset, blur, pairs, progress=progress)
    return blur, {"psf": "each image's lens's true PSF grid (lens.json spec → psf_grid), each node normalised to sum 1, "
                         "bilinear between nodes as the simulation blurred; frames cover the whole sensor",
                  **record}
