"""The simulated metalens camera: a clean sRGB image in, a realistic capture and its degradation maps out.

Pipeline of :meth:`MetalensCamera.capture` (docs/method.md, "The optics"), in this order:

1. sRGB → linear light (:func:`~dmdiff.optics.sensor.srgb_to_linear`).
2. Spatially varying blur with the PSF grid (:class:`~dmdiff.optics.blur.SpatiallyVaryingBlur`,
   reflect padding: the scene continues beyond the sensor's edge).
3. The halo (unfocused haze). A PSF window holds only the sharp core of the light, the fraction
   ``Σ h`` that lands within ``K // 2`` pixels of the image point. The rest that reaches the
   sensor is the grid's halo (:class:`~dmdiff.optics.grid.PSFGrid`, computed with the same
   propagation over a window of ``Kh`` pixels): mostly the other diffraction orders, which a
   diffractive lens produces where the wrapped phase does not match the wavelength (first-order
   efficiency ``sinc²(1 − λ0/λ)``) and which land as wide defocused discs centred near the image
   point, plus the outer part of the defocused red and blue blur. It is applied like the core,
   ``Σ_k halo_k * (w_k ⊙ x)``, but on ``b × b`` pixel cells: the scene (reflect-padded over the
   halo's reach) is summed over cells, blurred with the coarse halo kernels, and interpolated
   back to pixels (bilinear between cell centres), a cell's light spread evenly over its
   ``b²`` pixels; positions are off by at most ``b // 2`` pixels, small against a halo hundreds
   of pixels wide. Light that misses the sensor (or the aperture's evanescent part) is lost.
4. Sensor noise: heteroscedastic Gaussian, variance ``λ_shot·x + λ_read``, levels drawn as Brooks
   et al. (2019) from the seed unless given.
5. Clip and quantise to ``raw_bits`` (10-bit raw by default).
6. White balance with :attr:`MetalensCamera.wb_gains`: the inverse of each channel's throughput,
   measured as a camera maker does, on a uniform white scene through the noise-free optics (the
   PSF window energy, plus the halo, less light moved across the sensor's border). With the halo
   on the gains are within a few per cent of 1; with ``haze=False`` they undo the per-channel
   loss of the unfocused light. Then the sRGB gamma and 8-bit quantisation.

:meth:`MetalensCamera.fidelity_target` is the neutral-path target: the scene band-limited to what
the capture carries, by the Wiener transfer function of each grid node's PSF at the capture's noise
level (:mod:`dmdiff.optics.fidelity`). :meth:`MetalensCamera.ideal` is the same scene through an
aberration-free lens of the same aperture and focal length (diffraction-limited, on-axis Airy PSF
integrated over each channel's band and over the pixels), no noise, no quantisation: at this
sensor's sampling it is practically the scene itself (it was the neutral target of datasets of
format 1).

Degradation maps ``(7, G, G)`` in :attr:`MetalensCamera.MAP_CHANNELS` order: PSF FWHM and 80 %
encircled-energy radius per channel (pixels, :func:`dmdiff.optics.grid.sharpness_maps`), and the
noise std at mid grey (0.5 linear) in ``[0, 1]`` units.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage
import torch

from dmdiff.errors import DmdiffError
from dmdiff.optics.blur import SpatiallyVaryingBlur, node_weights
from dmdiff.optics.fidelity import fidelity_kernels, signal_level
from dmdiff.optics.grid import (
    default_cache_dir,
    ideal_psf_rgb,
    psf_grid,
    sharpness_maps,
)
from dmdiff.optics.sensor import (
    SHOT_RANGE,
    add_sensor_noise,
    isp,
    linear_to_srgb,
    noise_std,
    quantize,
    sample_noise_levels,
    srgb_to_linear,
)
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import write_npy

__all__ = ["MetalensCamera", "Capture", "CameraInputError", "MAP_CHANNELS"]

MAP_CHANNELS = ("fwhm_r", "fwhm_g", "fwhm_b", "ee80_r", "ee80_g", "ee80_b", "noise")


class CameraInputError(DmdiffError, ValueError):
    """An image handed to the camera has the wrong shape, size, type or values."""


@dataclass
class Capture:
    """What :meth:`MetalensCamera.capture` returns.

    Attributes:
        image: (H, W, 3) float32 sRGB, quantised to 8 bits.
        maps: (7, G, G) float32 in ``MAP_CHANNELS`` order: PSF widths in pixels, noise = std of the
            sensor noise at mid grey (0.5 linear), in [0, 1] units.
        noise: (shot, read) variance factors used.
    """

    image: np.ndarray
    maps: np.ndarray
    noise: tuple[float, float]


def _seed_streams(seed) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators (noise levels, pixel noise) from an int / SeedSequence / Generator."""
    if isinstance(seed, np.random.Generator):
        return seed, seed
    if isinstance(seed, np.random.SeedSequence):
        ss = seed
    else:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CameraInputError(f"seed must be a non-negative integer, a numpy SeedSequence or a "
                                   f"Generator, got {seed!r}")
        ss = np.random.SeedSequence(int(seed))
    children = [np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (k,)) for k in (0, 1)]
    return np.random.default_rng(children[0]), np.random.default_rng(children[1])


