"""Classical restoration baselines for metalens captures: Wiener and Richardson–Lucy deconvolution.

Both deconvolve each colour channel with one shift-invariant PSF — for metalens captures, the true
**central** PSF (:func:`central_psf`: the on-axis grid node), so they ignore that the real blur
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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dmdiff.errors import DmdiffError
from dmdiff.optics.deconvolution import richardson_lucy_linear
from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

__all__ = ["BaselineInputError", "central_psf", "check_psf", "dataset_central_psf", "wiener_deconvolve", "richardson_lucy", "tune_baseline",
           "METHODS", "DEFAULT_GRIDS"]

#: Method name → the name of its tuned parameter.
METHODS = {"wiener": "nsr", "richardson_lucy": "iterations"}
#: Default tuning grids: NSR on a half-decade log grid (noisy metalens captures of a small test lens
#: tuned to 0.1–0.3, so the grid reaches 1), RL iteration counts doubling.
DEFAULT_GRIDS = {"wiener": tuple(float(v) for v in np.logspace(-5, 0, 11)),
                 "richardson_lucy": (5, 10, 20, 40, 80, 160)}


class BaselineInputError(DmdiffError, ValueError):
    """An image, PSF or parameter handed to a baseline is wrong (shape, values, range)."""


def central_psf(psfs) -> np.ndarray:
    """The PSF of the grid node at the centre of the field: ``psfs[:, G // 2, G // 2]``.

    For odd ``G`` (the default 7) this node sits on the optical axis; for even ``G`` it is the node
    just below and right of the centre.

    Args:
        psfs: a PSF grid ``(3, G, G, K, K)`` (numpy or torch) or an object with a ``psfs`` attribute
            (``dmdiff.optics.grid.PSFGrid``).

    Returns:
        float64 ``(3, K, K)``, as stored (not renormalised; the baselines renormalise).
    """
    arr = getattr(psfs, "psfs", psfs)
    if type(arr).__module__.startswith("torch"):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 5 or arr.shape[0] != 3 or arr.shape[1] != arr.shape[2] or arr.shape[3] != arr.shape[4]:
        raise BaselineInputError(f"expected a PSF grid of shape (3, G, G, K, K), got {arr.shape}")
    g = arr.shape[1]
    return arr[:, g // 2, g // 2].copy()


def dataset_central_psf(dataset, progress: bool = False) -> tuple[np.ndarray | None, dict | None, str | None]:
    """The true central PSF of a simulated dataset's lens: ``(psf (3, K, K) float64, spec dict, None)``,
    or ``(None, None, reason)`` when ``dataset`` has no ``lens.json`` with a lens spec (real captures).
    The PSF grid comes from the disk cache (:func:`dmdiff.optics.grid.psf_grid`; ``progress``: its bar
    when it must be computed)."""
    from dmdiff.data.dataset import read_lens
    from dmdiff.optics.grid import psf_grid
    from dmdiff.optics.spec import MetalensSpec

    lens = read_lens(dataset)
    if not lens or "spec" not in lens:
        return None, None, f"{dataset} has no lens.json with a lens spec (real captures?): no true PSF to deconvolve with"
    spec = MetalensSpec.from_dict(lens["spec"])
    return central_psf(psf_grid(spec, progress=progress)), spec.to_dict(), None


def check_psf(psf_rgb) -> np.ndarray:
    """Validate a ``(3, K, K)`` PSF (``K`` odd, finite, non-negative, energy in every channel) and
    return it float64, each channel normalised to sum 1 (the module's white-balance convention).

    Raises:
        BaselineInputError: any of those conditions fails.
    """
    psf = np.asarray(psf_rgb, dtype=np.float64)
    if psf.ndim != 3 or psf.shape[0] != 3 or psf.shape[1] != psf.shape[2] or psf.shape[1] % 2 == 0:
        raise BaselineInputError(f"psf_rgb must have shape (3, K, K) with K odd (centred at K // 2), "
                                 f"got {psf.shape}; central_psf(grid.psfs) gives one")
    if not np.all(np.isfinite(psf)):
        raise BaselineInputError("psf_rgb contains NaN or infinite values")
    if psf.min() < 0:
        raise BaselineInputError(f"psf_rgb has negative values (min {psf.min():.3g}); a PSF is an intensity")
    sums = psf.sum(axis=(1, 2))
    if np.any(sums <= 0):
        raise BaselineInputError(f"psf_rgb has a channel with no energy (sums {sums})")
    return psf / sums[:, None, None]


def _check_image(image, psf_size: int, name: str = "image") -> np.ndarray:
    """Validate an ``(H, W, 3)`` float sRGB image; return it float64, clipped to ``[0, 1]``."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise BaselineInputError(f"{name} must be an (H, W, 3) RGB image, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise BaselineInputError(f"{name} must hold float sRGB values in [0, 1], got dtype {a.dtype} "
                                 "(for 8-bit data divide by 255)")
    if not np.all(np.isfinite(a)):
        raise BaselineInputError(f"{name} contains NaN or infinite values")
    if min(a.shape[:2]) < psf_size // 2 + 2:
        raise BaselineInputError(f"{name} is {a.shape[1]}×{a.shape[0]} px, too small for a {psf_size}×{psf_size} "
                                 f"PSF (each side needs at least {psf_size // 2 + 2} px)")
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def _check_nsr(values) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                np.isfinite(v) and v > 0):
            raise BaselineInputError(f"nsr must be a finite number > 0, got {v!r}")


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
    from skimage.restoration import wiener

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
            raise BaselineInputError(f"iterations must be an integer >= 1, got {n!r}")


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
        psf_rgb: ``(3, K, K)`` PSF (e.g. :func:`central_psf` of the lens's grid).
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
    from tqdm.auto import tqdm

    from dmdiff.metrics import psnr

    if method not in METHODS:
        raise BaselineInputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    param = METHODS[method]
    values = tuple(DEFAULT_GRIDS[method] if grid is None else grid)
    if not values:
        raise BaselineInputError("the tuning grid is empty")
    captures, targets = list(captures), list(targets)
    if not captures or len(captures) != len(targets):
        raise BaselineInputError(f"need matching, non-empty lists of captures and targets, got "
                                 f"{len(captures)} and {len(targets)}")
    psf = check_psf(psf_rgb)
    for i, (cap, tgt) in enumerate(zip(captures, targets)):
        _check_image(cap, psf.shape[1], f"captures[{i}]")
        _check_image(tgt, psf.shape[1], f"targets[{i}]")
        if np.shape(cap) != np.shape(tgt):
            raise BaselineInputError(f"captures[{i}] and targets[{i}] differ in shape: "
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
