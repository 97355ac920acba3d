"""The sensor and the image signal processor (ISP), plus the pseudo-data noise augmentation.

Everything here is numpy with an explicit ``numpy.random.Generator`` (no global random state).
Values are in ``[0, 1]`` units of the sensor's full scale.

Camera order (docs/method.md, "The optics"): blur in linear light → :func:`add_sensor_noise` (shot + read) →
:func:`quantize` (clip and A/D conversion, e.g. 10-bit raw) → :func:`white_balance` →
:func:`linear_to_srgb` (gamma) → 8-bit. :func:`isp` runs the last three steps.

Noise model (Brooks et al., "Unprocessing Images for Learned Raw Denoising", CVPR 2019): the raw
value ``y`` of a pixel with expected value ``x`` is Gaussian with variance ``λ_shot·x + λ_read``
(photon shot noise, Poisson-like, and signal-independent read noise), and
:func:`sample_noise_levels` draws ``(λ_shot, λ_read)`` as in their paper:
``log λ_shot ~ U[log 1e-4, log 1.2e-2]``, ``log λ_read = 2.18·log λ_shot + 1.20 + N(0, 0.26²)``
(natural logarithms).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch

__all__ = [
    "srgb_to_linear", "linear_to_srgb", "sample_noise_levels", "noise_std", "add_sensor_noise",
    "quantize", "white_balance", "isp", "smooth_noise_field", "pseudo_noise_augment",
    "SHOT_RANGE", "typical_noise_levels",
]

#: Brooks et al. (2019) range of the shot-noise variance factor λ_shot.
SHOT_RANGE = (1e-4, 1.2e-2)
#: Brooks et al. (2019) read noise given the shot noise: ``log λ_read = SLOPE·log λ_shot + OFFSET + N(0, STD²)``.
READ_SLOPE, READ_OFFSET, READ_LOG_STD = 2.18, 1.20, 0.26


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def srgb_to_linear(x):
    """The sRGB decoding curve (IEC 61966-2-1): display values → linear light.

    ``x ≤ 0.04045: x / 12.92``, else ``((x + 0.055) / 1.055) ** 2.4``. Works on numpy arrays
    (float dtype kept, integers become float32) and on torch tensors.
    """
    if _is_torch(x):
        return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((np.maximum(x, 0.04045) + 0.055) / 1.055) ** 2.4).astype(
        x.dtype, copy=False)


def linear_to_srgb(y):
    """The sRGB encoding curve ("gamma"): linear light → display values; inverse of :func:`srgb_to_linear`.

    ``y ≤ 0.0031308: 12.92·y``, else ``1.055·y ** (1/2.4) − 0.055``. No clipping (values above 1
    stay above 1). numpy arrays or torch tensors.
    """
    if _is_torch(y):
        return torch.where(y <= 0.0031308, 12.92 * y, 1.055 * y.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float32)
    return np.where(y <= 0.0031308, 12.92 * y, 1.055 * np.maximum(y, 0.0031308) ** (1 / 2.4) - 0.055).astype(
        y.dtype, copy=False)


def sample_noise_levels(rng: np.random.Generator, shot_range: tuple[float, float] = SHOT_RANGE
                        ) -> tuple[float, float]:
    """Draw ``(λ_shot, λ_read)`` variance factors as Brooks et al. (2019).

    ``log λ_shot ~ U[log lo, log hi]`` (default ``[1e-4, 1.2e-2]``) and
    ``log λ_read = 2.18·log λ_shot + 1.20 + N(0, 0.26²)``.
    """
    lo, hi = shot_range
    if not 0 < lo <= hi:
        raise ValueError(f"shot_range must satisfy 0 < lo <= hi, got {shot_range}")
    log_shot = rng.uniform(math.log(lo), math.log(hi))
    log_read = READ_SLOPE * log_shot + READ_OFFSET + rng.normal(0.0, READ_LOG_STD)
    return float(math.exp(log_shot)), float(math.exp(log_read))


def typical_noise_levels(shot_range: tuple[float, float] = SHOT_RANGE) -> tuple[float, float]:
    """The middle of :func:`sample_noise_levels`' distribution: ``(λ_shot, λ_read)`` with ``λ_shot``
    the geometric mean of ``shot_range`` (the median of its log-uniform draw) and ``λ_read`` the median
    read noise at that shot noise, ``exp(2.18·log λ_shot + 1.20)``. For the default range:
    about ``(1.10e-3, 1.17e-6)``, a noise std of 0.023 at mid grey (0.5 linear)."""
    lo, hi = shot_range
    if not 0 < lo <= hi:
        raise ValueError(f"shot_range must satisfy 0 < lo <= hi, got {shot_range}")
    log_shot = (math.log(lo) + math.log(hi)) / 2
    return float(math.exp(log_shot)), float(math.exp(READ_SLOPE * log_shot + READ_OFFSET))


def noise_std(x, shot: float, read: float):
    """Standard deviation ``sqrt(λ_shot·x + λ_read)`` of the sensor noise at linear signal ``x``."""
    return np.sqrt(shot * np.maximum(x, 0.0) + read)


def add_sensor_noise(x_linear: np.ndarray, shot: float, read: float, rng: np.random.Generator) -> np.ndarray:
    """Add heteroscedastic Gaussian noise of variance ``λ_shot·x + λ_read`` (x clipped at 0 in it).

    Args:
        x_linear: linear-light image (any shape), in ``[0, 1]`` units of full scale.
        shot, read: the variance factors (see :func:`sample_noise_levels`).
        rng: the random generator (the only source of randomness).

    Returns:
        The noisy image, same shape, float32 (float64 input stays float64); **not** clipped, so the
        noise statistics are exact; :func:`quantize` clips.
    """
    if shot < 0 or read < 0:
        raise ValueError(f"noise variances must be >= 0, got shot={shot}, read={read}")
    x = np.asarray(x_linear)
    dtype = x.dtype if x.dtype == np.float64 else np.float32
    std = np.sqrt(shot * np.maximum(x, 0.0, dtype=np.float64) + read)
    return (x + std * rng.standard_normal(x.shape)).astype(dtype)


def quantize(x, bits: int):
    """Clip to ``[0, 1]`` and round to the ``2**bits`` levels ``k / (2**bits − 1)`` (an A/D converter;
    8 bits: what an 8-bit PNG stores).

    Returns the level values, not integer codes: float32 numpy for numpy input (computed in
    float64), or a tensor of the input's dtype and device for a torch tensor (computed in it, ties
    to even).
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 24:
        raise ValueError(f"bits must be an integer in [1, 24], got {bits!r}")
    top = float((1 << int(bits)) - 1)
    if isinstance(x, torch.Tensor):
        return x.clamp(0, 1).mul(top).round().div(top)
    return (np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * top) / top).astype(np.float32)


