"""A differentiable Gaussian low-pass on image batches that equals scipy's ``gaussian_filter``.

:func:`gaussian_lowpass` blurs ``(..., H, W)`` tensors along the last two axes with the kernel and
edge rule of ``scipy.ndimage.gaussian_filter(..., mode="reflect", truncate=4.0)`` (edges mirrored
with the edge pixel repeated: ``d c b a | a b c d``), so the colour anchor of the model
(:class:`dmdiff.model.dmdiff.DMDiffConfig` ``anchor_sigma_px``) and ``dmdiff restore``'s numpy
colour correction (:func:`dmdiff.model.color.color_correct`) compute the same low-pass.

Along an axis of up to :data:`MATRIX_MAX_PX` pixels it is the product with an ``n × n`` blur matrix
built by scipy itself, which also covers kernels longer than the axis (σ = 24 px on a 64-px
training crop, where the reflection folds more than once); longer axes (large photos restored in
tiles and anchored whole) use a padded 1-D convolution, whose cost grows with ``n`` rather than
``n²`` (depthwise, each row its own channel: on a 2048² photo 8× faster and with a seventh of the
memory of one batched single-channel convolution, the same values), one image plane at a time.
Written here rather than taken from torchvision because its ``gaussian_blur`` pads with torch's
``reflect`` (``d c b | a b c d``, scipy's ``mirror``) and needs a kernel shorter than the
image, so it could not match the numpy correction nor blur a 64-px crop at σ = 24.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from dmdiff.device import by_plane

__all__ = ["gaussian_lowpass", "TRUNCATE", "MATRIX_MAX_PX"]

#: Kernel half-width in standard deviations (scipy's default).
TRUNCATE = 4.0
#: Longest axis (px) blurred by a matrix product; longer ones by a 1-D convolution.
MATRIX_MAX_PX = 1024


@functools.lru_cache(maxsize=16)
def _kernel(sigma: float) -> np.ndarray:
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=16)
def _matrix(n: int, sigma: float) -> np.ndarray:
    return gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect", truncate=TRUNCATE)


def _blur_axis(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    kernel = _kernel(sigma)
    radius = len(kernel) // 2
    if n > MATRIX_MAX_PX and radius <= n:
        padded = torch.cat([x[..., :radius].flip(-1), x, x[..., n - radius:].flip(-1)], dim=-1)
        rows = padded.reshape(1, -1, n + 2 * radius)        # one channel per row: a depthwise convolution
        weight = torch.as_tensor(kernel, dtype=x.dtype, device=x.device).view(1, 1, -1).expand(rows.shape[1], 1, -1)
        out = F.conv1d(rows, weight, groups=rows.shape[1]).reshape(x.shape)
    else:
        out = x @ torch.as_tensor(_matrix(n, sigma), dtype=x.dtype, device=x.device).T
    return out.movedim(-1, dim)


def gaussian_lowpass(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian blur of ``x`` ``(..., H, W)`` with standard deviation ``sigma_px`` pixels along both
    image axes (reflected edges, kernel truncated at 4σ); same shape and dtype; differentiable."""
    if not sigma_px > 0:
        raise ValueError(f"sigma_px must be > 0, got {sigma_px!r}")
    sigma = float(sigma_px)
    return by_plane(lambda p: _blur_axis(_blur_axis(p, sigma, -1), sigma, -2), x, max(x.shape[-2:]) > MATRIX_MAX_PX)
