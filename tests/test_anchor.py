"""The colour anchor (DMDiffConfig.anchor_sigma_px, anchor_rl_iterations) and its low-pass (dmdiff.model.lowpass)."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_dmdiff import _images, _maps, make_model  # noqa: E402

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.evaluation.baselines import richardson_lucy
from dmdiff.model.dmdiff import DMDiffConfig
from dmdiff.model.lowpass import gaussian_lowpass
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.model.tiling import tiled_restore

SIGMA = 6.0


@pytest.fixture(scope="module")
def anchored():
    return make_model(anchor_sigma_px=SIGMA)


@contextlib.contextmanager
def unanchored(model):
    """The same model (same weights) with the anchor switched off."""
    config = model.config
    model.config = replace(config, anchor_sigma_px=None, anchor_rl_iterations=None)
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


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 2, 4, 1100)])
def test_lowpass_is_differentiable_and_rejects_bad_sigma(shape):
    x = torch.rand(*shape, requires_grad=True)
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


# ---- the deconvolved anchor (anchor_rl_iterations) --------------------------------------------

RL_ITERATIONS = 4


def lens_like_psf(k=31):
    """A (3, K, K) PSF, blurrier in red and blue, not normalised (set_anchor_psf normalises)."""
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    return np.stack([3 * gaussian_filter(delta, s) for s in (4.0, 1.5, 5.0)])


@pytest.fixture(scope="module")
def deconvolving():
    model = make_model(anchor_sigma_px=SIGMA, anchor_rl_iterations=RL_ITERATIONS)
    model.set_anchor_psf(lens_like_psf())
    return model


def test_deconvolved_anchor_is_the_lowpass_of_richardson_lucy(deconvolving):
    """The anchor is G_σ(RL_n(x)) with the normalised PSF (the baseline's RL, same numbers), and
    the positive path carries it instead of G_σ(x)."""
    x, maps = _images(hw=(48, 40)), _maps()
    psf = lens_like_psf()
    expected = np.stack([gaussian_filter(richardson_lucy(im.numpy().transpose(1, 2, 0), psf, RL_ITERATIONS),
                                         (SIGMA, SIGMA, 0), mode="reflect").transpose(2, 0, 1) for im in x])
    np.testing.assert_allclose(deconvolving.input_anchor(x).numpy(), expected, atol=1e-5)
    assert (deconvolving.input_anchor(x) - gaussian_lowpass(x, SIGMA)).abs().mean() > 1e-3
    with torch.no_grad():
        y = deconvolving(x, maps, "positive")
        with unanchored(deconvolving) as plain:
            free = plain(x, maps, "positive")
    np.testing.assert_allclose((y - free).numpy(), expected - gaussian_lowpass(free, SIGMA).numpy(), atol=1e-5)
    restored, latents = deconvolving.restore(x, maps, return_latents=True)
    np.testing.assert_allclose(latents.anchor.numpy(), expected, atol=1e-5)


def test_deconvolved_anchor_needs_its_psf(deconvolving, tmp_path):
    bare = make_model(anchor_sigma_px=SIGMA, anchor_rl_iterations=RL_ITERATIONS)
    with pytest.raises(DmdiffError, match="no PSF is set"):
        bare.restore(_images(hw=(32, 32)), _maps())
    with pytest.raises(DmdiffError, match="does not deconvolve"):
        make_model(anchor_sigma_px=SIGMA).set_anchor_psf(lens_like_psf())
    for bad in (np.ones((3, 8, 8)), np.ones((1, 9, 9)), -lens_like_psf(), np.zeros((3, 9, 9))):
        with pytest.raises(DmdiffError, match="anchor PSF"):
            bare.set_anchor_psf(bad)
    folder = DMDiffPipeline.from_model(deconvolving).save_pretrained(tmp_path / "p")
    loaded = DMDiffPipeline.from_pretrained(folder).model
    assert torch.equal(loaded.anchor_psf, deconvolving.anchor_psf)
    # a lens's whole grid: the Richardson-Lucy anchor takes its central PSF; None keeps the model's
    grid = np.zeros((3, 3, 3, 31, 31))
    grid[:, 1, 1] = 2 * lens_like_psf()
    grid[:, 0, 0] = lens_like_psf()[::-1]
    loaded.use_capture_lens(None)
    assert torch.equal(loaded.anchor_psf, deconvolving.anchor_psf)
    loaded.use_capture_lens(grid)
    assert torch.allclose(loaded.anchor_psf, deconvolving.anchor_psf)
    make_model(anchor_sigma_px=SIGMA).use_capture_lens(grid)           # nothing to set: no error
    x, maps = _images(hw=(32, 32)), _maps()
    assert torch.allclose(loaded.restore(x, maps), deconvolving.restore(x, maps), atol=1e-6)
    (folder / "anchor_psf.safetensors").unlink()
    with pytest.raises(DmdiffError, match="lacks anchor_psf.safetensors"):
        DMDiffPipeline.from_pretrained(folder)


@pytest.mark.parametrize("bad, match", [(0, "anchor_rl_iterations must be"), (True, "anchor_rl_iterations must be"),
                                        (2.5, "anchor_rl_iterations must be"), (10, "set anchor_sigma_px")])
def test_deconvolved_anchor_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        DMDiffConfig(anchor_sigma_px=None if bad == 10 else SIGMA, anchor_rl_iterations=bad)


# ---- the Wiener anchor with the PSF grid (anchor_wiener_nsr) ------------------------------------

NSR = 2e-4


def lens_like_grid(g=3, k=31):
    """A (3, G, G, K, K) grid whose PSFs widen towards the field's corners (not normalised)."""
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    grid = np.empty((3, g, g, k, k))
    for i in range(g):
        for j in range(g):
            off = np.hypot(i - (g - 1) / 2, j - (g - 1) / 2)
            grid[:, i, j] = [2 * gaussian_filter(delta, s * (1 + off)) for s in (2.0, 1.0, 2.5)]
    return grid


def smooth_scene(h=90, w=75, seed=0):
    """Large-scale colour patches in (0.1, 0.9): (1, 3, H, W)."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random((3, h, w)), (0, 6, 6))
    x = 0.1 + 0.8 * (x - x.min()) / (x.max() - x.min())
    return torch.from_numpy(x).float()[None]


def test_wiener_grid_undoes_the_varying_blur_of_the_large_scales():
    """A smooth scene blurred by the spatially varying blur of the grid (linear light) comes back:
    the deconvolved large scales are far closer to the scene's than the capture's are; a flat image
    stays flat (the regulariser keeps the mean); sizes that are no multiple of the block work."""
    from dmdiff.optics.blur import SpatiallyVaryingBlur
    from dmdiff.optics.deconvolution import check_psf_grid, wiener_varying_large_scales
    from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

    grid = torch.from_numpy(check_psf_grid(lens_like_grid()))
    scene = smooth_scene()
    capture = linear_to_srgb(SpatiallyVaryingBlur(grid)(srgb_to_linear(scene).double()).float().clamp(0, 1))
    restored = wiener_varying_large_scales(capture, grid, NSR, scale=3)
    assert restored.shape == scene.shape and restored.dtype == scene.dtype

    def error(a):
        return float((gaussian_lowpass(a, SIGMA) - gaussian_lowpass(scene, SIGMA)).abs().mean())
    assert error(restored) < 0.5 * error(capture)
    flat = torch.full((2, 3, 40, 41), 0.4)
    assert torch.allclose(wiener_varying_large_scales(flat, grid, NSR), flat, atol=1e-4)
    with pytest.raises(DmdiffError, match="odd"):
        wiener_varying_large_scales(flat, grid, NSR, scale=2)


def test_wiener_grid_of_one_psf_everywhere_is_shift_invariant():
    """With the same PSF at every node the blend is one Wiener filter: translating the image moves
    the result (away from the borders), and the grid size does not matter."""
    from dmdiff.optics.deconvolution import check_psf_grid, wiener_varying_large_scales

    one = lens_like_grid(g=1)
    x = smooth_scene(96, 96, seed=3)
    a = wiener_varying_large_scales(x, torch.from_numpy(check_psf_grid(one)), NSR)
    b = wiener_varying_large_scales(x, torch.from_numpy(check_psf_grid(np.tile(one, (1, 4, 4, 1, 1)))), NSR)
    assert torch.allclose(a, b, atol=1e-5)


def test_wiener_grid_chunks_and_kept_gains_change_nothing(monkeypatch):
    """Deconvolving the nodes a few at a time (large photos) gives the same up to rounding; the gains
    kept from the previous call serve only the same lens, regulariser and size: alternating two lenses
    and two sizes, every call equals a call that computed its gains afresh."""
    from dmdiff.optics import deconvolution
    from dmdiff.optics.deconvolution import check_psf_grid, wiener_varying_large_scales

    first = torch.from_numpy(check_psf_grid(lens_like_grid()))
    second = torch.from_numpy(check_psf_grid(lens_like_grid() ** 2))          # narrower PSFs
    small, large = smooth_scene(48, 40, seed=1), smooth_scene(60, 52, seed=2)

    def fresh(x, grid, nsr=NSR):
        monkeypatch.setattr(deconvolution, "_wiener_gains_kept", deconvolution._KeptResults(2))
        return wiener_varying_large_scales(x, grid, nsr)

    expected = {key: fresh(x, grid, nsr) for key, (x, grid, nsr) in
                {"a": (small, first, NSR), "b": (small, second, NSR), "c": (large, first, NSR),
                 "d": (small, first, 4 * NSR)}.items()}
    assert not torch.equal(expected["a"], expected["b"]) and not torch.equal(expected["a"], expected["d"])
    kept = deconvolution._KeptResults(2)
    monkeypatch.setattr(deconvolution, "_wiener_gains_kept", kept)
    for key, x, grid, nsr in [("a", small, first, NSR), ("a", small, first, NSR), ("b", small, second, NSR),
                              ("a", small, first, NSR), ("c", large, first, NSR), ("d", small, first, 4 * NSR),
                              ("a", small, first, NSR)]:
        assert torch.equal(wiener_varying_large_scales(x, grid, nsr), expected[key]), key
    assert len(kept._kept) == 2
    monkeypatch.setattr(deconvolution, "WIENER_CHUNK_BYTES", 1)              # one node at a time
    monkeypatch.setattr(deconvolution, "_wiener_gains_kept", deconvolution._KeptResults(2))
    chunked = wiener_varying_large_scales(torch.cat([small, small.flip(-1)]), first, NSR)
    assert torch.allclose(chunked, torch.cat([expected["a"], fresh(small.flip(-1), first)]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def wiener_anchored():
    model = make_model(anchor_sigma_px=SIGMA, anchor_wiener_nsr=NSR)
    model.set_anchor_psf(lens_like_grid())
    return model


def test_wiener_anchor_is_the_lowpass_of_the_grid_deconvolution(wiener_anchored, tmp_path):
    """The anchor is G_σ(W(x)) with the normalised grid; the positive path carries it; an anchor
    handed to forward (a crop's, cut from its frame's) replaces it; the pipeline keeps the grid."""
    from dmdiff.model.dmdiff import ANCHOR_WIENER_SCALE_PX
    from dmdiff.optics.deconvolution import check_psf_grid, wiener_varying_large_scales

    x, maps = _images(hw=(48, 40)), _maps()
    grid = torch.from_numpy(check_psf_grid(lens_like_grid())).float()
    expected = gaussian_lowpass(wiener_varying_large_scales(x, grid, NSR, ANCHOR_WIENER_SCALE_PX), SIGMA)
    assert torch.allclose(wiener_anchored.input_anchor(x), expected, atol=1e-6)
    assert (expected - gaussian_lowpass(x, SIGMA)).abs().mean() > 1e-3
    with torch.no_grad():
        y = wiener_anchored(x, maps, "positive")
        given = wiener_anchored(x, maps, "positive", anchor=torch.zeros_like(x))
    assert torch.allclose(y - given, expected, atol=1e-5)
    folder = DMDiffPipeline.from_model(wiener_anchored).save_pretrained(tmp_path / "p")
    loaded = DMDiffPipeline.from_pretrained(folder).model
    assert loaded.anchor_psf.shape == (3, 3, 3, 31, 31) and torch.equal(loaded.anchor_psf, wiener_anchored.anchor_psf)
    assert torch.allclose(loaded.restore(x, maps), wiener_anchored.restore(x, maps), atol=1e-6)
    with pytest.raises(DmdiffError, match="anchor PSF is unusable"):
        loaded.set_anchor_psf(lens_like_psf())                  # a single PSF where a grid is due


@pytest.mark.parametrize("kwargs, match", [
    ({"anchor_wiener_nsr": 0}, "anchor_wiener_nsr must be"), ({"anchor_wiener_nsr": True}, "anchor_wiener_nsr must be"),
    ({"anchor_wiener_nsr": "1e-4"}, "anchor_wiener_nsr must be"),
    ({"anchor_wiener_nsr": 1e-4, "anchor_sigma_px": None}, "set anchor_sigma_px"),
    ({"anchor_wiener_nsr": 1e-4, "anchor_rl_iterations": 3}, "set one of them")])
def test_wiener_anchor_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DMDiffConfig(**{"anchor_sigma_px": SIGMA, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"anchor_wiener_nsr": NSR, "input_wiener_nsr": 0}, "input_wiener_nsr must be"),
    ({"anchor_wiener_nsr": NSR, "input_wiener_nsr": "3e-3"}, "input_wiener_nsr must be"),
    ({"input_wiener_nsr": 3e-3}, "set anchor_wiener_nsr"),
    ({"anchor_wiener_nsr": NSR, "input_rl_iterations": 0}, "input_rl_iterations must be"),
    ({"anchor_wiener_nsr": NSR, "input_rl_iterations": 2.5}, "input_rl_iterations must be"),
    ({"anchor_wiener_nsr": NSR, "input_rl_iterations": True}, "input_rl_iterations must be"),
    ({"input_rl_iterations": 20}, "set anchor_wiener_nsr"),
    ({"anchor_wiener_nsr": NSR, "input_rl_iterations": 20, "input_wiener_nsr": 3e-3}, "set one of them")])
def test_deconvolved_input_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DMDiffConfig(**{"anchor_sigma_px": SIGMA, **kwargs})


def test_deconvolved_input_keeps_the_captures_fine_detail_and_undoes_the_blur_above_it():
    """W(x) + x − B(x): with a lens that does not blur (one-pixel PSFs) the capture comes back; with
    the lens-like grid the scene's blurred large scales come back (far closer than the capture's),
    while pixel-level detail added to the capture passes through as it is."""
    from dmdiff.optics.blur import SpatiallyVaryingBlur
    from dmdiff.optics.deconvolution import check_psf_grid, wiener_varying_with_fine_detail
    from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

    x = torch.from_numpy(np.random.default_rng(5).uniform(0.1, 0.9, (1, 3, 40, 44))).float()
    sharp = np.zeros((3, 3, 3, 9, 9))
    sharp[..., 4, 4] = 1
    assert torch.allclose(wiener_varying_with_fine_detail(x, torch.from_numpy(check_psf_grid(sharp)), 1e-8),
                          x, atol=1e-4)
    grid = torch.from_numpy(check_psf_grid(lens_like_grid()))
    scene = smooth_scene()
    capture = linear_to_srgb(SpatiallyVaryingBlur(grid)(srgb_to_linear(scene).double()).float().clamp(0, 1))
    seen = wiener_varying_with_fine_detail(capture, grid, NSR)
    assert seen.shape == capture.shape and seen.dtype == capture.dtype

    def error(a):
        return float((gaussian_lowpass(a, SIGMA) - gaussian_lowpass(scene, SIGMA)).abs().mean())
    assert error(seen) < 0.5 * error(capture)
    grain = 0.02 * torch.from_numpy(np.random.default_rng(6).standard_normal(capture.shape)).float()
    passed = wiener_varying_with_fine_detail(capture + grain, grid, NSR) - seen   # pixel-level detail passes
    assert 0.8 < float((passed * grain).sum() / (grain * grain).sum()) < 1.5     # with gain about 1
    with pytest.raises(DmdiffError, match="odd"):
        wiener_varying_with_fine_detail(capture, grid, NSR, scale=1)
    # summed in place for memory, it keeps the bits of W(x) + (x − B(x)) written out, small photos and
    # large ones (converted a colour plane at a time)
    from dmdiff.optics.deconvolution import _deconvolved_blocks, _upsampled_srgb
    wide = torch.from_numpy(np.random.default_rng(7).uniform(-0.05, 1.05, (1, 3, 12, 1030))).float()
    for image in (capture + grain, wide):
        small, blended, large = _deconvolved_blocks(image, grid, NSR, 3)
        size = tuple(image.shape[-2:])
        written_out = (_upsampled_srgb(blended, 3, size, image.dtype, large)
                       + (image.clamp(0, 1) - _upsampled_srgb(small, 3, size, image.dtype, large)))
        assert torch.equal(wiener_varying_with_fine_detail(image, grid, NSR), written_out)


def test_richardson_lucy_input_undoes_the_whole_grids_blur():
    """The RL network input: with one-pixel PSFs the capture comes back; with the lens-like grid the
    scene's large scales come back far closer than the capture's, the more so with more iterations;
    it is the whole-grid Richardson–Lucy baseline's result (same update, sRGB in and out)."""
    from dmdiff.evaluation.baselines import richardson_lucy_sv, varying_blur
    from dmdiff.optics.blur import SpatiallyVaryingBlur
    from dmdiff.optics.deconvolution import check_psf_grid, richardson_lucy_grid_srgb
    from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear

    x = torch.from_numpy(np.random.default_rng(5).uniform(0.1, 0.9, (1, 3, 40, 44))).float()
    sharp = np.zeros((3, 3, 3, 9, 9))
    sharp[..., 4, 4] = 1
    assert torch.allclose(richardson_lucy_grid_srgb(x, torch.from_numpy(check_psf_grid(sharp)), 3), x, atol=1e-5)
    grid = torch.from_numpy(check_psf_grid(lens_like_grid()))
    scene = smooth_scene()
    capture = linear_to_srgb(SpatiallyVaryingBlur(grid)(srgb_to_linear(scene).double()).float().clamp(0, 1))

    def error(a):
        return float((gaussian_lowpass(a, SIGMA) - gaussian_lowpass(scene, SIGMA)).abs().mean())
    few, more = (richardson_lucy_grid_srgb(capture, grid, n) for n in (3, 20))
    assert few.shape == capture.shape and few.dtype == capture.dtype
    assert error(more) < error(few) < 0.8 * error(capture) and error(more) < 0.5 * error(capture)
    baseline = richardson_lucy_sv(capture[0].numpy().transpose(1, 2, 0), varying_blur(grid.numpy()), 20)
    assert np.allclose(more[0].numpy().transpose(1, 2, 0), baseline, atol=1e-5)
    # a large photo goes one colour plane at a time: the same values as all planes at once
    from dmdiff.optics.deconvolution import BY_PLANE_PX, richardson_lucy_varying
    wide = torch.from_numpy(np.random.default_rng(7).uniform(0, 1, (2, 3, 12, BY_PLANE_PX + 6))).float()
    together = linear_to_srgb(richardson_lucy_varying(srgb_to_linear(wide), SpatiallyVaryingBlur(grid), [3])[3]
                              .clamp(0, 1)).clamp(0, 1)
    assert torch.allclose(richardson_lucy_grid_srgb(wide, grid, 3), together, atol=1e-6)


