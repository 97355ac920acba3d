"""The colour anchor (DMDiffConfig.anchor_sigma_px) and its low-pass (dmdiff.model.lowpass)."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dmdiff.errors import ConfigError
from dmdiff.model.dmdiff import DMDiffConfig
from dmdiff.model.lowpass import gaussian_lowpass
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.model.tiling import tiled_restore

from test_dmdiff import _images, _maps, make_model  # noqa: E402

SIGMA = 6.0


@pytest.fixture(scope="module")
def anchored():
    return make_model(anchor_sigma_px=SIGMA)


@contextlib.contextmanager
def unanchored(model):
    """The same model (same weights) with the anchor switched off."""
    config = model.config
    model.config = replace(config, anchor_sigma_px=None)
    try:
        yield model
    finally:
        model.config = config


@pytest.mark.parametrize("shape, sigma", [((2, 3, 64, 64), 24.0), ((1, 3, 70, 33), 3.5), ((1, 2, 9, 1100), 2.0),
                                          ((1, 1, 3, 1500), 12.0)])
def test_lowpass_equals_scipys_reflect_gaussian(shape, sigma):
    """Both branches: the blur matrix (incl. kernels longer than the axis: σ = 24 on a 64-px crop
    folds twice) and, along axes over MATRIX_MAX_PX, the 1-D convolution."""
    x = np.random.default_rng(0).random(shape)
    ours = gaussian_lowpass(torch.from_numpy(x), sigma).numpy()
    np.testing.assert_allclose(ours, gaussian_filter(x, (0, 0, sigma, sigma), mode="reflect"), atol=1e-12)


def test_lowpass_is_differentiable_and_rejects_bad_sigma():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    gaussian_lowpass(x, 2.0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        gaussian_lowpass(x, 0.0)


def test_anchored_paths_keep_the_inputs_large_scale_colours(anchored):
    """Positive and neutral outputs have the input's low-pass (up to the low-pass of their own
    high-pass, which is small); the negative path is not anchored; the detail is the network's."""
    x, maps = _images(hw=(48, 40)), _maps()
    with torch.no_grad():
        for path in ("positive", "neutral"):
            y = anchored(x, maps, path)
            with unanchored(anchored) as plain:
                free = plain(x, maps, path)
            np.testing.assert_allclose((y - free).numpy(),
                                       (gaussian_lowpass(x, SIGMA) - gaussian_lowpass(free, SIGMA)).numpy(), atol=1e-5)
            assert (gaussian_lowpass(y, SIGMA) - gaussian_lowpass(x, SIGMA)).abs().mean() < \
                0.35 * (gaussian_lowpass(free, SIGMA) - gaussian_lowpass(x, SIGMA)).abs().mean()
        with unanchored(anchored) as plain:
            negative = plain(x, maps, "negative")
        assert torch.equal(anchored(x, maps, "negative"), negative)
        mixed = anchored(x, maps, ["negative", "positive"])
        assert torch.allclose(mixed[0], negative[0], atol=1e-6)
        assert torch.allclose(mixed[1], anchored(x, maps, "positive")[1], atol=1e-6)


def test_restore_and_redecode_apply_the_anchor(anchored):
    x, maps = _images(hw=(40, 40)), _maps()
    with torch.no_grad():
        expected = anchored(x, maps, "positive").clamp(0, 1)
    y, latents = anchored.restore(x, maps, alpha=1.0, return_latents=True)
    assert latents.anchor is not None and torch.allclose(y, expected, atol=1e-5)
    assert torch.equal(anchored.decode(latents, 1.0), y)
    assert torch.allclose(anchored.decode(latents, 0.0), anchored(x, maps, "neutral").clamp(0, 1), atol=1e-5)


def test_tiled_restore_anchors_the_whole_image(anchored):
    """Several tiles: the anchor is applied once to the blended image, so the result is close to
    the one-tile restore (the latents differ only through per-tile SVDA and GroupNorm)."""
    x, maps = _images(B=1, hw=(96, 96)), _maps(B=1)
    whole = anchored.restore(x, maps)
    tiled = tiled_restore(anchored, x, maps, tile=64, overlap=32)
    assert tiled.shape == whole.shape
    low_diff = (gaussian_lowpass(tiled, SIGMA) - gaussian_lowpass(whole, SIGMA)).abs().mean()
    assert low_diff < 0.01, low_diff


def test_anchor_is_saved_with_the_model(anchored, tmp_path):
    DMDiffPipeline.from_model(anchored).save_pretrained(tmp_path / "p")
    loaded = DMDiffPipeline.from_pretrained(tmp_path / "p").model
    assert loaded.config.anchor_sigma_px == SIGMA
    x, maps = _images(hw=(32, 32)), _maps()
    assert torch.allclose(loaded.restore(x, maps), anchored.restore(x, maps), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3.0, True, "12", float("nan")])
def test_anchor_config_validation(bad):
    with pytest.raises(ConfigError, match="anchor_sigma_px"):
        DMDiffConfig(anchor_sigma_px=bad)
