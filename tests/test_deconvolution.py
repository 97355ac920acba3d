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
