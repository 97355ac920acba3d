"""MetalensCamera: the capture pipeline, the ideal-lens target and the degradation maps (small spec)."""

import math

import numpy as np
import pytest

from dmdiff.errors import DmdiffError
from dmdiff.optics.camera import (
    MAP_CHANNELS,
    CameraInputError,
    Capture,
    MetalensCamera,
)
from dmdiff.optics.sensor import srgb_to_linear
from dmdiff.optics.spec import MetalensSpec

SPEC = MetalensSpec(image_size_px=64, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)


@pytest.fixture(scope="module")
def camera(psf_cache):
    return MetalensCamera(SPEC, cache_dir=psf_cache, progress=False)


@pytest.fixture(scope="module")
def scene():
    """A detailed natural 64×64 scene (a downscaled bundled training photo)."""
    from dmdiff.data.simulate import resize_image
    from dmdiff.data.sources import load_photo

    photo = load_photo("astronaut")[100:356, 150:406]
    return resize_image(photo, 64, 64)


def psnr(a, b):
    return 10 * math.log10(1.0 / float(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def gradient_energy(img):
    img = np.asarray(img, np.float64)
    return float(np.mean(np.diff(img, axis=0) ** 2) + np.mean(np.diff(img, axis=1) ** 2))


def test_capture_shapes_and_quantisation(camera, scene):
    cap = camera.capture(scene, seed=0)
    assert isinstance(cap, Capture)
    assert cap.image.shape == (64, 64, 3) and cap.image.dtype == np.float32
    assert cap.image.min() >= 0 and cap.image.max() <= 1
    np.testing.assert_allclose(cap.image * 255, np.round(cap.image * 255), atol=1e-4)  # 8-bit levels
    assert cap.maps.shape == (7, 3, 3) and cap.maps.dtype == np.float32
    assert MetalensCamera.MAP_CHANNELS == MAP_CHANNELS == (
        "fwhm_r", "fwhm_g", "fwhm_b", "ee80_r", "ee80_g", "ee80_b", "noise")
    shot, read = cap.noise
    assert 1e-4 <= shot <= 1.2e-2 and read > 0


def test_capture_is_deterministic_per_seed(camera, scene):
    a, b, c = camera.capture(scene, seed=3), camera.capture(scene, seed=3), camera.capture(scene, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert a.noise == b.noise
    assert a.noise != c.noise and not np.array_equal(a.image, c.image)
    # the same noise levels with another seed: different pixels, same maps
    d = camera.capture(scene, seed=5, noise=a.noise)
    assert d.noise == a.noise and not np.array_equal(d.image, a.image)
    np.testing.assert_array_equal(d.maps, a.maps)
    # a SeedSequence can be reused: it is not consumed
    ss = np.random.SeedSequence(11)
    np.testing.assert_array_equal(camera.capture(scene, ss).image, camera.capture(scene, ss).image)


def test_capture_is_blurrier_and_ideal_is_close(camera, scene):
    clean = camera.capture(scene, seed=0, noise=(0.0, 0.0)).image
    assert gradient_energy(clean) < 0.6 * gradient_energy(scene)
    noisy = camera.capture(scene, seed=0, noise=(1e-3, 1e-6)).image
    ideal = camera.ideal(scene)
    assert ideal.shape == scene.shape and ideal.dtype == np.float32
    assert psnr(ideal, scene) > 35
    assert psnr(ideal, scene) > psnr(noisy, scene) + 12
    assert psnr(clean, scene) < 25  # the metalens degrades the image a lot


def test_noise_level_shows_in_capture_and_map(camera):
    grey = np.full((64, 64, 3), 0.5, np.float32)
    low = camera.capture(grey, seed=1, noise=(1e-4, 1e-7))
    high = camera.capture(grey, seed=1, noise=(1e-2, 1e-4))
    assert high.image.std() > 3 * low.image.std()
    assert high.maps[6, 0, 0] == pytest.approx(math.sqrt(0.5 * 1e-2 + 1e-4), rel=1e-5)
    assert np.all(high.maps[6] == high.maps[6, 0, 0])


def test_white_stays_white_and_grey_stays_grey(camera):
    """The flat-field white balance: a uniform scene keeps its colour and (on average) its level."""
    grey = np.full((64, 64, 3), 0.6, np.float32)
    out = camera.capture(grey, seed=0, noise=(0.0, 0.0)).image
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0.6, atol=3 / 255)
    gains = camera.wb_gains
    assert gains.shape == (3,) and np.all(np.abs(gains - 1) < 0.1)


def test_maps_are_physical(camera):
    maps = camera.capture(np.zeros((64, 64, 3), np.float32), seed=0).maps
    fwhm, ee80 = maps[:3], maps[3:6]
    k = SPEC.psf_size_px
    assert np.all(fwhm >= 0.5) and np.all(fwhm <= k)
    assert np.all(ee80 > 0.3) and np.all(ee80 <= k / math.sqrt(2))
    centre = SPEC.grid_size // 2
    # chromatic aberration: the lens is designed for green, red and blue are defocused
    assert fwhm[1, centre, centre] < fwhm[0, centre, centre]
    assert fwhm[1, centre, centre] < fwhm[2, centre, centre]
    # rotational symmetry of the lens: the four corners agree
    np.testing.assert_allclose(maps[:6, 0, 0], maps[:6, -1, -1], rtol=1e-3)
    np.testing.assert_allclose(maps[:6, 0, -1], maps[:6, -1, 0], rtol=1e-3)


def test_the_halo_keeps_the_light_the_core_window_misses(psf_cache, camera):
    """A point source: the halo puts the grid's out-of-window light on the sensor, far out too."""
    n = SPEC.image_size_px
    point = np.zeros((n, n, 3), np.float32)
    point[n // 2, n // 2] = 1.0
    hazy = camera.optics_linear(point)
    clear = MetalensCamera(SPEC, cache_dir=psf_cache, haze=False, progress=False).optics_linear(point)
    y, x = np.mgrid[0:n, 0:n] - n // 2
    far = np.hypot(y, x) > SPEC.psf_size_px // 2 * math.sqrt(2) + 1     # beyond the square core
    assert np.all(np.abs(clear[far]) < 1e-7)  # zero up to FFT round-off
    core = camera.grid.psfs[:, 1, 1].sum(axis=(-2, -1))
    assert np.all(hazy[far].sum(axis=0) > 0.5 * (1 - core))              # most of the rest lands far
    np.testing.assert_allclose(clear.sum(axis=(0, 1)), core, rtol=5e-3)   # the point is half a pixel off the node
    # the centre node's core + halo, plus the halos of the point's mirror images beyond the border
    assert np.all(hazy.sum(axis=(0, 1)) >= 0.99 * camera.grid.energy()[:, 1, 1])



def test_bad_inputs_are_clear_errors(camera, scene):
    with pytest.raises(DmdiffError, match=r"100×80 px .* 64×64 px.*resize") as e:
        camera.capture(np.zeros((80, 100, 3), np.float32), seed=0)
    assert isinstance(e.value, ValueError)
    with pytest.raises(DmdiffError, match=r"\(H, W, 3\)"):
        camera.capture(np.zeros((64, 64), np.float32), seed=0)
    with pytest.raises(DmdiffError, match="divide by 255"):
        camera.capture((scene * 255).astype(np.uint8), seed=0)
    bad = scene.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DmdiffError, match="NaN"):
        camera.ideal(bad)
    with pytest.raises(DmdiffError, match=r"\[0, 1\]"):
        camera.capture(scene * 2, seed=0)
    with pytest.raises(DmdiffError, match="seed"):
        camera.capture(scene, seed=-1)


def test_ideal_takes_crops_of_the_sensor(camera, scene):
    """The ideal lens is shift-invariant: on a crop it gives the crop of the full frame's result
    away from the crop's borders; the spatially varying capture still needs the whole sensor."""
    full = camera.ideal(scene)
    crop = camera.ideal(scene[8:40, 4:44])
    m = camera.ideal_kernel.shape[-1] // 2
    np.testing.assert_allclose(crop[m:-m, m:-m], full[8 + m:40 - m, 4 + m:44 - m], atol=1e-5)
    with pytest.raises(CameraInputError, match="sensor"):
        camera.capture(scene[8:40, 4:44], seed=0)


def test_ideal_keeps_flat_fields_and_linear_light(camera):
    flat = np.full((64, 64, 3), 0.3, np.float32)
    np.testing.assert_allclose(camera.ideal(flat), 0.3, atol=1e-5)
    k = camera.ideal_kernel
    assert k.shape[0] == 3 and k.shape[1] % 2 == 1
    np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0)
    # an edge is blurred in linear light: the midpoint of a black/white edge is brighter than 0.5 sRGB
    edge = np.zeros((64, 64, 3), np.float32)
    edge[:, 32:] = 1.0
    out = camera.ideal(edge)
    lin = srgb_to_linear(out[32, 30:34, 1])
    assert np.all(np.diff(lin) >= -1e-6)
