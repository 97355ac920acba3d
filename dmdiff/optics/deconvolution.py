"""Richardson–Lucy deconvolution of image batches with FFTs on the even mirror extension (torch).

One implementation serves two callers: the classical baseline
(:func:`dmdiff.baselines.richardson_lucy`, float64, one photo at a time) and the model's
deconvolved colour anchor (:class:`dmdiff.model.dmdiff.DMDiffConfig` ``anchor_rl_iterations``,
float32 batches on the model's device, training crops and whole photos alike).

The update is scikit-image's ``richardson_lucy``: ``x ← x · (h̃ ⋆ (y / (h ⋆ x + 1e-12)))`` from a
constant 0.5 (``h̃`` the flipped PSF), with negative FFT round-off clipped to 0. Convolutions are
circular FFTs on the even (mirror) extension of each image — the image followed by its reflection
without the edge pixel repeated, ``(2H − 2) × (2W − 2)`` pixels, periodic and continuous, so the
circular convolution sees no border jump (:mod:`dmdiff.baselines`, "Boundaries"). An extension
still smaller than the PSF (images under about ``K / 2`` pixels a side) is padded further by
repeating its last row and column, so any size works.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

__all__ = ["richardson_lucy_linear", "richardson_lucy_srgb"]


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
            here; :func:`dmdiff.baselines.richardson_lucy` validates and normalises).
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
