"""Batched Richardson–Lucy (dmdiff.optics.deconvolution), shared by the baseline and the model's anchor."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dmdiff.evaluation.baselines import richardson_lucy
from dmdiff.optics.deconvolution import richardson_lucy_linear, richardson_lucy_srgb


def gaussian_psf(k=15, sigmas=(1.0, 2.0, 3.0)):
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    psf = np.stack([gaussian_filter(delta, s) for s in sigmas])
    return psf / psf.sum(axis=(1, 2), keepdims=True)


def test_batch_equals_one_image_at_a_time_and_the_numpy_baseline():
    psf = gaussian_psf()
    images = np.random.default_rng(0).random((2, 3, 40, 52))
    batch = richardson_lucy_srgb(torch.from_numpy(images), torch.from_numpy(psf), 6).numpy()
    for i in range(2):
        one = richardson_lucy_srgb(torch.from_numpy(images[i:i + 1]), torch.from_numpy(psf), 6).numpy()
        np.testing.assert_allclose(batch[i:i + 1], one, atol=1e-12)
        baseline = richardson_lucy(images[i].transpose(1, 2, 0), psf, 6).transpose(2, 0, 1)
        np.testing.assert_allclose(batch[i], baseline, atol=1e-5)   # float32 output vs float64


def test_it_sharpens_a_blurred_edge_and_keeps_a_flat_image():
    psf = gaussian_psf()
    sharp = np.zeros((3, 48, 48))
    sharp[:, :, 24:] = 1.0
    blurred = np.stack([gaussian_filter(sharp[c], s, mode="reflect") for c, s in enumerate((1.0, 2.0, 3.0))])
    out = richardson_lucy_linear(torch.from_numpy(blurred)[None], torch.from_numpy(psf), [1, 20])
    err = [np.abs(out[n][0].numpy() - sharp).mean() for n in (1, 20)]
    assert err[1] < 0.8 * np.abs(blurred - sharp).mean() and err[1] < err[0]
    flat = torch.full((1, 3, 30, 30), 0.3, dtype=torch.float64)
    assert torch.allclose(richardson_lucy_linear(flat, torch.from_numpy(psf), [10])[10], flat, atol=1e-9)


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (9, 20), (7, 64)])
def test_images_smaller_than_the_psf_work(hw):
    """Even extensions shorter than the 63-px kernel are padded by edge repetition."""
    psf = torch.from_numpy(gaussian_psf(k=63, sigmas=(4.0, 2.0, 6.0)))
    x = torch.rand(1, 3, *hw)
    y = richardson_lucy_srgb(x, psf, 5)
    assert y.shape == x.shape and torch.isfinite(y).all() and 0 <= y.min() and y.max() <= 1


# ---- the spatially varying blur's adjoint and Richardson–Lucy with it


@pytest.mark.parametrize("method,kernel", [("fft", 9), ("direct", 5)])
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
@pytest.mark.parametrize("hw", [(40, 33), (7, 9)])
def test_blur_adjoint_passes_the_dot_product_test(method, kernel, padding, hw):
    """<A x, y> = <x, Aᵀ y> for random x, y, a non-square grid and images smaller than the kernel."""
    from dmdiff.optics.blur import SpatiallyVaryingBlur

    rng = np.random.default_rng(1)
    blur = SpatiallyVaryingBlur(rng.random((3, 4, 5, kernel, kernel)), method=method)
    x, y = (torch.from_numpy(rng.random((2, 3, *hw))) for _ in range(2))
    lhs, rhs = (blur(x, padding) * y).sum().item(), (x * blur.adjoint(y, padding)).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    # and it is not the forward operator (the kernels are not symmetric): the test could fail
    assert not torch.allclose(blur.adjoint(y, padding), blur(y, padding))


def test_varying_richardson_lucy_undoes_a_varying_blur_better_than_the_central_psf():
    """Sharp on the left, blurred on the right: RL with the true grid recovers more than RL with
    the central kernel alone; a flat scene, whose varying blur is not flat (light moves towards the
    sharper side), is restored flat because the update divides by Aᵀ1."""
    from dmdiff.optics.blur import SpatiallyVaryingBlur
    from dmdiff.optics.deconvolution import check_psf_grid, richardson_lucy_varying

    psfs = np.stack([np.stack([gaussian_psf(k=15, sigmas=(s,) * 3) for s in (0.6, 1.5, 3.0)])] * 3, axis=1)
    psfs = psfs.transpose(2, 1, 0, 3, 4)                          # (3, 3 rows, 3 cols, K, K): blur grows to the right
    blur = SpatiallyVaryingBlur(check_psf_grid(psfs))
    blocks = np.random.default_rng(2).random((1, 3, 8, 8))
    scene = torch.from_numpy(0.1 + 0.8 * np.kron(blocks, np.ones((6, 6))))   # 6-px squares, 48 × 48
    observed = blur(scene)
    varying = richardson_lucy_varying(observed, blur, [30])[30]
    central = richardson_lucy_linear(observed, torch.from_numpy(psfs[:, 1, 1]), [30])[30]
    err = lambda out: (out - scene)[..., 8:-8, 8:-8].abs().mean().item()   # noqa: E731
    assert err(varying) < 0.8 * err(central) and err(varying) < 0.8 * err(observed)
    flat = torch.full((1, 3, 24, 24), 0.4, dtype=torch.float64)
    assert (blur(flat) - flat).abs().max() > 0.01
    assert torch.allclose(richardson_lucy_varying(blur(flat), blur, [8])[8], flat, atol=1e-9)