def white_balance(x_linear: np.ndarray, gains) -> np.ndarray:
    """Multiply each channel of ``(..., 3)`` linear values by its gain and clip to ``[0, 1]``."""
    gains = np.asarray(gains, dtype=np.float64).reshape(3)
    return np.clip(np.asarray(x_linear) * gains, 0.0, 1.0).astype(np.float32)


def isp(raw_linear: np.ndarray, gains=(1.0, 1.0, 1.0), bits: int | None = 8) -> np.ndarray:
    """The simple ISP: white balance (per-channel gains, clip) → sRGB gamma → quantise to ``bits``.

    Args:
        raw_linear: ``(H, W, 3)`` linear raw values in ``[0, 1]``.
        gains: R, G, B white-balance gains (see ``MetalensCamera.wb_gains`` for how the camera
            derives them from its PSFs).
        bits: output bit depth, or None for float output without quantisation.

    Returns:
        ``(H, W, 3)`` float32 sRGB values in ``[0, 1]``.
    """
    out = np.clip(linear_to_srgb(white_balance(raw_linear, gains)), 0.0, 1.0)
    return quantize(out, bits) if bits else out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# pseudo-data noise augmentation (docs/method.md)
# ---------------------------------------------------------------------------------------------


def smooth_noise_field(shape: tuple[int, int], scale_px: float, rng: np.random.Generator,
                       channels: int = 1) -> np.ndarray:
    """A smooth (low-frequency) random field of unit standard deviation, shape ``(H, W, channels)``.

    White Gaussian noise on a coarse lattice with spacing ``scale_px`` pixels, upsampled to
    ``(H, W)`` with cubic-spline interpolation: blotches about ``scale_px`` wide, with almost no
    power above ``1 / scale_px`` cycles per pixel. Normalised to zero mean and unit std per channel.
    """

    height, width = shape
    if scale_px < 1:
        raise ValueError(f"scale_px must be >= 1, got {scale_px}")
    gh = max(2, int(math.ceil(height / scale_px)) + 3)
    gw = max(2, int(math.ceil(width / scale_px)) + 3)
    coarse = rng.standard_normal((channels, gh, gw))
    # pixel centres onto the coarse lattice, with a random sub-lattice offset
    oy, ox = rng.uniform(0.0, 1.0, size=2)
    yy = 1.0 + oy + (np.arange(height) + 0.5) / scale_px
    xx = 1.0 + ox + (np.arange(width) + 0.5) / scale_px
    gy, gx = np.meshgrid(yy, xx, indexing="ij")
    out = np.empty((height, width, channels), dtype=np.float64)
    for c in range(channels):
        out[:, :, c] = scipy.ndimage.map_coordinates(coarse[c], [gy, gx], order=3, mode="mirror")
    out -= out.mean(axis=(0, 1), keepdims=True)
    out /= np.maximum(out.std(axis=(0, 1), keepdims=True), 1e-12)
    return out.astype(np.float32)


