"""Richardson–Lucy deconvolution of image batches with FFTs on the even mirror extension (torch).

One implementation serves two callers: the classical baseline
(:func:`dmdiff.evaluation.baselines.richardson_lucy`, float64, one photo at a time) and the model's
deconvolved colour anchor (:class:`dmdiff.model.dmdiff.DMDiffConfig` ``anchor_rl_iterations``,
float32 batches on the model's device, training crops and whole photos alike).

The update is scikit-image's ``richardson_lucy``: ``x ← x · (h̃ ⋆ (y / (h ⋆ x + 1e-12)))`` from a
constant 0.5 (``h̃`` the flipped PSF), with negative FFT round-off clipped to 0. Convolutions are
circular FFTs on the even (mirror) extension of each image — the image followed by its reflection
without the edge pixel repeated, ``(2H − 2) × (2W − 2)`` pixels, periodic and continuous, so the
circular convolution sees no border jump (:mod:`dmdiff.evaluation.baselines`, "Boundaries"). An extension
still smaller than the PSF (images under about ``K / 2`` pixels a side) is padded further by
repeating its last row and column, so any size works.

With a lens's whole PSF grid, :func:`richardson_lucy_varying` runs the same update through the
spatially varying blur (reflect borders, the simulator's own model): the whole-grid baseline and,
through :func:`richardson_lucy_grid_srgb`, the network input of ``DMDiffConfig.input_rl_iterations``.
The spatially varying Wiener filters at the end serve the colour anchor (``anchor_wiener_nsr``) and
the earlier network input (``input_wiener_nsr``).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dmdiff.device import by_plane, release_freed_memory
from dmdiff.errors import DmdiffError
from dmdiff.optics.blur import SpatiallyVaryingBlur, node_weights
from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

__all__ = ["DeconvolutionInputError", "central_psf", "check_psf", "check_psf_grid", "richardson_lucy_linear",
           "richardson_lucy_grid_srgb", "richardson_lucy_srgb", "richardson_lucy_varying",
           "wiener_varying_large_scales", "wiener_varying_with_fine_detail"]


class DeconvolutionInputError(DmdiffError, ValueError):
    """An image, PSF or parameter handed to a deconvolution is wrong (shape, values, range)."""


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
        raise DeconvolutionInputError(f"expected a PSF grid of shape (3, G, G, K, K), got {arr.shape}")
    g = arr.shape[1]
    return arr[:, g // 2, g // 2].copy()


def check_psf(psf_rgb) -> np.ndarray:
    """Validate a ``(3, K, K)`` PSF (``K`` odd, finite, non-negative, energy in every channel) and
    return it float64, each channel normalised to sum 1 (the white-balance convention of :mod:`dmdiff.evaluation.baselines`).

    Raises:
        DeconvolutionInputError: any of those conditions fails.
    """
    psf = np.asarray(psf_rgb, dtype=np.float64)
    if psf.ndim != 3 or psf.shape[0] != 3 or psf.shape[1] != psf.shape[2] or psf.shape[1] % 2 == 0:
        raise DeconvolutionInputError(f"psf_rgb must have shape (3, K, K) with K odd (centred at K // 2), "
                                      f"got {psf.shape}; central_psf(grid.psfs) gives one")
    if not np.all(np.isfinite(psf)):
        raise DeconvolutionInputError("psf_rgb contains NaN or infinite values")
    if psf.min() < 0:
        raise DeconvolutionInputError(f"psf_rgb has negative values (min {psf.min():.3g}); a PSF is an intensity")
    sums = psf.sum(axis=(1, 2))
    if np.any(sums <= 0):
        raise DeconvolutionInputError(f"psf_rgb has a channel with no energy (sums {sums})")
    return psf / sums[:, None, None]


def check_psf_grid(psfs) -> np.ndarray:
    """Validate a ``(3, G, G, K, K)`` PSF grid (``K`` odd, finite, non-negative, energy in every
    kernel; numpy, torch or a ``PSFGrid``) and return it float64 with each kernel normalised to sum 1
    (the white-balance convention of :mod:`dmdiff.evaluation.baselines`, node by node).

    Raises:
        DeconvolutionInputError: any of those conditions fails.
    """
    arr = getattr(psfs, "psfs", psfs)
    if type(arr).__module__.startswith("torch"):
        arr = arr.detach().cpu().numpy()
    grid = np.asarray(arr, dtype=np.float64)
    if grid.ndim != 5 or grid.shape[0] != 3 or grid.shape[3] != grid.shape[4] or grid.shape[3] % 2 == 0:
        raise DeconvolutionInputError(f"expected a PSF grid of shape (3, G, G, K, K) with K odd, got {grid.shape}")
    if not np.all(np.isfinite(grid)) or grid.min() < 0:
        raise DeconvolutionInputError("the PSF grid has NaN, infinite or negative values")
    sums = grid.sum(axis=(3, 4))
    if np.any(sums <= 0):
        raise DeconvolutionInputError("the PSF grid has a kernel with no energy")
    return grid / sums[..., None, None]



def _extension(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, H, W)`` → its even mirror extension, padded by edge repetition to at least ``size`` a side."""
    height, width = x.shape[-2:]
    ext = F.pad(x[:, None], (0, max(width - 2, 0), 0, max(height - 2, 0)), mode="reflect")
    grow_h, grow_w = max(size - ext.shape[-2], 0), max(size - ext.shape[-1], 0)
    if grow_h or grow_w:
        ext = F.pad(ext, (0, grow_w, 0, grow_h), mode="replicate")
    return ext[:, 0]