def test_richardson_lucy_input_is_computed_once_per_capture_grid_and_count(monkeypatch):
    """The kept results serve only the same images, grid and iteration count, and a caller changing
    what it got in place does not change what the next caller gets."""
    from dmdiff.optics import deconvolution
    from dmdiff.optics.deconvolution import check_psf_grid, richardson_lucy_grid_srgb

    runs, unpatched = [], deconvolution.richardson_lucy_varying

    def counted(*args, **kwargs):
        runs.append(1)
        return unpatched(*args, **kwargs)

    monkeypatch.setattr(deconvolution, "_rl_grid_kept", deconvolution._KeptResults(4))
    monkeypatch.setattr(deconvolution, "richardson_lucy_varying", counted)
    grid = torch.from_numpy(check_psf_grid(lens_like_grid()))
    x = smooth_scene()
    first = richardson_lucy_grid_srgb(x, grid, 3)
    first += 1                                                     # the caller's own copy
    again = richardson_lucy_grid_srgb(x.clone(), grid, 3)
    assert len(runs) == 1 and float(again.max()) <= 1
    narrower = torch.from_numpy(check_psf_grid(lens_like_grid() ** 2))
    for args in ((x, grid, 4), (x, narrower, 3), (x.flip(-1).contiguous(), grid, 3)):
        richardson_lucy_grid_srgb(*args)
    assert len(runs) == 4