def pseudo_noise_augment(img_srgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0, *,
                         shot_range: tuple[float, float] = (1e-4, 4e-3), blotch_amplitude: float = 0.03,
                         blotch_scale_px: tuple[float, float] = (8.0, 32.0), chroma_fraction: float = 0.5,
                         dark_exponent: float = 2.0, quantize_bits: int | None = 8) -> np.ndarray:
    """Sensor-like noise for pseudo pairs (docs/method.md, stage 2): shot noise + low-frequency blotches.

    1. Signal-dependent noise in linear light: variance ``λ_shot·x + λ_read`` with levels drawn by
       :func:`sample_noise_levels` (``shot_range``, scaled by ``strength²`` so the std scales by
       ``strength``); through the sRGB curve it is stronger in the shadows, as on a real camera.
    2. Low-frequency "blotchy" noise, the look of denoised/compressed low-light phone images: a smooth
       random field (:func:`smooth_noise_field`, blotch size drawn from ``blotch_scale_px``) with a
       luma part (same in R, G, B) and a chroma part (per channel, ``chroma_fraction`` of it), in sRGB
       values with amplitude ``strength · blotch_amplitude · (1 − luma) ** dark_exponent``: strongest
       in dark regions, vanishing in highlights.

    Args:
        img_srgb: ``(H, W, 3)`` float sRGB image in ``[0, 1]``.
        rng: the random generator.
        strength: overall scale; 0 returns the (quantised) input unchanged.

    Returns:
        ``(H, W, 3)`` float32 sRGB image in ``[0, 1]``, quantised to ``quantize_bits`` (None: not).
    """
    img = np.asarray(img_srgb, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img_srgb must have shape (H, W, 3), got {img.shape}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strength == 0:
        out = np.clip(img, 0.0, 1.0)
        return quantize(out, quantize_bits) if quantize_bits else out
    height, width, _ = img.shape
    # 1. shot + read noise in linear light
    shot, read = sample_noise_levels(rng, shot_range)
    lin = srgb_to_linear(np.clip(img, 0.0, 1.0)).astype(np.float64)
    noisy = add_sensor_noise(lin, shot * strength**2, read * strength**2, rng)
    out = linear_to_srgb(np.clip(noisy, 0.0, 1.0)).astype(np.float64)
    # 2. low-frequency blotches, stronger in the dark
    lo, hi = blotch_scale_px
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    luma = smooth_noise_field((height, width), scale, rng, channels=1)
    chroma = smooth_noise_field((height, width), scale, rng, channels=3)
    chroma -= chroma.mean(axis=2, keepdims=True)  # colour shifts without brightness change
    field = (1 - chroma_fraction) * luma + chroma_fraction * chroma * math.sqrt(1.5)
    y = img @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    weight = (1.0 - np.clip(y, 0.0, 1.0))[:, :, None] ** dark_exponent
    out = np.clip(out + strength * blotch_amplitude * weight * field, 0.0, 1.0)
    return quantize(out, quantize_bits) if quantize_bits else out.astype(np.float32)
