"""dmdiff.evaluation.baselines: Wiener and Richardson-Lucy on a synthetic image blurred by a known PSF."""

import numpy as np
import pytest
import scipy.ndimage

from dmdiff.errors import DmdiffError
from dmdiff.evaluation import baselines
from dmdiff.metrics import psnr
from dmdiff.optics.deconvolution import DeconvolutionInputError as BaselineInputError
from dmdiff.optics.deconvolution import central_psf
from dmdiff.optics.sensor import linear_to_srgb, srgb_to_linear


def synthetic_image(seed: int, size: int = 64) -> np.ndarray:
    """Random coloured discs over a flat background: sharp edges, flat regions. (H, W, 3) float32 sRGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3))
    img[:] = rng.uniform(0.2, 0.8, 3)
    for _ in range(40):
        cy, cx = rng.uniform(0, size, 2)
        radius = size * 0.3 * rng.uniform(0.05, 1.0) ** 2 + 1.5
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.uniform(0, 1, 3)
    return img.astype(np.float32)


def gaussian_psf(sigma: float, size: int = 15, energy: float = 1.0) -> np.ndarray:
    """(3, size, size) Gaussian PSF (same for R, G, B) summing to ``energy``."""
    h = np.arange(size) - size // 2
    g = np.exp(-(h[:, None] ** 2 + h[None] ** 2) / (2 * sigma**2))
    return np.stack([g / g.sum() * energy] * 3)


def capture(img: np.ndarray, psf: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Blur in linear light (mirror borders, the PSF renormalised as a white-balanced camera would),
    add Gaussian noise of std ``noise`` (linear), back to sRGB, quantise to 8 bits."""
    lin = srgb_to_linear(img).astype(np.float64)
    psf = psf / psf.sum(axis=(1, 2), keepdims=True)
    out = np.stack([scipy.ndimage.convolve(lin[..., c], psf[c], mode="mirror") for c in range(3)], axis=-1)
    out += noise * np.random.default_rng(seed).standard_normal(out.shape)
    srgb = np.clip(linear_to_srgb(np.clip(out, 0, 1)), 0, 1)
    return (np.round(srgb * 255) / 255).astype(np.float32)


@pytest.fixture(scope="module")
def scene():
    psf = gaussian_psf(1.0, energy=0.8)  # a window that lost 20 % of the light, like a metalens PSF
    gt = synthetic_image(0)
    return gt, capture(gt, psf, noise=1e-4, seed=0), psf


def test_wiener_and_rl_raise_psnr(scene):
    gt, cap, psf = scene
    before = psnr(cap, gt)
    wiener = baselines.wiener_deconvolve(cap, psf, nsr=1e-4)
    rl = baselines.richardson_lucy(cap, psf, iterations=50)
    for out in (wiener, rl):
        assert out.shape == gt.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
    assert psnr(wiener, gt) > before + 3.0
    assert psnr(rl, gt) > before + 3.0


def test_psf_is_renormalised(scene):
    _, cap, psf = scene
    np.testing.assert_allclose(baselines.wiener_deconvolve(cap, psf, 1e-3),
                               baselines.wiener_deconvolve(cap, psf * 3.0, 1e-3), atol=1e-6)
    np.testing.assert_allclose(baselines.richardson_lucy(cap, psf, 5),
                               baselines.richardson_lucy(cap, psf * 0.5, 5), atol=1e-6)


def test_uniform_capture_has_no_border_artefacts():
    """A flat grey capture stays flat: no ringing or darkening at the borders, colour kept.

    Wiener with a constant NSR scales the mean (zero frequency) by 1 / (1 + nsr) in linear light;
    RL keeps it (even after many iterations: no zero-padding border error creeps in).
    """
    grey = np.empty((40, 56, 3), np.float32)
    grey[:] = (0.3, 0.5, 0.7)
    psf = gaussian_psf(2.0)
    nsr = 1e-3
    expect = linear_to_srgb(srgb_to_linear(grey.astype(np.float64)) / (1 + nsr))
    np.testing.assert_allclose(baselines.wiener_deconvolve(grey, psf, nsr), expect, atol=1e-5)
    np.testing.assert_allclose(baselines.richardson_lucy(grey, psf, 100), grey, atol=1e-5)


