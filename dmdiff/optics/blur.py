"""Spatially varying blur over a PSF grid, by product convolution on compact supports.

Model (the contract of ``docs/architecture.md``). A PSF grid ``psfs`` of shape
``(C, G, G, K, K)`` holds one kernel ``h_k`` per channel and grid node ``k = (i, j)``, centred at
``(K // 2, K // 2)``. Node ``(i, j)`` of an ``H × W`` image sits at pixel coordinates
``y_i = (i + 0.5)·H/G − 0.5``, ``x_j = (j + 0.5)·W/G − 0.5``. Each source pixel ``q`` is spread by
the PSF interpolated at ``q``::

    h_q = Σ_k w_k(q) h_k,        y(p) = Σ_q x(q) h_q(p − q)  =  Σ_k h_k * (w_k ⊙ x)

with ``w_k(q) = a_i(q_y) · b_j(q_x)`` the bilinear weights of the nodes, clamped to the outer
nodes beyond them (so ``Σ_k w_k = 1`` everywhere) and ``*`` a true convolution (not a
correlation).

Borders (``padding``):

- ``"zeros"``: the scene is dark outside the image (``x = 0`` there).
- ``"reflect"``: the scene continues beyond the border as the mirror image of the image (mirror
  about the border pixel, which is not repeated, as in ``numpy.pad(mode="reflect")``), over the
  ``K // 2`` pixels that can reach the image. Each of those outside pixels is spread by the PSF at
  its own position; since the weights are clamped beyond the outer nodes, that is the PSF of the
  nearest border pixel (for images at least ``G`` pixels wide). Equivalently: reflect-pad ``x``
  by ``K // 2``, blur the padded image with zeros outside it, crop.

Speed. ``w_k`` is non-zero only on the two grid cells on either side of node ``k`` along each axis,
so each term ``h_k * (w_k ⊙ x)`` is computed on that support window plus its ``K − 1`` halo only,
not over the whole image, and added into the output (overlap-add). All channels and the ``G``
nodes of a grid row go through one batched FFT (or, for ``K ≤ 7``, one grouped direct
convolution, which is faster there on CPU). Kernel spectra are cached per image size.
``dmdiff bench optics`` measures this operator against deepinv's ``SpaceVaryingBlur`` (the same
product-convolution model, FFT over the whole image per node) in the same process and prints
the speed ratio and the largest difference between the two outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

PADDINGS = ("zeros", "reflect")
METHODS = ("auto", "fft", "direct")
DIRECT_MAX_KERNEL_PX = 7  # auto: direct convolution up to this kernel size (measured on CPU)


def node_weights(coords: np.ndarray, n: int, g: int) -> np.ndarray:
    """Bilinear weights of the ``g`` grid nodes along one image axis, clamped beyond the outer nodes.

    Args:
        coords: ``(N,)`` pixel coordinates along the axis (may lie outside ``[0, n)``).
        n: image length along the axis (px).
        g: number of grid nodes along the axis; node ``i`` is at ``(i + 0.5)·n/g − 0.5``.

    Returns:
        ``(g, N)`` float64 weights, each column summing to 1.
    """
    step = n / g
    t = np.clip((np.asarray(coords, dtype=np.float64) - (0.5 * step - 0.5)) / step, 0.0, g - 1)
    return np.clip(1.0 - np.abs(t[None, :] - np.arange(g)[:, None]), 0.0, None)


def _reflect_index(coords: np.ndarray, n: int) -> np.ndarray:
    """Index of the image pixel that mirrors each coordinate (reflection without edge repeat)."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2 * (n - 1)
    m = np.mod(coords, period)
    return np.where(m >= n, period - m, m)


@dataclass
class _AxisPlan:
    """Where the node support windows lie along one axis.

    Canvas: the output accumulator along this axis, covering image coordinates
    ``[-pad - half, n + pad + half)`` (``pad``: scene extension, ``half = K // 2``: kernel halo).
    """

    src: torch.Tensor  # (g, L) long: image pixel read at each window position
    weights: torch.Tensor  # (g, L): node weight at each window position
    starts: list[int]  # (g,) canvas index where each window's full-convolution output begins
    canvas: int  # canvas length
    crop: int  # canvas index of image pixel 0


def _axis_plan(n: int, g: int, kernel_px: int, padding: str, dtype, device) -> _AxisPlan:
    """Support windows of the ``g`` nodes along an axis of ``n`` pixels (one common length ``L``)."""
    half = kernel_px // 2
    pad = half if padding == "reflect" else 0
    coords = np.arange(-pad, n + pad)  # the scene domain, in image coordinates
    weights = node_weights(coords, n, g)  # (g, N)
    nonzero = weights > 0
    first = nonzero.argmax(axis=1)  # 0 for a node with no support (images smaller than the grid)
    last = np.where(nonzero.any(axis=1), len(coords) - 1 - nonzero[:, ::-1].argmax(axis=1), 0)
    length = int((last - first).max()) + 1
    starts = np.minimum(first, len(coords) - length)  # keep every window inside the domain
    window = starts[:, None] + np.arange(length)[None, :]  # (g, L) domain indices
    src = coords[window] if padding == "zeros" else _reflect_index(coords[window], n)
    return _AxisPlan(
        src=torch.from_numpy(src).to(device),
        weights=torch.from_numpy(np.take_along_axis(weights, window, axis=1)).to(device, dtype),
        starts=[int(s) for s in starts],
        canvas=len(coords) + 2 * half,
        crop=pad + half,
    )


