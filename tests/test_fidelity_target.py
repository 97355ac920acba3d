"""The neutral path's fidelity target (Wiener transfer of the lens at the capture's noise level),
the validation split and the recommended α chosen on it."""

import json

import numpy as np
import pytest

from dmdiff.data.dataset import gt_blur_note, has_split
from dmdiff.data.simulate import simulate_dataset
from dmdiff.data.sources import PHOTOS, TEST_PHOTOS, TRAIN_PHOTOS, VALIDATION_PHOTOS, bundled_photos
from dmdiff.optics.camera import MetalensCamera
from dmdiff.optics.fidelity import fidelity_kernels, signal_level, wiener_transfer
from dmdiff.optics.spec import MetalensSpec
from dmdiff.perception import band_variance
from dmdiff.train.alpha import recommend_alpha

SPEC = MetalensSpec(image_size_px=64, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)
LOW_NOISE, MID_NOISE, HIGH_NOISE = (1e-4, 1e-7), (3e-3, 1e-5), (1.2e-2, 1e-4)


@pytest.fixture(scope="module")
def camera(psf_cache):
    return MetalensCamera(SPEC, cache_dir=psf_cache, progress=False)


@pytest.fixture(scope="module")
def scene():
    from dmdiff.data.simulate import resize_image
    from dmdiff.data.sources import load_photo

    return resize_image(load_photo("astronaut")[100:356, 150:406], 64, 64)


def psnr(a, b):
    return -10 * np.log10(np.mean((np.asarray(a, np.float64) - b) ** 2))


def test_target_holds_less_detail_than_the_scene_and_more_than_the_capture(camera, scene):
    capture = camera.capture(scene, seed=0, noise=MID_NOISE)
    target = camera.fidelity_target(scene, capture.noise)
    assert target.shape == scene.shape and target.dtype == np.float32
    assert 0.0 <= target.min() and target.max() <= 1.0
    assert band_variance(target) < 0.95 * band_variance(scene)                 # below the scene's
    assert band_variance(camera.fidelity_target(scene, HIGH_NOISE)) < 0.85 * band_variance(scene)
    assert psnr(target, scene) > psnr(capture.image, scene) + 2                # a good restoration target
    assert psnr(target, scene) < psnr(camera.ideal(scene), scene) - 5          # not the scene itself


def test_more_noise_removes_more_detail(camera, scene):
    low = camera.fidelity_target(scene, LOW_NOISE)
    high = camera.fidelity_target(scene, HIGH_NOISE)
    assert band_variance(high) < band_variance(low)


def test_flat_fields_and_colours_are_kept(camera):
    flat = np.full((64, 64, 3), [0.2, 0.5, 0.8], np.float32)
    np.testing.assert_allclose(camera.fidelity_target(flat, HIGH_NOISE), flat, atol=2e-3)


def test_transfer_is_one_at_dc_at_most_one_and_falls_with_the_otf(camera):
    psfs = camera.grid.psfs.astype(np.float64)
    gains, level = camera.wb_gains, np.full(3, 1e-3)
    t = wiener_transfer(psfs, gains, np.full(3, 1e-3), level, 32, 64)
    assert np.all(t[..., 0, 0] == 1) and t.min() >= 0 and t.max() <= 1 + 1e-12
    # without noise the transfer is 1 wherever the optics pass anything
    t0 = wiener_transfer(psfs, gains, np.zeros(3), level, 32, 64)
    assert np.median(t0) > 0.99
    kernels = fidelity_kernels(psfs, gains, np.full(3, 1e-3), level, 64)
    assert kernels.shape == psfs.shape
    np.testing.assert_allclose(kernels.sum(axis=(-2, -1)), 1.0, atol=1e-9)
    # field dependence: the kernels differ between the centre node and a corner node
    g = psfs.shape[1]
    assert np.abs(kernels[:, g // 2, g // 2] - kernels[:, 0, 0]).max() > 1e-4


def test_signal_level_follows_the_variance():
    rng = np.random.default_rng(0)
    x = rng.random((64, 64, 3))
    np.testing.assert_allclose(signal_level(2 * x) / signal_level(x), 4.0, rtol=1e-9)
    assert np.all(signal_level(np.zeros((64, 64, 3))) > 0)


def test_validation_photos_are_their_own_split():
    assert not set(VALIDATION_PHOTOS) & (set(TRAIN_PHOTOS) | set(TEST_PHOTOS))
    assert set(PHOTOS) == set(TRAIN_PHOTOS) | set(TEST_PHOTOS) | set(VALIDATION_PHOTOS)
    photos = bundled_photos("val")
    assert list(photos) == list(VALIDATION_PHOTOS)
    assert all(min(p.shape[:2]) >= 256 and p.dtype == np.float32 for p in photos.values())


def test_simulate_writes_a_val_split_and_the_fidelity_target(tmp_path, psf_cache, monkeypatch):
    monkeypatch.setenv("DMDIFF_CACHE", str(psf_cache))
    root = simulate_dataset(tmp_path / "d", seed=0, smoke=True, progress=False)
    lens = json.loads((root / "lens.json").read_text())
    assert lens["format_version"] == 2 and "Wiener" in lens["gt_blur"]
    assert lens["counts"]["val"] == len(VALIDATION_PHOTOS) and has_split(root, "val")
    assert {n.rsplit("_", 1)[0] for n in lens["splits"]["val"]} == set(VALIDATION_PHOTOS)
    assert gt_blur_note(root) is None
    # a dataset of format 1 loads, with a note that its gt_blur is the ideal-lens image
    lens["format_version"] = 1
    (root / "lens.json").write_text(json.dumps(lens))
    assert "ideal-lens image" in gt_blur_note(root)


def test_recommended_alpha_is_the_largest_within_the_tolerance():
    sweep = {"alphas": [0.0, 0.5, 0.8, 1.0, 1.1], "psnr": [24.0, 24.6, 24.5, 24.2, 26.0]}
    assert recommend_alpha(sweep, 0.25) == 0.8          # α > 1 is never recommended
    assert recommend_alpha(sweep, 0.0) == 0.5
    assert recommend_alpha(sweep, 1.0) == 1.0


def test_recipe_chooses_alpha_on_the_val_split_once(tmp_path, psf_cache, monkeypatch):
    """choose_alpha sweeps α over the val split, stores the choice in the pipeline (restore's default)
    and keeps it on a rerun."""
    from conftest import perturb_trainable

    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
    from dmdiff.model.pipeline import DMDiffPipeline
    from dmdiff.train.recipe import choose_alpha

    monkeypatch.setenv("DMDIFF_CACHE", str(psf_cache))
    data = simulate_dataset(tmp_path / "d", seed=0, smoke=True, progress=False)
    pipe_dir = DMDiffPipeline.from_model(perturb_trainable(DMDiff(DMDiffConfig()), seed=1)).save_pretrained(tmp_path / "p")
    choice = choose_alpha(pipe_dir, data, 0.25, progress=False)
    assert choice["split"] == "val" and choice["images"] == len(VALIDATION_PHOTOS)
    assert choice["recommended"] == recommend_alpha(choice, 0.25)
    assert DMDiffPipeline.from_pretrained(pipe_dir).model.config.recommended_alpha == choice["recommended"]
    stamp = (pipe_dir / "dmdiff_config.json").stat().st_mtime_ns
    assert choose_alpha(pipe_dir, data, 0.0, progress=False) == choice          # chosen once
    assert (pipe_dir / "dmdiff_config.json").stat().st_mtime_ns == stamp