def test_tuning_picks_an_interior_parameter():
    psf = gaussian_psf(1.0)
    targets = [synthetic_image(s) for s in (1, 2)]
    captures = [capture(t, psf, noise=2e-2, seed=s) for s, t in enumerate(targets)]
    for method, grid in (("wiener", (1e-6, 1e-2, 1.0)), ("richardson_lucy", (1, 16, 100))):
        best, table = baselines.tune_baseline(method, captures, targets, psf, grid=grid, progress=False)
        param = baselines.METHODS[method]
        assert [row[param] for row in table] == list(grid)
        assert best == grid[1], table
        scores = [row["psnr"] for row in table]
        assert scores[1] > scores[0] and scores[1] > scores[2]
        assert table[1]["n"] == 2 and table[1]["psnr_std"] >= 0
        expect = np.mean([psnr(baselines.wiener_deconvolve(c, psf, best) if method == "wiener"
                               else baselines.richardson_lucy(c, psf, best), t)
                          for c, t in zip(captures, targets)])
        assert table[1]["psnr"] == pytest.approx(expect)


def test_richardson_lucy_matches_skimage_away_from_borders():
    """Same algorithm as skimage's; skimage zero-pads, so compare on a generously padded image."""
    from skimage.restoration import richardson_lucy as skimage_rl

    gt = synthetic_image(3, size=48)
    psf = gaussian_psf(1.5, size=9)
    cap = capture(gt, psf, noise=1e-3, seed=3)
    ours = srgb_to_linear(baselines.richardson_lucy(cap, psf, 10).astype(np.float64))
    pad = 60
    padded = np.pad(srgb_to_linear(cap.astype(np.float64)), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    theirs = np.stack([skimage_rl(padded[..., c], psf[c], num_iter=10, clip=False) for c in range(3)], axis=-1)
    theirs = np.clip(theirs[pad:-pad, pad:-pad], 0, 1)
    assert np.abs(ours - theirs).max() < 1e-5  # float32 sRGB output round-off


def test_central_psf():
    psfs = np.random.default_rng(0).random((3, 5, 5, 7, 7)).astype(np.float32)
    out = central_psf(psfs)
    assert out.shape == (3, 7, 7) and out.dtype == np.float64
    np.testing.assert_array_equal(out, psfs[:, 2, 2])

    class Grid:  # anything with a .psfs attribute, like dmdiff.optics.grid.PSFGrid
        pass

    grid = Grid()
    grid.psfs = psfs
    np.testing.assert_array_equal(central_psf(grid), psfs[:, 2, 2])
    with pytest.raises(BaselineInputError, match=r"\(3, G, G, K, K\)"):
        central_psf(psfs[0])


def test_bad_inputs_raise_clear_errors(scene):
    _, cap, psf = scene
    nan_image = cap.copy()
    nan_image[5, 5, 0] = np.nan
    nan_psf = psf.copy()
    nan_psf[1, 7, 7] = np.nan
    for run, arg in ((baselines.wiener_deconvolve, 1e-3), (baselines.richardson_lucy, 5)):
        with pytest.raises(BaselineInputError, match="NaN"):
            run(nan_image, psf, arg)
        with pytest.raises(BaselineInputError, match="NaN"):
            run(cap, nan_psf, arg)
        with pytest.raises(BaselineInputError, match="K odd"):
            run(cap, psf[:, :-1, :-1], arg)
        with pytest.raises(BaselineInputError, match="negative"):
            run(cap, -psf, arg)
        with pytest.raises(BaselineInputError, match=r"\(H, W, 3\)"):
            run(cap[..., 0], psf, arg)
        with pytest.raises(BaselineInputError, match="dtype"):
            run((cap * 255).astype(np.uint8), psf, arg)
        with pytest.raises(BaselineInputError, match="too small"):
            run(cap[:6, :6], psf, arg)
    for nsr in (0.0, -1.0, float("nan")):
        with pytest.raises(BaselineInputError, match="nsr"):
            baselines.wiener_deconvolve(cap, psf, nsr)
    for iterations in (0, 2.5):
        with pytest.raises(BaselineInputError, match="iterations"):
            baselines.richardson_lucy(cap, psf, iterations)
    with pytest.raises(BaselineInputError, match="method"):
        baselines.tune_baseline("tv", [cap], [cap], psf, progress=False)
    with pytest.raises(BaselineInputError, match="matching"):
        baselines.tune_baseline("wiener", [cap, cap], [cap], psf, progress=False)
    with pytest.raises(DmdiffError, match=r"targets\[0\].*NaN"):
        baselines.tune_baseline("wiener", [cap], [nan_image], psf, progress=False)