@dataclass
class _Plan:
    """Everything a blur of one image size needs, cached between calls."""

    rows: _AxisPlan
    cols: _AxisPlan
    fft_shape: tuple[int, int] | None  # (nL, nM) for the FFT method, None for direct
    kernels: torch.Tensor  # fft: (G, C, G, nL, nM//2+1) spectra; direct: (G, C·G, 1, K, K) flipped


class SpatiallyVaryingBlur:
    """Product-convolution blur ``y = Σ_k h_k * (w_k ⊙ x)`` over a PSF grid (see module docstring).

    Args:
        psfs: ``(C, G, G, K, K)`` numpy array or torch tensor, PSFs per channel and grid node
            (row ``i`` from the top, column ``j`` from the left), centred at ``K // 2``, ``K`` odd.
            A ``(C, Gy, Gx, Ky, Kx)`` grid with different sizes per axis works the same way.
        method: ``"fft"``, ``"direct"`` (grouped ``conv2d``) or ``"auto"`` (direct for
            ``K ≤ 7``, FFT above); all three compute the same result.

    Raises:
        ValueError: on a wrong shape, an even kernel size or an unknown method.
    """

    def __init__(self, psfs, method: str = "auto"):
        psfs = psfs if torch.is_tensor(psfs) else torch.from_numpy(np.array(psfs, dtype=np.float64))
        if psfs.ndim != 5:
            raise ValueError(f"psfs must have shape (C, G, G, K, K), got {tuple(psfs.shape)}")
        if psfs.shape[-1] % 2 == 0 or psfs.shape[-2] % 2 == 0:
            raise ValueError(f"PSF size must be odd (centre at K // 2), got {tuple(psfs.shape[-2:])}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.psfs = psfs.detach().to(torch.float64).cpu()
        if method == "auto":
            method = "direct" if max(psfs.shape[-2:]) <= DIRECT_MAX_KERNEL_PX else "fft"
        self.method = method
        self._plan_key: tuple | None = None
        self._plan: _Plan | None = None

    def __call__(self, x: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
        """Blur ``x``.

        Args:
            x: ``(B, C, H, W)`` float32 or float64 tensor (linear light), any ``H, W ≥ 1``.
            padding: ``"reflect"`` (default) or ``"zeros"``, see the module docstring.

        Returns:
            ``(B, C, H, W)`` tensor, same dtype and device as ``x``.
        """
        channels, (height, width) = self.psfs.shape[0], x.shape[-2:]
        plan = self._checked_plan(x, "x", padding)
        rows, cols = plan.rows, plan.cols
        canvas = x.new_zeros(x.shape[0], channels, rows.canvas, cols.canvas)
        for i, row_start in enumerate(rows.starts):
            windows = x[:, :, rows.src[i][None, :, None], cols.src[:, None, :]]  # (B, C, Gx, L, M)
            masked = windows * (rows.weights[i][None, :, None] * cols.weights[:, None, :])
            blurred = self._convolve_full(masked, plan, i)  # (B, C, Gx, L+K-1, M+K-1)
            rows_out = slice(row_start, row_start + blurred.shape[-2])
            for j, col_start in enumerate(cols.starts):
                canvas[:, :, rows_out, col_start : col_start + blurred.shape[-1]] += blurred[:, :, j]
        return canvas[:, :, rows.crop : rows.crop + height, cols.crop : cols.crop + width]

    def _checked_plan(self, t: torch.Tensor, name: str, padding: str) -> "_Plan":
        """The plan for ``t`` (``(B, C, H, W)``, ``C`` = the PSFs' channels) and ``padding``;
        ``ValueError`` naming ``name`` for another shape or an unknown padding."""
        channels = self.psfs.shape[0]
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(t.shape)}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        return self._get_plan(t.shape[-2], t.shape[-1], padding, t.dtype, t.device)

    def adjoint(self, y: torch.Tensor, padding: str = "reflect") -> torch.Tensor:
        """The adjoint (transpose) of :meth:`__call__`: ``x' = Σ_k w_k ⊙ (h̃_k ⋆ y)`` folded back.

        Each node's kernel is correlated with (not convolved over) the output window it wrote,
        multiplied by the node's weights and added back to the source pixels it read; with
        ``"reflect"`` the mirrored border pixels fold onto the pixels they copied. So
        ``<A x, y> = <x, Aᵀ y>`` for every ``x``, ``y`` (the tests check it), which is what
        Richardson–Lucy with this blur needs (:mod:`dmdiff.optics.deconvolution`).

        Args:
            y: ``(B, C, H, W)`` float32 or float64 tensor, an output of this blur's size.
            padding: the padding of the forward blur (``"reflect"`` or ``"zeros"``).

        Returns:
            ``(B, C, H, W)`` tensor, same dtype and device as ``y``.
        """
        channels, (height, width) = self.psfs.shape[0], y.shape[-2:]
        plan = self._checked_plan(y, "y", padding)
        rows, cols = plan.rows, plan.cols
        ky, kx = self.psfs.shape[-2:]
        canvas = y.new_zeros(y.shape[0], channels, rows.canvas, cols.canvas)
        canvas[:, :, rows.crop : rows.crop + height, cols.crop : cols.crop + width] = y
        length, size = rows.src.shape[1], cols.src.shape[1]
        x = y.new_zeros(y.shape[0], channels, height * width)
        for i, row_start in enumerate(rows.starts):
            patches = torch.stack([canvas[:, :, row_start : row_start + length + ky - 1,
                                          col_start : col_start + size + kx - 1] for col_start in cols.starts],
                                  dim=2)  # (B, C, Gx, L+K-1, M+K-1)
            masked = self._correlate_valid(patches, plan, i) * (rows.weights[i][None, :, None]
                                                                * cols.weights[:, None, :])
            flat = (rows.src[i][None, :, None] * width + cols.src[:, None, :]).reshape(-1)  # (Gx·L·M,)
            x.index_add_(2, flat, masked.reshape(*masked.shape[:2], -1))
        return x.view(y.shape[0], channels, height, width)

    def _correlate_valid(self, patches: torch.Tensor, plan: _Plan, row: int) -> torch.Tensor:
        """Valid correlation of ``(B, C, Gx, L+K-1, M+K-1)`` patches with grid row ``row``'s kernels
        → ``(B, C, Gx, L, M)``: the transpose of :meth:`_convolve_full`."""
        ky, kx = self.psfs.shape[-2:]
        out_h, out_w = patches.shape[-2] - ky + 1, patches.shape[-1] - kx + 1
        if plan.fft_shape is not None:
            spectrum = torch.fft.rfft2(patches, s=plan.fft_shape) * plan.kernels[row].conj()
            return torch.fft.irfft2(spectrum, s=plan.fft_shape)[..., :out_h, :out_w]
        b, c, g, h, w = patches.shape
        kernels = plan.kernels[row].flip(-2, -1)   # the plan holds flipped kernels for conv2d
        out = F.conv2d(patches.reshape(b, c * g, h, w), kernels, groups=c * g)
        return out.view(b, c, g, out_h, out_w)

    def _convolve_full(self, masked: torch.Tensor, plan: _Plan, row: int) -> torch.Tensor:
        """Full linear convolution of the ``(B, C, Gx, L, M)`` windows of grid row ``row``."""
        ky, kx = self.psfs.shape[-2:]
        out_h, out_w = masked.shape[-2] + ky - 1, masked.shape[-1] + kx - 1
        if plan.fft_shape is not None:
            spectrum = torch.fft.rfft2(masked, s=plan.fft_shape) * plan.kernels[row]
            return torch.fft.irfft2(spectrum, s=plan.fft_shape)[..., :out_h, :out_w]
        b, c, g, h, w = masked.shape
        out = F.conv2d(
            masked.reshape(b, c * g, h, w), plan.kernels[row], padding=(ky - 1, kx - 1), groups=c * g
        )
        return out.view(b, c, g, out_h, out_w)

    def _get_plan(self, height: int, width: int, padding: str, dtype, device) -> _Plan:
        """The plan for this image size (the last one is cached)."""
        key = (height, width, padding, dtype, device)
        if key != self._plan_key:
            self._plan = self._make_plan(height, width, padding, dtype, device)
            self._plan_key = key
        return self._plan

    def _make_plan(self, height: int, width: int, padding: str, dtype, device) -> _Plan:
        """Support windows for both axes and the kernels in the form the method needs."""
        channels, gy, gx, ky, kx = self.psfs.shape
        rows = _axis_plan(height, gy, ky, padding, dtype, device)
        cols = _axis_plan(width, gx, kx, padding, dtype, device)
        kernels = self.psfs.to(device, dtype).permute(1, 0, 2, 3, 4)  # (Gy, C, Gx, K, K)
        if self.method == "direct":
            flipped = kernels.flip(-2, -1).reshape(gy, channels * gx, 1, ky, kx)
            return _Plan(rows, cols, None, flipped.contiguous())
        shape = (
            scipy.fft.next_fast_len(rows.src.shape[1] + ky - 1, real=True),
            scipy.fft.next_fast_len(cols.src.shape[1] + kx - 1, real=True),
        )
        return _Plan(rows, cols, shape, torch.fft.rfft2(kernels, s=shape))