def _otf(psf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``rfft2`` transfer functions on ``shape`` of ``(N, K, K)`` kernels centred at ``K // 2``."""
    k = psf.shape[-1]
    padded = psf.new_zeros((psf.shape[0], *shape))
    padded[:, :k, :k] = psf
    return torch.fft.rfft2(torch.roll(padded, (-(k // 2), -(k // 2)), dims=(-2, -1)))


def richardson_lucy_linear(observed: torch.Tensor, psf: torch.Tensor,
                           iterations: Sequence[int]) -> dict[int, torch.Tensor]:
    """Richardson–Lucy estimates of linear-light images after each requested iteration count.

    Args:
        observed: ``(B, C, H, W)`` non-negative linear light (any float dtype; computed in it).
        psf: ``(C, K, K)`` kernels, ``K`` odd, centred at ``K // 2``, each summing to 1 (not checked
            here; :func:`check_psf` validates and normalises).
        iterations: counts >= 1; one run serves all of them.

    Returns:
        ``{n: (B, C, H, W)}`` for each distinct count ``n``, non-negative, same dtype and device.
    """
    batch, channels, height, width = observed.shape
    k = psf.shape[-1]
    ext = _extension(observed.reshape(batch * channels, height, width), k)
    shape = tuple(ext.shape[-2:])
    otf = _otf(psf.to(observed), shape).repeat(batch, 1, 1)
    otf_conj = otf.conj()
    estimate = torch.full_like(ext, 0.5)
    out, done = {}, 0
    for stop in sorted({int(n) for n in iterations}):
        for _ in range(stop - done):
            blurred = torch.fft.irfft2(torch.fft.rfft2(estimate) * otf, s=shape) + 1e-12
            estimate = estimate * torch.fft.irfft2(torch.fft.rfft2(ext / blurred) * otf_conj, s=shape)
            estimate = estimate.clamp_min(0.0)       # FFT round-off must not flip signs
        done = stop
        out[stop] = estimate[:, :height, :width].reshape(batch, channels, height, width)
    return out


@torch.no_grad()
def richardson_lucy_srgb(images: torch.Tensor, psf: torch.Tensor, iterations: int) -> torch.Tensor:
    """Richardson–Lucy on sRGB batches, in linear light and float32: ``(B, 3, H, W)`` in ``[0, 1]``
    (clipped) → the same shape, dtype and device, in ``[0, 1]``. ``psf``: ``(3, K, K)``, each channel
    summing to 1; ``iterations`` >= 1. Not differentiable (the colour anchor needs no gradient)."""
    linear = srgb_to_linear(images.float().clamp(0, 1))
    estimate = richardson_lucy_linear(linear, psf.float(), [iterations])[int(iterations)]
    return linear_to_srgb(estimate.clamp(0, 1)).clamp(0, 1).to(images.dtype)


def richardson_lucy_varying(observed: torch.Tensor, blur, iterations: Sequence[int]) -> dict[int, torch.Tensor]:
    """Richardson–Lucy with a spatially varying blur ``A`` (e.g. :class:`dmdiff.optics.blur.SpatiallyVaryingBlur`).

    The update for Poisson noise with a general non-negative operator,
    ``x ← x · Aᵀ(y / (A x + 1e-12)) / Aᵀ1``, from a constant 0.5 like :func:`richardson_lucy_linear`;
    ``Aᵀ1`` is not 1 for a blur whose PSF changes over the field, so it is divided out (it is 1
    for a shift-invariant blur with kernels summing to 1, where this is the ordinary update).
    Borders: ``A`` is the blur's reflect-padded model (the scene continues as its mirror image),
    the model the simulated captures were made with.

    Args:
        observed: ``(B, C, H, W)`` non-negative linear light (computed in its dtype).
        blur: a callable ``blur(x)`` with a method ``blur.adjoint(y)`` (reflect padding).
        iterations: counts >= 1; one run serves all of them.

    Returns:
        ``{n: (B, C, H, W)}`` for each distinct count ``n``, non-negative, same dtype and device.
    """
    norm = blur.adjoint(torch.ones_like(observed)).clamp_min(1e-12)
    estimate = torch.full_like(observed, 0.5)
    out, done = {}, 0
    for stop in sorted({int(n) for n in iterations}):
        for _ in range(stop - done):
            ratio = observed / (blur(estimate) + 1e-12)
            estimate = (estimate * blur.adjoint(ratio) / norm).clamp_min(0.0)
        done = stop
        out[stop] = estimate.clone()
    return out


def _content_key(t: torch.Tensor) -> tuple:
    """A key for ``t`` by content: the SHA-1 of its bytes, its shape, dtype and device."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()     # any dtype's bytes
    return hashlib.sha1(data).hexdigest(), tuple(t.shape), t.dtype, t.device


class _KeptResults:
    """The last ``size`` results of a costly computation, by key (least recently used dropped first).
    Thread-safe: a folder restore prepares the next photo in a reader thread."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        return None

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


#: The last results of :func:`richardson_lucy_grid_srgb` are kept, by content of the images and the
#: grid and by iteration count, for batches of up to this many pixels: the models of one evaluation
#: (the full model and its ablations) see the same deconvolved capture, computed once.
KEPT_RL_PIXELS = 1024 ** 2
_rl_grid_kept = _KeptResults(4)


@torch.no_grad()
def richardson_lucy_grid_srgb(images: torch.Tensor, psf_grid: torch.Tensor, iterations: int) -> torch.Tensor:
    """Richardson–Lucy with a lens's whole PSF grid on sRGB batches: each part of the field deconvolved
    with its own PSF (:func:`richardson_lucy_varying` with the product-convolution blur
    :class:`~dmdiff.optics.blur.SpatiallyVaryingBlur`, reflect borders), in linear light and float32.
    The network input of a model with ``DMDiffConfig.input_rl_iterations``. Each colour plane is
    deconvolved on its own (the update does not mix them); photos with a side above
    :data:`BY_PLANE_PX` go one plane of the batch at a time, a third of the temporary memory. Cost on
    one thread with a 7 × 7 grid of 63-px kernels: about 0.035 s per iteration at 256², 1.4 s at 2048²;
    the last few results are kept (:data:`KEPT_RL_PIXELS`), so asking again for the same images and
    grid costs a hash.

    Args:
        images: ``(B, 3, H, W)`` sRGB in ``[0, 1]`` (clipped), a whole frame (the grid spans it).
        psf_grid: ``(3, G, G, K, K)`` normalised kernels (:func:`check_psf_grid`).
        iterations: number of iterations, an integer >= 1 (the regulariser: early stopping).

    Returns:
        ``(B, 3, H, W)`` sRGB in ``[0, 1]``, same dtype and device as ``images``.
    """
    key = ((*_content_key(images), *_content_key(psf_grid), int(iterations))
           if images.numel() <= KEPT_RL_PIXELS * 3 else None)
    if key is not None and (kept := _rl_grid_kept.get(key)) is not None:
        return kept.clone()
    grid = psf_grid.to(torch.float32)

    def deconvolved(planes: torch.Tensor, channels: slice) -> torch.Tensor:
        linear = srgb_to_linear(planes.float().clamp(0, 1))
        estimate = richardson_lucy_varying(linear, SpatiallyVaryingBlur(grid[channels]), [iterations])
        return linear_to_srgb(estimate[int(iterations)].clamp(0, 1)).clamp(0, 1).to(images.dtype)

    if max(images.shape[-2:]) <= BY_PLANE_PX:
        result = deconvolved(images, slice(None))
    else:
        result = torch.cat([torch.cat([deconvolved(images[b:b + 1, c:c + 1], slice(c, c + 1)) for c in range(3)],
                                      dim=1) for b in range(images.shape[0])])
    if key is not None:
        _rl_grid_kept.put(key, result.clone())
    return result


def _summed_blocks(kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, K, K)`` kernels centred at ``K // 2`` → ``(N, k, k)``, ``k`` odd: each kernel summed over
    ``scale × scale`` blocks, the middle block centred on the kernel's centre (``scale`` odd)."""
    radius = kernels.shape[-1] // 2
    blocks = -(-(radius - scale // 2) // scale)                 # blocks beside the middle one, per side
    pad = scale // 2 + blocks * scale - radius
    padded = F.pad(kernels[:, None], (pad, pad, pad, pad))
    return F.avg_pool2d(padded, scale)[:, 0] * scale ** 2


def _laplacian_power(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``|L(f)|²`` of the 5-point Laplacian on the ``rfft2`` frequencies of ``shape``."""
    fy = torch.fft.fftfreq(shape[0], dtype=like.dtype, device=like.device)[:, None]
    fx = torch.fft.rfftfreq(shape[1], dtype=like.dtype, device=like.device)[None, :]
    return (4 - 2 * torch.cos(2 * torch.pi * fy) - 2 * torch.cos(2 * torch.pi * fx)) ** 2


#: Bytes the spatially varying Wiener filter's per-node FFT arrays may take at once: its nodes are
#: deconvolved in chunks that fit (all at once for one photo up to about 300 px a side).
WIENER_CHUNK_BYTES = 64 * 2 ** 20
#: Spatially varying Wiener gains, each ``(3, G·G, S, S // 2 + 1)`` complex, kept for later calls with
#: the same kernels (by content), regulariser and extension shape: a folder of photos of one size from
#: one lens reuses them (they are 60 % of a 256² photo's anchor), for the colour anchor and the Wiener
#: network input alike (two regularisers, so two kept). Only gains computed for all nodes at once (in
#: one chunk) are kept.
_wiener_gains_kept = _KeptResults(2)


def _wiener_gains(kernels: torch.Tensor, nsr: float, shape: tuple[int, int], channels: slice,
                  nodes: slice) -> torch.Tensor:
    """The gains of ``kernels[channels, nodes]`` (``(3, G·G, k, k)``) on ``shape``,
    ``conj(H) / (|H|² + nsr·|L|²)``."""
    whole = channels == slice(0, kernels.shape[0]) and nodes == slice(0, kernels.shape[1])
    key = (*_content_key(kernels), float(nsr), shape) if whole else None
    if key is not None and (kept := _wiener_gains_kept.get(key)) is not None:
        return kept
    part = kernels[channels, nodes]
    otf = _otf(part.reshape(-1, *part.shape[-2:]), shape).reshape(*part.shape[:2], shape[0], -1)
    denominator = otf.abs().pow_(2).add_(nsr * _laplacian_power(shape, kernels))
    gains = otf.conj_physical_().div_(denominator)              # in place: large photos' chunks
    if key is not None:
        _wiener_gains_kept.put(key, gains)
    return gains



def _wiener_blended(small: torch.Tensor, kernels: torch.Tensor, nsr: float, wy: np.ndarray,
                    wx: np.ndarray) -> tuple[torch.Tensor, bool]:
    """``small`` ``(B, 3, h, w)`` deconvolved with each node's kernels ``(3, G·G, k, k)`` and blended
    with the node weights ``wy[i] ⊗ wx[j]`` of node ``i·G + j`` (``(G, h)``, ``(G, w)``) →
    ``((B, 3, h, w), chunked)``: all kernels at once when their arrays fit in :data:`WIENER_CHUNK_BYTES`,
    else one channel and as many nodes as fit at a time."""
    batch, channels, h, w = small.shape
    nodes, grid = kernels.shape[1], wy.shape[0]
    ext = _extension(small.reshape(batch * channels, h, w), kernels.shape[-1])
    shape = tuple(ext.shape[-2:])
    spectrum = torch.fft.rfft2(ext).reshape(batch, channels, 1, shape[0], -1)
    del ext
    # one kernel's gains, their product with the spectrum and its estimates of the batch
    kernel_bytes = shape[0] * (shape[1] // 2 + 1) * 8 * (1 + batch) + batch * shape[0] * shape[1] * 4
    if channels * nodes * kernel_bytes <= WIENER_CHUNK_BYTES:
        groups = [(slice(0, channels), slice(0, nodes))]
    else:
        chunk = max(1, WIENER_CHUNK_BYTES // kernel_bytes)
        groups = [(slice(c, c + 1), slice(start, min(start + chunk, nodes)))
                  for c in range(channels) for start in range(0, nodes, chunk)]
    blended = small.new_zeros(batch, channels, h, w)
    for chans, part in groups:
        index = np.arange(part.start, part.stop)
        weights = torch.from_numpy(wy[index // grid, :, None] * wx[index % grid, None, :]).to(small)
        gains = _wiener_gains(kernels, nsr, shape, chans, part)
        per_node = torch.fft.irfft2(spectrum[:, chans] * gains, s=shape)[..., :h, :w]   # (B, c, n, h, w)
        blended[:, chans] += (per_node * weights).sum(dim=2)
    return blended, len(groups) > 1


#: Photos with a side above this many pixels go through the Wiener anchor's conversions one colour
#: plane at a time (a third of the temporary memory; the same values up to float rounding).
BY_PLANE_PX = 1024


def _linear_blocks(images: torch.Tensor, scale: int, large: bool) -> torch.Tensor:
    """``(B, 3, H, W)`` sRGB → ``(B, 3, ⌈H/scale⌉, ⌈W/scale⌉)`` float32 linear light averaged over
    ``scale × scale`` blocks (edges repeated up to a multiple of ``scale``)."""
    height, width = images.shape[-2:]
    return by_plane(lambda x: F.avg_pool2d(F.pad(srgb_to_linear(x.float().clamp(0, 1)),
                                                 (0, -width % scale, 0, -height % scale), mode="replicate"), scale),
                    images, large)


def _upsampled_srgb(small: torch.Tensor, scale: int, size: tuple[int, int], dtype: torch.dtype,
                    large: bool) -> torch.Tensor:
    """Inverse of :func:`_linear_blocks`' sampling: linear ``small`` upsampled bilinearly by ``scale``,
    cut to ``size`` and returned as sRGB in ``[0, 1]`` of ``dtype``."""
    height, width = size
    return by_plane(lambda x: linear_to_srgb(F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                                             [..., :height, :width].clamp(0, 1)).clamp(0, 1).to(dtype),
                    small, large)


@torch.no_grad()
def wiener_varying_large_scales(images: torch.Tensor, psf_grid: torch.Tensor, nsr: float,
                                scale: int = 3) -> torch.Tensor:
    """The large scales of a Wiener deconvolution with a spatially varying PSF, on sRGB batches.

    For a colour anchor, which keeps only the scales above about ``scale`` pixels, and computed at
    that resolution (a 256² photo and a 7 × 7 grid of 63-px PSFs on one CPU thread, scale 3: 0.03 s
    when the previous call had the same lens and size, else 0.06 s): the image in linear light is
    averaged over ``scale × scale`` blocks (edges repeated up to a multiple of ``scale``), each PSF of
    the grid summed over the same blocks around its centre, and the small image deconvolved with
    every node's kernel by the Wiener filter with a Laplacian regulariser,
    ``conj(H) · Y / (|H|² + nsr · |L|²)`` (it keeps the mean, unlike a constant noise-to-signal
    term), on its even mirror extension. The node estimates are blended with the bilinear node
    weights of the blur model (:mod:`dmdiff.optics.blur`: node ``(i, j)`` at
    ``((i + 0.5)·H/G − 0.5, (j + 0.5)·W/G − 0.5)``), i.e. each pixel is deconvolved with the PSF
    of its place in the field, and the result is upsampled bilinearly to ``H × W``. The nodes are
    deconvolved in chunks of at most :data:`WIENER_CHUNK_BYTES`, so memory stays bounded for large
    photos (chunks change the result by float rounding only).

    Args:
        images: ``(B, 3, H, W)`` sRGB in ``[0, 1]`` (clipped), any float dtype.
        psf_grid: ``(3, G, G, K, K)`` kernels, ``K`` odd, centred at ``K // 2``, each summing to 1
            (:func:`check_psf_grid` validates and normalises).
        nsr: regularisation weight > 0 (larger: smoother).
        scale: odd block size (px) of the computation, >= 1.

    Returns:
        ``(B, 3, H, W)`` sRGB in ``[0, 1]``, same dtype and device as ``images``; detail below about
        ``scale`` pixels is missing (it is a low band, not a restoration).
    """
    if scale < 1 or scale % 2 == 0:
        raise DeconvolutionInputError(f"scale must be an odd number of pixels >= 1, got {scale!r}")
    _, blended, large = _deconvolved_blocks(images, psf_grid, nsr, scale)
    return _upsampled_srgb(blended, scale, tuple(images.shape[-2:]), images.dtype, large)


def _deconvolved_blocks(images: torch.Tensor, psf_grid: torch.Tensor, nsr: float,
                        scale: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The block computation of :func:`wiener_varying_large_scales`: ``(small, blended, large)``, the
    images' linear light averaged over ``scale × scale`` blocks ``(B, 3, h, w)``, its spatially varying
    Wiener deconvolution (same shape, linear) and whether the photo is large enough to be converted
    one plane at a time (:data:`BY_PLANE_PX`)."""
    height, width = images.shape[-2:]
    large = max(height, width) > BY_PLANE_PX
    grid = psf_grid.to(images.device, torch.float32)
    small = _linear_blocks(images, scale, large)                          # (B, 3, h, w)
    kernels = _summed_blocks(grid.reshape(-1, *grid.shape[-2:]), scale)  # (3·G·G, k, k)
    blended, chunked = _wiener_blended(
        small, kernels.reshape(grid.shape[0], -1, *kernels.shape[-2:]), nsr,
        node_weights(np.arange(small.shape[-2]) * scale + (scale - 1) / 2, height, grid.shape[1]),
        node_weights(np.arange(small.shape[-1]) * scale + (scale - 1) / 2, width, grid.shape[1]))
    if chunked:
        release_freed_memory()        # a large photo's transients, which the allocator would keep
    return small, blended, large


@torch.no_grad()
def wiener_varying_with_fine_detail(images: torch.Tensor, psf_grid: torch.Tensor, nsr: float,
                                    scale: int = 3) -> torch.Tensor:
    """A capture with its large and middle scales deconvolved and its finest detail as captured:
    ``W(x) + x − B(x)``, ``W`` being :func:`wiener_varying_large_scales` (spatially varying Wiener
    filter on ``scale × scale`` blocks, each part of the field with its own PSF) and ``B`` the same
    block average and bilinear upsampling without the deconvolution, so ``x − B(x)`` is the detail
    finer than a block that ``W`` leaves out. The network input of a model with
    ``DMDiffConfig.input_wiener_nsr`` (the capture's noise stays in that detail, for the network to
    judge; a 256² frame on one thread costs about what the colour anchor does).

    Args:
        images: ``(B, 3, H, W)`` sRGB in ``[0, 1]``.
        psf_grid: ``(3, G, G, K, K)`` normalised kernels (:func:`check_psf_grid`).
        nsr: the Wiener filter's regularisation weight > 0 (larger: smoother).
        scale: odd block size (px), >= 3.

    Returns:
        ``(B, 3, H, W)`` of ``images``' dtype, about ``[0, 1]`` (not clamped: the fine detail may
        reach a little outside).
    """
    if scale < 3 or scale % 2 == 0:
        raise DeconvolutionInputError(f"scale must be an odd number of pixels >= 3, got {scale!r}")
    small, blended, large = _deconvolved_blocks(images, psf_grid, nsr, scale)   # one block average for both
    size = tuple(images.shape[-2:])
    # W(x) + (x − B(x)), summed in place with each upsampled array freed once used: two whole-photo
    # arrays alive at a time instead of four, and the same bits as the expression written out
    out = images.clamp(0, 1)
    out -= _upsampled_srgb(small, scale, size, images.dtype, large)
    return out.add_(_upsampled_srgb(blended, scale, size, images.dtype, large))
