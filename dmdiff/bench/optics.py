"""``dmdiff bench optics``: PSF-grid build time, and spatially varying blur speed against deepinv.

One run prints a small table:

- the time to build the default PSF grid (``MetalensSpec()``: 3 channels, 7×7 nodes, default
  bands) into a fresh, empty cache folder, so it is really computed;
- the throughput (Mpx/s, one RGB megapixel = H·W/1e6) of :class:`dmdiff.optics.blur.SpatiallyVaryingBlur`
  on a ``size × size`` RGB image with that grid's PSFs, with ``padding="reflect"``, both on a
  first call (support windows and kernel spectra computed) and on later calls (cached);
- the same for deepinv's ``SpaceVaryingBlur`` (the same model, ``y = Σ_k h_k * (w_k ⊙ x)``, built
  from the same PSFs and the same bilinear weights, reflect padding, FFT convolutions: its direct
  convolutions with 63×63 kernels over the whole image would take minutes per image on a CPU),
  and the speed ratio of each of ours against it, all measured in the same process;
- the largest absolute difference between the two outputs.

Times are medians over ``repeats`` runs. The image is uniform noise in ``[0, 1)`` (linear light).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.errors import DmdiffError
from dmdiff.optics.blur import SpatiallyVaryingBlur, node_weights
from dmdiff.optics.grid import psf_grid
from dmdiff.optics.spec import MetalensSpec


def deepinv_blur(psfs: np.ndarray, height: int, width: int):
    """deepinv's product-convolution operator for our PSF grid and bilinear weights.

    Args:
        psfs: ``(C, G, G, K, K)`` PSF grid.
        height, width: image size (px).

    Returns:
        a ``deepinv.physics.SpaceVaryingBlur`` whose ``A(x)`` maps ``(B, C, H, W)`` to
        ``(B, C, H, W)`` (true convolution, kernels centred at ``K // 2``, reflect padding).
    """
    from deepinv.physics import (
        SpaceVaryingBlur,  # local: heavy, only for this comparison
    )

    channels, gy, gx, ky, kx = psfs.shape
    rows = node_weights(np.arange(height), height, gy)  # (Gy, H)
    cols = node_weights(np.arange(width), width, gx)  # (Gx, W)
    multipliers = np.einsum("ih,jw->ijhw", rows, cols).reshape(1, 1, gy * gx, height, width)
    filters = np.asarray(psfs).reshape(1, channels, gy * gx, ky, kx)
    return SpaceVaryingBlur(
        filters=torch.from_numpy(np.ascontiguousarray(filters, dtype=np.float32)),
        multipliers=torch.from_numpy(multipliers.astype(np.float32)),
        padding="reflect",
        use_fft=True,
    )


def _median_time(fn: Callable[[], torch.Tensor], repeats: int, label: str) -> tuple[float, torch.Tensor]:
    """Median wall time (s) of ``repeats`` calls of ``fn``, and the last call's output."""
    times = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def blur_benchmark(psfs: np.ndarray, size: int, repeats: int, seed: int = 0) -> dict:
    """Time our blur and deepinv's on one ``size × size`` RGB image with the grid ``psfs``.

    Args:
        psfs: ``(C, G, G, K, K)`` float32 PSF grid.
        size: image side (px).
        repeats: timed runs per operator (the median is kept).
        seed: seed of the test image.

    Returns:
        ``{"ours_cold_s", "ours_warm_s", "deepinv_s", "max_abs_diff"}`` (seconds, and the largest
        absolute difference between the two outputs).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, psfs.shape[0], size, size, generator=generator)
    with torch.no_grad():
        cold_s, _ = _median_time(lambda: SpatiallyVaryingBlur(psfs)(x), repeats, "dmdiff, first call")
        ours = SpatiallyVaryingBlur(psfs)
        ours(x)  # builds and caches the plan
        warm_s, y_ours = _median_time(lambda: ours(x), repeats, "dmdiff")
        theirs = deepinv_blur(psfs, size, size)
        deepinv_s, y_theirs = _median_time(lambda: theirs.A(x), repeats, "deepinv")
    return {
        "ours_cold_s": cold_s,
        "ours_warm_s": warm_s,
        "deepinv_s": deepinv_s,
        "max_abs_diff": float((y_ours - y_theirs).abs().max()),
    }


def format_table(build_s: float, psfs_shape: tuple, size: int, repeats: int, result: dict) -> str:
    """The benchmark's printed report (a small plain-text table)."""
    channels, gy, gx, ky, kx = psfs_shape
    mpx = size * size / 1e6
    base = result["deepinv_s"]
    lines = [
        f"dmdiff bench optics  (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {repeats})",
        f"PSF grid build, default spec ({channels} ch, {gy}x{gx} nodes, {ky}x{kx} px, fresh cache): "
        f"{build_s:.1f} s",
        f"spatially varying blur, {size}x{size} RGB, reflect padding:",
        f"  {'operator':<34}{'time (s)':>10}{'Mpx/s':>9}{'vs deepinv':>12}",
    ]
    for label, key in (
        ("deepinv SpaceVaryingBlur (FFT)", "deepinv_s"),
        ("dmdiff, first call (plan+spectra)", "ours_cold_s"),
        ("dmdiff", "ours_warm_s"),
    ):
        t = result[key]
        lines.append(f"  {label:<34}{t:>10.3f}{mpx / t:>9.2f}{base / t:>11.1f}x")
    lines.append(f"max |dmdiff - deepinv| = {result['max_abs_diff']:.2e}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this benchmark."""
    parser.add_argument("--size", type=int, default=1024, help="image side for the blur benchmark (px)")
    parser.add_argument("--repeats", type=int, default=3)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark (``args.size``: image side in px, ``args.repeats``: timed runs)."""

    if args.repeats < 1:
        raise DmdiffError(f"--repeats must be at least 1, got {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="dmdiff-bench-psf-") as cache_dir:
        start = time.perf_counter()
        grid = psf_grid(MetalensSpec(), cache_dir=cache_dir)
        build_s = time.perf_counter() - start
    if args.size <= grid.psfs.shape[-1] // 2:
        half = grid.psfs.shape[-1] // 2
        raise DmdiffError(f"--size must exceed half the PSF size ({half} px), got {args.size}")
    result = blur_benchmark(grid.psfs, args.size, args.repeats)
    print(format_table(build_s, grid.psfs.shape, args.size, args.repeats, result))
    return 0
