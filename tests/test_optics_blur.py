"""SpatiallyVaryingBlur against the contract's exact model, written out pixel by pixel here."""

import numpy as np
import pytest
import scipy.signal
import torch

from dmdiff.bench.optics import blur_benchmark
from dmdiff.optics.blur import SpatiallyVaryingBlur


def reference_weights(coord: float, n: int, g: int) -> np.ndarray:
    """(g,) bilinear node weights at one pixel coordinate, from the contract's node positions."""
    nodes = [(i + 0.5) * n / g - 0.5 for i in range(g)]
    w = np.zeros(g)
    if coord <= nodes[0]:
        w[0] = 1.0
    elif coord >= nodes[-1]:
        w[-1] = 1.0
    else:
        i = max(k for k in range(g) if nodes[k] <= coord)
        f = (coord - nodes[i]) / (nodes[i + 1] - nodes[i])
        w[i], w[i + 1] = 1.0 - f, f
    return w


def reference_blur(x: np.ndarray, psfs: np.ndarray, padding: str) -> np.ndarray:
    """Spread every source pixel q by its own interpolated PSF h_q; x (B, C, H, W) float64.

    "reflect": the source domain is the image reflect-padded by K // 2; outside pixels use the
    weights at their own (outside) coordinates. "zeros": the source domain is the image.
    """
    _, _, height, width = x.shape
    _, gy, gx, k, _ = psfs.shape
    half = k // 2
    pad = half if padding == "reflect" else 0
    source = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect" if pad else "constant")
    out = np.zeros(x.shape[:2] + (height + 2 * pad + 2 * half, width + 2 * pad + 2 * half))
    for qy in range(source.shape[2]):
        a = reference_weights(qy - pad, height, gy)
        for qx in range(source.shape[3]):
            b = reference_weights(qx - pad, width, gx)
            h_q = np.einsum("i,j,cijkl->ckl", a, b, psfs)
            out[:, :, qy : qy + k, qx : qx + k] += source[:, :, qy, qx, None, None] * h_q
    start = pad + half
    return out[:, :, start : start + height, start : start + width]


def random_psfs(rng, channels=3, g=3, k=7, normalise=False):
    psfs = rng.random((channels, g, g, k, k))
    if normalise:
        psfs /= psfs.sum(axis=(-2, -1), keepdims=True)
    return psfs


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_matches_per_pixel_reference(method, padding):
    rng = np.random.default_rng(0)
    psfs = random_psfs(rng).astype(np.float32)
    x = rng.random((2, 3, 23, 29)).astype(np.float32)
    y = SpatiallyVaryingBlur(psfs, method=method)(torch.from_numpy(x), padding=padding)
    assert y.shape == x.shape and y.dtype == torch.float32
    expected = reference_blur(x.astype(np.float64), psfs.astype(np.float64), padding)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "height, width, g, k",
    [(16, 16, 3, 7), (17, 20, 4, 9), (9, 40, 2, 5), (5, 6, 3, 11), (2, 3, 3, 5), (12, 11, 1, 9)],
)
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_any_size_float64(height, width, g, k, padding):
    """Odd/even sizes, sizes not multiples of G, images smaller than the kernel, G = 1."""
    rng = np.random.default_rng(height * width + k)
    psfs = random_psfs(rng, g=g, k=k)
    x = rng.random((1, 3, height, width))
    y = SpatiallyVaryingBlur(torch.from_numpy(psfs))(torch.from_numpy(x), padding=padding)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), reference_blur(x, psfs, padding), rtol=0, atol=1e-10)


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("k", [5, 15])
def test_constant_grid_is_ordinary_convolution(g, k):
    rng = np.random.default_rng(k)
    kernels = rng.random((3, k, k))
    kernels /= kernels.sum(axis=(-2, -1), keepdims=True)
    psfs = np.broadcast_to(kernels[:, None, None], (3, g, g, k, k)).astype(np.float32)
    x = rng.random((1, 3, 30, 37)).astype(np.float32)
    blur = SpatiallyVaryingBlur(psfs)
    zeros = blur(torch.from_numpy(x), padding="zeros").numpy()
    reflect = blur(torch.from_numpy(x), padding="reflect").numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (k // 2,) * 2, (k // 2,) * 2), mode="reflect")
    for c in range(3):
        expected_zeros = scipy.signal.convolve2d(x[0, c], kernels[c], mode="same")
        expected_reflect = scipy.signal.convolve2d(padded[0, c], kernels[c], mode="valid")
        np.testing.assert_allclose(zeros[0, c], expected_zeros, rtol=0, atol=1e-5)
        np.testing.assert_allclose(reflect[0, c], expected_reflect, rtol=0, atol=1e-5)


def test_energy_is_conserved():
    """PSFs summing to 1 and no light reaching the border: total light in = total light out."""
    rng = np.random.default_rng(1)
    psfs = random_psfs(rng, g=5, k=9, normalise=True)
    x = np.zeros((1, 3, 40, 50))
    x[:, :, 4:-4, 4:-4] = rng.random((1, 3, 32, 42))
    y = SpatiallyVaryingBlur(psfs)(torch.from_numpy(x), padding="zeros").numpy()
    np.testing.assert_allclose(y.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)), rtol=1e-12)


