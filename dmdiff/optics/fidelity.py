"""The fidelity target: the scene band-limited to what a capture carries (the neutral path's target).

A capture holds the scene's detail only where the lens passes it above the noise. The best any
linear restoration can do is the Wiener estimate; with the noise averaged out, what it returns is
the scene filtered by the **Wiener transfer function** of the optics,

    T_c(f) = |H_c(f)|² / (|H_c(f)|² + S_n,c / S_x,c(f)),

per colour channel ``c`` and grid node (the PSF varies over the field, so does ``T``), where

* ``H_c`` is the optical transfer function of the node's PSF window after white balance
  (``H_c(0) = 1``: the light missing from the window arrives as the low-frequency veil, so the
  capture's mean level is the scene's);
* ``S_n,c = g_c² (λ_shot · t_c · x̄_c + λ_read)`` is the white sensor-noise power at the channel's
  mean linear level ``x̄_c``, referred to the scene through the channel's throughput ``t_c`` and
  white-balance gain ``g_c = 1 / t_c``;
* ``S_x,c(f) = A_c / max(|f|, f_min)²`` is the natural-image power law, its level ``A_c`` set so
  that its integral over the frequencies of an ``N``-pixel image equals the scene channel's
  variance: ``A_c = var(x_c) / (2π ln(f_max / f_min))``, ``f_min = 1/N``, ``f_max = 1/2``.

``T`` is real, zero-phase, 1 at ``f = 0`` (colours and mean level are kept) and falls to 0 where
the lens's transfer sinks under the noise: the scene's high-frequency energy is removed exactly
where the capture has none, more in the blurred red and blue channels than in green, more at
higher noise. Its impulse responses, one per channel and grid node, form a kernel grid that
:class:`~dmdiff.optics.blur.SpatiallyVaryingBlur` applies like the lens's own PSF grid.

Frequencies are in cycles per pixel; images are linear light in ``[0, 1]``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["signal_level", "wiener_transfer", "fidelity_kernels"]


def signal_level(x_linear: np.ndarray) -> np.ndarray:
    """The power-law level ``A_c`` per channel of an ``(H, W, 3)`` linear image (module docstring).

    Returns:
        ``(3,)`` float64, in (linear units)² · pixels² (so ``A / f²`` is a power spectral density
        over frequencies in cycles/pixel); floored at 1e-8 for flat images.
    """
    n = min(x_linear.shape[:2])
    variance = np.asarray(x_linear, np.float64).reshape(-1, x_linear.shape[-1]).var(axis=0)
    return np.maximum(variance / (2 * math.pi * math.log(0.5 * n)), 1e-8)


def _frequency_radius(size: int) -> np.ndarray:
    """``(size, size // 2 + 1)`` radial frequency |f| (cycles/pixel) of an rfft2 grid."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return np.hypot(fy, fx)


def wiener_transfer(psfs: np.ndarray, gains: np.ndarray, noise_power: np.ndarray, level: np.ndarray,
                    size: int, image_px: int) -> np.ndarray:
    """The Wiener transfer ``T`` of every PSF of a grid on an ``size × size`` frequency grid.

    Args:
        psfs: ``(C, G, G, K, K)`` PSF windows (each summing to the fraction of light it holds).
        gains: ``(C,)`` white-balance gains ``g_c``.
        noise_power: ``(C,)`` white noise power ``S_n,c`` referred to the scene (linear units²).
        level: ``(C,)`` power-law levels ``A_c`` (:func:`signal_level`).
        size: FFT side (≥ K).
        image_px: the image side ``N`` that sets ``f_min = 1/N``.

    Returns:
        ``(C, G, G, size, size // 2 + 1)`` float64 in ``[0, 1]``, rfft2 layout, ``T = 1`` at ``f = 0``.
    """
    k = psfs.shape[-1]
    padded = np.zeros(psfs.shape[:3] + (size, size))
    padded[..., :k, :k] = psfs
    padded = np.roll(padded, (-(k // 2), -(k // 2)), axis=(-2, -1))    # PSF centre at the origin
    otf = np.fft.rfft2(padded) * np.asarray(gains, np.float64)[:, None, None, None, None]
    power = np.abs(otf) ** 2
    radius = np.maximum(_frequency_radius(size), 1.0 / image_px)
    nsr = (np.asarray(noise_power, np.float64) / np.asarray(level, np.float64))[:, None, None, None, None] * radius ** 2
    transfer = power / (power + nsr)
    transfer[..., 0, 0] = 1.0
    return transfer


def fidelity_kernels(psfs: np.ndarray, gains: np.ndarray, noise_power: np.ndarray, level: np.ndarray,
                     image_px: int) -> np.ndarray:
    """The impulse responses of :func:`wiener_transfer`, as a kernel grid of the PSFs' shape.

    The transfer is sampled on a ``2K`` grid (so the responses do not wrap), brought back to space,
    cropped to ``K × K`` around its centre and renormalised to sum 1 (``T(0) = 1``).

    Returns:
        ``(C, G, G, K, K)`` float64 kernels, centred at ``K // 2``, each summing to 1.
    """
    k = psfs.shape[-1]
    size = 2 * k
    response = np.fft.irfft2(wiener_transfer(psfs, gains, noise_power, level, size, image_px), s=(size, size))
    response = np.roll(response, (k // 2, k // 2), axis=(-2, -1))[..., :k, :k]
    return response / response.sum(axis=(-2, -1), keepdims=True)
