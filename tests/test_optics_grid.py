"""PSF grid: node geometry, consistency with psf(), rotation symmetry, disk cache, sharpness maps."""

import math
import time

import numpy as np
import pytest

import dmdiff.optics.grid as grid_module
from dmdiff.optics.grid import PSFGrid, halo_layout, ideal_psf_rgb, psf_grid, sharpness_maps
from dmdiff.optics.propagation import ideal_psf, psf
from dmdiff.optics.spec import MetalensSpec

SMALL = MetalensSpec(aperture_diameter_m=50e-6, focal_length_m=100e-6, image_size_px=64,
                     psf_size_px=31, grid_size=3, wavelengths_per_channel=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("psf")
    return psf_grid(SMALL, cache_dir=cache, progress=False), cache


def node_field_deg(spec, i, j):
    """Field angle (deg) of node (i, j) from the architecture's node formula."""
    h = w = spec.image_size_px
    g = spec.grid_size
    x = ((j + 0.5) * w / g - 0.5 - (w - 1) / 2) * spec.pitch_m
    y = ((i + 0.5) * h / g - 0.5 - (h - 1) / 2) * spec.pitch_m
    return math.degrees(math.atan(math.hypot(x, y) / spec.focal_length_m))


def test_shapes_dtypes_and_node_field_angles(small):
    grid, _ = small
    assert grid.spec == SMALL
    assert grid.psfs.shape == (3, 3, 3, 31, 31) and grid.psfs.dtype == np.float32
    assert grid.field_deg.shape == (3, 3, 2) and grid.field_deg.dtype == np.float64
    np.testing.assert_allclose(grid.field_deg[1, 1], 0)
    theta = node_field_deg(SMALL, 1, 2)
    np.testing.assert_allclose(grid.field_deg[1, 2], [theta, 0], atol=1e-12)     # right of centre
    np.testing.assert_allclose(grid.field_deg[2, 1], [0, theta], atol=1e-12)     # below (y down)
    np.testing.assert_allclose(grid.field_deg[0, 0], [-node_field_deg(SMALL, 0, 0) / math.sqrt(2)] * 2)
    assert grid.psfs.min() >= 0
    sums = grid.psfs.sum(axis=(3, 4))
    assert np.all((sums > 0.5) & (sums <= 1))
    kh, b, kc = halo_layout(SMALL)
    assert (kh, b) == (2 * 64 - 1, 3) and kc * b >= kh
    assert grid.halo.shape == (3, 3, 3, kc, kc) and grid.halo.dtype == np.float32
    assert grid.halo_bin_px == b and grid.halo.min() >= 0
    assert np.all(grid.halo[..., kc // 2, kc // 2] == 0)             # the core's cell is empty
    assert np.all(grid.energy() <= 1.01) and np.all(grid.energy() > sums)


def disc_moments(p: np.ndarray, radius: float):
    """Centroid (2,) and covariance (2, 2) in (x, y) pixels of p inside the disc |(x, y)| <= radius."""
    n = p.shape[0]
    y, x = np.mgrid[0:n, 0:n] - n // 2
    w = p * (x ** 2 + y ** 2 <= radius ** 2)
    xy = np.stack([x.ravel(), y.ravel()])
    mean = xy @ w.ravel() / w.sum()
    d = xy - mean[:, None]
    return mean, (d * w.ravel()) @ d.T / w.sum()


@pytest.mark.parametrize("i, j", [(1, 1), (1, 2), (0, 0)])
def test_nodes_are_band_averages_of_psf(small, i, j):
    grid, _ = small
    theta = node_field_deg(SMALL, i, j)
    for c in range(3):
        ref = np.mean([psf(SMALL, lam, theta, 31, SMALL.pitch_m) for lam in SMALL.wavelengths(c)], axis=0)
        node = grid.psfs[c, i, j].astype(np.float64)
        if (i, j) != (0, 0):            # field along +x: no rotation
            np.testing.assert_allclose(node, ref, rtol=1e-5, atol=1e-6 * ref.max())
            continue
        # azimuth −135° (up-left): same energy, and moments inside the inscribed disc rotate
        assert node.sum() == pytest.approx(ref.sum(), rel=1e-5)
        rot = np.array([[-1, 1], [-1, -1]]) / math.sqrt(2)         # (cos, −sin; sin, cos)
        mean, cov = disc_moments(node, 15)
        ref_mean, ref_cov = disc_moments(ref, 15)
        np.testing.assert_allclose(mean, rot @ ref_mean, atol=0.03)
        np.testing.assert_allclose(cov, rot @ ref_cov @ rot.T, atol=0.03 * np.trace(ref_cov))


def test_mirror_nodes_hold_mirror_images(small):
    p = small[0].psfs
    tol = 1e-6 * p.max()
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(p[:, i, j], p[:, i, 2 - j, :, ::-1], atol=tol)    # left-right
            np.testing.assert_allclose(p[:, i, j], p[:, 2 - i, j, ::-1, :], atol=tol)    # up-down
            np.testing.assert_allclose(p[:, i, j], p[:, j, i].swapaxes(-1, -2), atol=tol)  # diagonal


def test_rotation_turns_the_field_axis_to_the_azimuth():
    """An elongated Gaussian along +x, rotated to azimuth 30° (y down), matches the analytic one."""
    k, n_px = 4, 41
    fine_n = n_px * k
    c = (fine_n - 1) / 2
    v, u = np.mgrid[0:fine_n, 0:fine_n] - c

    def gaussian(cos_az, sin_az):
        along, across = u * cos_az + v * sin_az, -u * sin_az + v * cos_az
        return np.exp(-0.5 * ((along / 24.0) ** 2 + (across / 6.0) ** 2))

    base = gaussian(1.0, 0.0)
    az = math.radians(30)
    rotated = grid_module._rotated_binned(base, math.cos(az), math.sin(az), k)
    expected = grid_module.bin_pixels(gaussian(math.cos(az), math.sin(az)), k)
    assert rotated.sum() == pytest.approx(base.sum(), rel=1e-12)
    np.testing.assert_allclose(rotated, expected, atol=5e-3 * expected.max())


def test_cache_is_reused_and_identical(small, monkeypatch):
    grid, cache = small
    path = cache / f"psfgrid-{SMALL.cache_key()}.safetensors"
    assert path.exists()
    assert sorted(p.name for p in cache.iterdir()) == [path.name]      # no temp files left

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached grid must not be recomputed")

    monkeypatch.setattr(grid_module, "LensSpectrum", forbidden)
    start = time.perf_counter()
    again = psf_grid(SMALL, cache_dir=cache, progress=False)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(again.psfs, grid.psfs)
    np.testing.assert_array_equal(again.halo, grid.halo)
    np.testing.assert_array_equal(again.field_deg, grid.field_deg)
    monkeypatch.setenv("DMDIFF_CACHE", str(cache))
    np.testing.assert_array_equal(psf_grid(SMALL, progress=False).psfs, grid.psfs)


def test_unreadable_cache_is_recomputed(small, tmp_path):
    grid, _ = small
    path = tmp_path / f"psfgrid-{SMALL.cache_key()}.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable PSF cache"):
        fresh = psf_grid(SMALL, cache_dir=tmp_path, progress=True)
    np.testing.assert_array_equal(fresh.psfs, grid.psfs)
    np.testing.assert_array_equal(psf_grid(SMALL, cache_dir=tmp_path, progress=False).psfs, grid.psfs)


def test_sharpness_metrics_of_gaussians():
    n = 63
    v, u = np.mgrid[0:n, 0:n] - n // 2
    sigmas, shift = (1.5, 3.0, 6.0), (2.5, -4.0)
    kernels = [np.exp(-((u - shift[0]) ** 2 + (v - shift[1]) ** 2) / (2 * s * s)) for s in sigmas]
    psfs = np.stack([k / k.sum() for k in kernels]).astype(np.float32)[:, None, None]
    maps = sharpness_maps(PSFGrid(psfs, np.zeros((1, 1, 2)), SMALL))
    assert maps["fwhm_px"].shape == (3, 1, 1) and maps["fwhm_px"].dtype == np.float32
    for c, s in enumerate(sigmas):
        assert maps["fwhm_px"][c, 0, 0] == pytest.approx(2 * math.sqrt(2 * math.log(2)) * s, rel=0.03)
        assert maps["ee80_px"][c, 0, 0] == pytest.approx(math.sqrt(-2 * math.log(0.2)) * s, rel=0.03)


def test_sharpness_maps_of_the_default_optics(tmp_path):
    spec = MetalensSpec(grid_size=3, wavelengths_per_channel=1)    # default lens, coarse grid
    maps = sharpness_maps(psf_grid(spec, cache_dir=tmp_path, progress=False))
    fwhm, ee80 = maps["fwhm_px"], maps["ee80_px"]
    assert fwhm.shape == ee80.shape == (3, 3, 3)
    np.testing.assert_allclose(ee80, ee80[:, ::-1, ::-1], rtol=1e-4)
    r, g, b = ee80
    assert g[1, 1] < g[1, 2] < g[2, 2]                 # coma grows with the field angle
    assert r[1, 1] < r[1, 2] < r[2, 2]
    for metric in (fwhm, ee80):                        # chromatic defocus blurs red and blue
        assert metric[0, 1, 1] > 3 * metric[1, 1, 1] and metric[2, 1, 1] > 3 * metric[1, 1, 1]
    assert np.all(r > g)


def test_ideal_psf_rgb_is_the_band_averaged_airy_pattern():
    ideal = ideal_psf_rgb(SMALL, 15)
    assert ideal.shape == (3, 15, 15) and ideal.dtype == np.float32
    for c in range(3):
        ref = np.mean([ideal_psf(SMALL, lam, 15, SMALL.pitch_m) for lam in SMALL.wavelengths(c)], axis=0)
        np.testing.assert_allclose(ideal[c], ref, rtol=1e-5, atol=1e-7)
        assert np.unravel_index(ideal[c].argmax(), (15, 15)) == (7, 7)
        assert 0.95 < ideal[c].sum() <= 1