def test_flat_field_stays_flat_with_centred_psfs():
    """Mirror-symmetric PSFs summing to 1: a flat field stays flat wherever the weights are
    bilinear over the PSF footprint (away from node lines: the spread model conserves energy, not
    flatness, near the weights' kinks or with asymmetric PSFs), and everywhere with reflect padding
    if all PSFs are equal."""
    rng = np.random.default_rng(2)
    psfs = random_psfs(rng, g=2, k=5)
    psfs = psfs + psfs[..., ::-1, :] + psfs[..., :, ::-1] + psfs[..., ::-1, ::-1]
    psfs /= psfs.sum(axis=(-2, -1), keepdims=True)
    x = torch.full((1, 3, 40, 40), 0.7, dtype=torch.float64)
    y = SpatiallyVaryingBlur(psfs)(x, padding="zeros").numpy()
    # nodes at 9.5 and 29.5 on both axes; the footprint (±2 px) of pixels 12..27 avoids them
    np.testing.assert_allclose(y[..., 12:28, 12:28], 0.7, rtol=1e-12)
    same = np.broadcast_to(psfs[:, :1, :1], psfs.shape)
    np.testing.assert_allclose(SpatiallyVaryingBlur(same)(x, padding="reflect").numpy(), 0.7, rtol=1e-12)


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_linear(method):
    rng = np.random.default_rng(3)
    blur = SpatiallyVaryingBlur(random_psfs(rng, k=7), method=method)
    x1, x2 = (torch.from_numpy(rng.random((2, 3, 21, 18))) for _ in range(2))
    np.testing.assert_allclose(blur(2.0 * x1 - 3.0 * x2), 2.0 * blur(x1) - 3.0 * blur(x2), atol=1e-12)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="odd"):
        SpatiallyVaryingBlur(np.ones((3, 2, 2, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        SpatiallyVaryingBlur(np.ones((3, 4, 4)))
    blur = SpatiallyVaryingBlur(np.ones((3, 2, 2, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        blur(torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="padding"):
        blur(torch.ones(1, 3, 8, 8), padding="circular")


def test_benchmark_baseline_is_the_same_operator():
    """deepinv's SpaceVaryingBlur, built as the benchmark builds it, gives our output."""
    rng = np.random.default_rng(4)
    psfs = random_psfs(rng, g=3, k=9, normalise=True).astype(np.float32)
    result = blur_benchmark(psfs, size=48, repeats=1)
    assert result["max_abs_diff"] < 1e-6
    assert min(result["ours_cold_s"], result["ours_warm_s"], result["deepinv_s"]) > 0