class MetalensCamera:
    """A metalens in front of a noisy sensor with a simple ISP (see the module docstring).

    Args:
        spec: the lens and sensor (default ``MetalensSpec()``).
        cache_dir: PSF cache folder (default: ``dmdiff.optics.grid.default_cache_dir()``); the PSF
            grid and the ideal-lens PSF are computed once and cached there.
        raw_bits: bit depth of the raw A/D conversion.
        haze: add the PSF grid's halo, the unfocused light (True, physical) or drop it (False, an
            ablation).
        shot_range: range of λ_shot when noise levels are drawn (Brooks et al. by default).
        progress: show a progress bar while a PSF grid is computed.

    The PSF grid, blur operator, sharpness maps and ideal-lens kernel are built lazily on first use.
    """

    MAP_CHANNELS = MAP_CHANNELS

    def __init__(self, spec: MetalensSpec | None = MetalensSpec(), cache_dir: str | os.PathLike | None = None,
                 *, raw_bits: int = 10, haze: bool = True,
                 shot_range: tuple[float, float] = SHOT_RANGE, progress: bool = True):
        if spec is None:
            spec = MetalensSpec()
        if not isinstance(spec, MetalensSpec):
            raise CameraInputError(f"spec must be a MetalensSpec, got {type(spec).__name__}")
        if not isinstance(raw_bits, int) or not 1 <= raw_bits <= 16:
            raise CameraInputError(f"raw_bits must be an integer in [1, 16], got {raw_bits!r}")
        self.spec = spec
        self.cache_dir = cache_dir
        self.raw_bits = raw_bits
        self.haze = bool(haze)
        self.shot_range = tuple(shot_range)
        self.progress = progress
        self._grid = None
        self._blur = None
        self._sharpness = None
        self._ideal_kernel = None
        self._pixel_weights = None
        self._throughput = None
        self._halo_setup = None

    def __repr__(self) -> str:
        return (f"MetalensCamera(image_size_px={self.spec.image_size_px}, grid_size={self.spec.grid_size}, "
                f"psf_size_px={self.spec.psf_size_px}, raw_bits={self.raw_bits}, haze={self.haze})")

    def prepare(self) -> "MetalensCamera":
        """Build (or load from the cache) everything lazily made: PSF grid, maps, ideal-lens kernel."""
        self.grid, self.blur, self.sharpness, self.ideal_kernel, self.throughput  # noqa: B018
        return self

    # ---- optics, built lazily ---------------------------------------------------------------------

    @property
    def grid(self):
        """The :class:`dmdiff.optics.grid.PSFGrid` of the spec (computed or loaded from the cache)."""
        if self._grid is None:
            self._grid = psf_grid(self.spec, cache_dir=self.cache_dir, progress=self.progress)
        return self._grid

    @property
    def blur(self):
        """The :class:`SpatiallyVaryingBlur` over the PSF grid."""
        if self._blur is None:
            self._blur = SpatiallyVaryingBlur(self.grid.psfs)
        return self._blur

    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Node weights over the sensor's rows and columns, each (G, N) (see ``blur.node_weights``)."""
        if self._pixel_weights is None:
            n, g = self.spec.image_size_px, self.spec.grid_size
            w = node_weights(np.arange(n), n, g)
            self._pixel_weights = (w, w)
        return self._pixel_weights

    @property
    def throughput(self) -> np.ndarray:
        """(3,) float64: mean sensor response of each channel to a uniform white scene (flat field).

        The noise-free optics (:meth:`optics_linear`) applied to an all-ones image, averaged over the
        sensor: the PSF window energy, plus the veil with ``haze=True``, less what the spatially
        varying PSFs move across the border or redistribute. A camera is white-balanced on such a
        uniform white target; with the haze on, all light is kept and the gains stay close to 1.
        """
        if self._throughput is None:
            n = self.spec.image_size_px
            flat = self.optics_linear(np.ones((n, n, 3), np.float32))
            self._throughput = flat.astype(np.float64).mean(axis=(0, 1))
        return self._throughput

    @property
    def wb_gains(self) -> np.ndarray:
        """(3,) white-balance gains ``1 / throughput``: a uniform white scene comes out white."""
        return 1.0 / np.maximum(self.throughput, 1e-6)

    def optics_linear(self, x_linear: np.ndarray) -> np.ndarray:
        """The noise-free sensor irradiance: blur with the PSF grid plus the unfocused veil.

        Args:
            x_linear: (H, W, 3) linear-light image with H = W = ``spec.image_size_px``.

        Returns:
            (H, W, 3) float32 linear values (not clipped).
        """

        n = self.spec.image_size_px
        if np.shape(x_linear) != (n, n, 3):
            raise CameraInputError(f"optics_linear takes a ({n}, {n}, 3) linear image, got shape {np.shape(x_linear)}")
        x = np.ascontiguousarray(np.asarray(x_linear, dtype=np.float32).transpose(2, 0, 1))
        with torch.no_grad():
            y = self.blur(torch.from_numpy(x)[None], padding="reflect")[0].numpy().astype(np.float64)
        if self.haze and self.grid.halo is not None:
            y += self._halo(x.astype(np.float64))
        return np.ascontiguousarray(y.transpose(1, 2, 0), dtype=np.float32)

    def _halo(self, x: np.ndarray) -> np.ndarray:
        """``Σ_k halo_k * (w_k ⊙ x)`` on pixel cells, for a (3, N, N) linear image (module
        docstring, step 3); returns (3, N, N) float64."""
        if self._halo_setup is None:
            self._halo_setup = self._halo_plan()
        pads, weights, spectra, fft_shape, upsample = self._halo_setup
        b, reach = self.grid.halo_bin_px, self.grid.halo.shape[-1] // 2
        padded = np.pad(x, ((0, 0), pads, pads), mode="reflect")
        cells = padded.reshape(3, padded.shape[1] // b, b, -1, b).sum(axis=(2, 4))   # (3, L, L)
        sources = cells[:, None] * weights                                         # (3, G·G, L, L)
        spectrum = (scipy.fft.rfft2(sources, s=fft_shape) * spectra).sum(axis=1)
        full = scipy.fft.irfft2(spectrum, s=fft_shape)
        m = upsample.shape[1]                     # the sensor's cells and one more on each side
        out = full[:, 2 * reach - 1:2 * reach - 1 + m, 2 * reach - 1:2 * reach - 1 + m]
        return np.einsum("pm,cmn,qn->cpq", upsample, out, upsample) / b**2

    def _halo_plan(self) -> tuple:
        """What :meth:`_halo` needs for this sensor: reflect pads, (G·G, L, L) node weights of the
        cells, (3, G·G, …) kernel spectra, the FFT shape and the (N, M + 2) interpolation matrix."""
        n, g = self.spec.image_size_px, self.spec.grid_size
        b, kc = self.grid.halo_bin_px, self.grid.halo.shape[-1]
        reach, cells = kc // 2, -(-n // b)                 # halo reach and sensor size, in cells
        pads = (reach * b, (cells + reach) * b - n)
        centres = (np.arange(-reach, cells + reach) + 0.5) * b - 0.5           # cell centres, px
        w = node_weights(centres, n, g)                                          # (G, L)
        weights = np.einsum("il,jm->ijlm", w, w).reshape(g * g, len(centres), len(centres))
        fft_shape = (len(centres) + kc - 1,) * 2
        kernels = self.grid.halo.astype(np.float64).reshape(3, g * g, kc, kc)
        spectra = scipy.fft.rfft2(kernels, s=fft_shape)
        # bilinear interpolation from the centres of cells −1 … cells to the pixels 0 … n − 1
        t = (np.arange(n) + 0.5) / b - 0.5 + 1                   # pixel position in cell units
        upsample = np.clip(1 - np.abs(t[:, None] - np.arange(cells + 2)[None, :]), 0, None)
        return pads, weights, spectra, fft_shape, upsample

    # ---- maps ---------------------------------------------------------------------------------

    @property
    def sharpness(self) -> np.ndarray:
        """(6, G, G) float32: FWHM R, G, B then EE80 radius R, G, B, in pixels (cached)."""
        if self._sharpness is None:
            s = sharpness_maps(self.grid)
            self._sharpness = np.concatenate([s["fwhm_px"], s["ee80_px"]]).astype(np.float32)
        return self._sharpness

    def maps(self, noise: tuple[float, float]) -> np.ndarray:
        """(7, G, G) float32 degradation maps for the given (shot, read) noise levels."""
        g = self.spec.grid_size
        level = float(noise_std(0.5, *noise))
        return np.concatenate([self.sharpness, np.full((1, g, g), level, np.float32)])

    # ---- capture ------------------------------------------------------------------------------

    def _check_image(self, image, any_size: bool = False) -> np.ndarray:
        """``image`` as float32 (H, W, 3) sRGB in [0, 1], or a CameraInputError; ``H = W = image_size_px``
        unless ``any_size`` (the ideal lens is shift-invariant, so any crop of the sensor works)."""
        n = self.spec.image_size_px
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3:
            raise CameraInputError(f"the camera takes an (H, W, 3) RGB image, got an array of shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise CameraInputError(f"the camera takes float sRGB values in [0, 1], got dtype {a.dtype} "
                                   "(for 8-bit data divide by 255, or use dmdiff.imageio.read_image)")
        if a.shape[:2] != (n, n) and not any_size:
            raise CameraInputError(
                f"image is {a.shape[1]}×{a.shape[0]} px but this camera's sensor is {n}×{n} px "
                f"(spec.image_size_px = {n}); resize or crop it first, e.g. "
                f"skimage.transform.resize(image, ({n}, {n}, 3), anti_aliasing=True)")
        if not np.all(np.isfinite(a)):
            raise CameraInputError("image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise CameraInputError(f"image values span [{lo:.4g}, {hi:.4g}]; expected sRGB values in [0, 1]")
        return np.clip(a.astype(np.float32), 0.0, 1.0)

    def capture(self, image: np.ndarray, seed, noise: tuple[float, float] | None = None) -> Capture:
        """Photograph ``image`` through the metalens (see the module docstring for the pipeline).

        Args:
            image: (H, W, 3) float sRGB in [0, 1], H = W = ``spec.image_size_px``.
            seed: int (or ``numpy.random.SeedSequence`` / ``Generator``); the same seed gives the
                same capture, bit for bit.
            noise: (shot, read) variance factors; None draws them from the seed (Brooks et al.).

        Returns:
            :class:`Capture` (8-bit sRGB image, (7, G, G) maps, the noise levels used).

        Raises:
            CameraInputError: wrong shape or size (the message gives the sensor size), dtype or values.
        """
        x = self._check_image(image)
        level_rng, pixel_rng = _seed_streams(seed)
        if noise is None:
            noise = sample_noise_levels(level_rng, self.shot_range)
        shot, read = (float(v) for v in noise)
        if not (shot >= 0 and read >= 0 and math.isfinite(shot) and math.isfinite(read)):
            raise CameraInputError(f"noise levels must be finite and >= 0, got {noise!r}")
        irradiance = self.optics_linear(srgb_to_linear(x))
        raw = quantize(add_sensor_noise(irradiance, shot, read, pixel_rng), self.raw_bits)
        out = isp(raw, self.wb_gains, bits=8)
        return Capture(image=out, maps=self.maps((shot, read)), noise=(shot, read))

    # ---- ideal lens ---------------------------------------------------------------------------

    @property
    def ideal_kernel(self) -> np.ndarray:
        """(3, k, k) float64 ideal-lens PSFs, each normalised to sum 1 (cached on disk).

        ``k`` (odd) covers four Airy first-zero radii of the reddest wavelength, at least 5 pixels
        and at most ``spec.psf_size_px``.
        """
        if self._ideal_kernel is None:
            spec = self.spec
            airy_px = 1.22 * max(hi for _, hi in spec.bands_m) * spec.f_number / spec.pitch_m
            size = min(spec.psf_size_px, max(5, 2 * int(math.ceil(4 * airy_px)) + 1))
            kernel = self._cached(f"idealpsf-k{size}", (3, size, size), lambda: self._ideal_psf(size))
            kernel = kernel.astype(np.float64)
            self._ideal_kernel = kernel / kernel.sum(axis=(1, 2), keepdims=True)
        return self._ideal_kernel

    def _ideal_psf(self, size: int) -> np.ndarray:
        return np.asarray(ideal_psf_rgb(self.spec, size), dtype=np.float32)

    def _cached(self, name: str, shape: tuple, compute) -> np.ndarray:
        """An array cached as ``<cache>/<name>-<spec.cache_key()>.npy`` (atomic write, checked shape)."""

        path = Path(self.cache_dir or default_cache_dir()) / f"{name}-{self.spec.cache_key()}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == shape and np.all(np.isfinite(arr)):
                return arr
        except (OSError, ValueError):
            pass
        arr = compute()
        try:
            write_npy(path, arr)
        except OSError:  # a read-only cache is not fatal: the array is just recomputed next time
            pass
        return arr

    def fidelity_target(self, image: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
        """The neutral-path target: ``image`` band-limited to what its capture carries.

        sRGB → linear → the spatially varying blur whose kernels are the Wiener transfer functions
        of the PSF grid at the capture's noise level (:mod:`dmdiff.optics.fidelity`) → sRGB. No
        noise, no quantisation, no veil; mean levels and colours are the scene's.

        Args:
            image: (H, W, 3) float sRGB in [0, 1], H = W = ``spec.image_size_px``.
            noise: the capture's (shot, read) variance factors (:attr:`Capture.noise`).

        Returns:
            (H, W, 3) float32 sRGB in [0, 1].
        """
        x = srgb_to_linear(self._check_image(image)).astype(np.float64)
        shot, read = (float(v) for v in noise)
        gains = self.wb_gains
        mean = x.reshape(-1, 3).mean(axis=0)
        noise_power = gains ** 2 * (shot * self.throughput * mean + read)
        kernels = fidelity_kernels(self.grid.psfs.astype(np.float64), gains, noise_power, signal_level(x),
                                   self.spec.image_size_px)
        with torch.no_grad():
            y = SpatiallyVaryingBlur(kernels)(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None],
                                              padding="reflect")[0].numpy()
        return np.clip(linear_to_srgb(np.clip(y.transpose(1, 2, 0), 0.0, 1.0)), 0.0, 1.0).astype(np.float32)

    def ideal(self, image: np.ndarray) -> np.ndarray:
        """``image`` through an aberration-free lens of the same aperture (the diffraction limit).

        sRGB → linear → each channel convolved with its (normalised) diffraction-limited PSF
        (mirror borders) → sRGB. No noise, no quantisation.

        Returns:
            (H, W, 3) float32 sRGB in [0, 1].
        """

        x = srgb_to_linear(self._check_image(image, any_size=True)).astype(np.float64)
        out = np.empty_like(x)
        for c in range(3):
            out[:, :, c] = scipy.ndimage.convolve(x[:, :, c], self.ideal_kernel[c], mode="mirror")
        return np.clip(linear_to_srgb(np.clip(out, 0.0, 1.0)), 0.0, 1.0).astype(np.float32)