@pytest.mark.parametrize("deconvolution", [{"input_wiener_nsr": 3e-3}, {"input_rl_iterations": 5}])
def test_deconvolved_input_is_what_the_encoder_sees_whole_and_in_tiles(tmp_path, deconvolution):
    """A model with a deconvolved input (input_wiener_nsr or input_rl_iterations) restores from the
    deconvolved capture: its latents are those of path_latents on network_input(x), not on x; the
    anchor still comes from the capture; the tiled restore deconvolves the whole photo before
    cutting tiles (so its tiles' latents differ from tiling the raw capture); a prepared image
    carries it; the pipeline keeps the setting."""
    from dmdiff.model.dmdiff import network_input
    from dmdiff.model.tiling import tiled_latents

    model = make_model(anchor_sigma_px=SIGMA, anchor_wiener_nsr=NSR, **deconvolution)
    model.set_anchor_psf(lens_like_grid())
    x, maps = _images(hw=(64, 64)), _maps()
    seen = network_input(x, model.config, model.anchor_psf)
    assert (seen - x).abs().mean() > 1e-3 and torch.equal(model.network_input(x), seen)
    latents = model.restore_latents(x, maps)
    assert torch.equal(latents.z_positive, model.path_latents(seen, maps).z_positive)
    assert not torch.allclose(latents.z_positive, model.path_latents(x, maps).z_positive, atol=1e-4)
    assert torch.equal(latents.anchor, model.input_anchor(x))
    tiled = tiled_latents(model, x, maps, tile=32, overlap=8)
    plain = make_model(anchor_sigma_px=SIGMA, anchor_wiener_nsr=NSR)
    plain.load_trainable_state_dict(model.trainable_state_dict())
    plain.set_anchor_psf(lens_like_grid())
    assert torch.allclose(tiled.z_positive, tiled_latents(plain, seen, maps, tile=32, overlap=8).z_positive,
                          atol=1e-5)
    pipe = DMDiffPipeline.from_model(model)               # a folder restore prepares it in its reader thread
    prepared = pipe.prepare(x[0], maps[0])
    assert torch.equal(prepared.seen, model.network_input(x[:1]))
    assert torch.equal(pipe.latents(prepared).z_positive, model.restore_latents(x[:1], maps[:1]).z_positive)
    assert prepared.seen is None and prepared.anchor is not None   # released once encoded; decoding keeps the anchor
    assert torch.equal(pipe.latents(prepared, tile=32, overlap=8).z_positive,
                       tiled_latents(model, x[:1], maps[:1], tile=32, overlap=8).z_positive)
    loaded = DMDiffPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "p")).model
    assert all(getattr(loaded.config, k) == v for k, v in deconvolution.items())
    assert torch.allclose(loaded.restore(x, maps), model.restore(x, maps), atol=1e-6)
