"""Metalens point-spread functions by band-limited, shifted angular-spectrum propagation.

Model (scalar diffraction, see docs/architecture.md and docs/method.md, "The optics"):

* The lens plane holds a circular aperture of radius R = D/2 with the hyperbolic phase
  ``φ(r) = (2π/λ0)(f − sqrt(r² + f²))``. At wavelength λ the metasurface imposes the *wrapped*
  phase scaled by λ0/λ, ``(φ mod 2π)·λ0/λ``: this gives the chromatic focal shift
  f(λ) ≈ f·λ0/λ and sends part of the light into other diffraction orders (unfocused haze).
* A plane wave incident at field angle θ (in the x–z plane) multiplies the field by
  ``exp(i·2π/λ·x·sin θ)``. The chief ray (through the lens centre) meets the sensor, at
  distance ``z = f + sensor_offset_m`` (the spec's sensor distance), at ``x0 = z·tan θ``; PSF
  windows are centred there.
* The field is propagated with the angular-spectrum method, evaluated only on an output window
  centred on x0 (shifted ASM) and band-limited so that no light wraps around the periodic grid.

Numerics.

* Sampling: the lens plane is sampled at ``dx = pitch / k``, ``k = ceil(pitch / p)`` with p the
  spec's lens pitch (default: the alias-free ``λ_min / (2·(NA + sin θ_max))``), so each sensor
  pixel holds k × k samples; intensity is summed over them (pixel integration). The lens centre
  sits on a sample; for even k the window is shifted by dx/2 so samples are symmetric in a pixel.
* Grid: the FFT period L = n·dx holds the lens (2R), the window (W = size·pitch) and a margin of
  ``MARGIN_FRESNEL`` Fresnel lengths sqrt(λf) on each side.
* Tilt: applied as a shift of the transfer function,
  ``U(x0 + ξ) ∝ Σ_g Û(g)·H(g + sinθ/λ)·exp(i2π g·(x0 + ξ))``, which equals tilting the lens field
  up to a phase ramp that |U|² does not see. So the lens spectrum Û is computed once per
  wavelength and reused for every field angle and distance.
* Shifted, band-limited transfer function: a plane wave (ν_x, ν_y) is a ray that moves by
  ``z·λν / sqrt(1 − λ²|ν|²)`` over the distance z. Waves whose ray lands farther than ``L/2`` from
  the window centre (along x or y) are dropped, with a raised-cosine roll-off over the outer
  ``TAPER_FRACTION`` of the margin (a hard cut rings into the window). This is Matsushima &
  Shimobaba's band limit for a shifted transfer function sampled at 1/L: the kept kernel fits in
  one period. Light from the lens (|x'| <= R) then lands within R + L/2 of the window centre, so
  its periodic images stay at least one margin away from the window: light that would land
  outside is dropped, never aliased into the window. (Limiting rays to the window half-width
  instead would wrongly drop the light that the outer lens zones send to the focus.)
* Speed: the lens field is even in x and y, so its spectrum comes from a quadrant via two
  type-I DCTs; only the kept spectrum block enters a pruned inverse FFT (columns along y, then
  only the window rows along x). The transfer function's phase is reduced to [−π, π] in float64
  and its cosine and sine taken in float32 (~1e-7 error, much faster than float64's), and wide
  windows' kept blocks are processed a few rows at a time on two threads. The default
  7 × 7 × 15-wavelength grid with its 511-px halos takes about a minute on 2 cores.
* Normalisation: by the power entering the aperture (number of lens samples inside R, |u| = 1),
  so a window sums to the fraction of that power it receives, <= 1. Evanescent waves (a few
  1e-3 from the sharp aperture edge and, off the design wavelength, the phase-wrap steps) carry
  no power and are dropped.
* Accuracy: against a brute-force ASM on one big grid with the same sampling, max |ΔPSF| is
  ~2e-4 of the peak. The discretisation itself (point-sampled aperture edge and zone steps)
  changes a PSF by up to ~1e-3 of its peak at λ0 and ~5e-3 off design between the default
  lens pitch and a 4× finer one; set ``lens_pitch_m`` smaller for reference-grade PSFs.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft as sfft

from dmdiff.optics.spec import MetalensSpec, SpecError

FFT_WORKERS = 2
MAX_GRID = 16384          # largest FFT side we allow (16384² complex128 = 4 GiB)
MARGIN_FRESNEL = 4.0      # grid margin around lens + window, in Fresnel lengths sqrt(λ·f)
TAPER_FRACTION = 0.5      # outer part of the margin over which the band limit rolls off
BAND_ROWS = 64            # spectrum rows per chunk in LensSpectrum.pixel_samples


def _check_args(wavelength_m: float, size_px: int, pitch_m: float) -> None:
    if not (100e-9 <= wavelength_m <= 20e-6):
        raise SpecError(f"wavelength_m must be in [1e-07, 2e-05] m, got {wavelength_m:g}")
    if int(size_px) != size_px or size_px < 1 or size_px % 2 == 0:
        raise SpecError(f"size_px must be a positive odd integer, got {size_px!r}")
    if not (0 < pitch_m <= 1e-3):
        raise SpecError(f"pitch_m must be in (0, 0.001] m, got {pitch_m:g}")


def largest_window_px(spec: MetalensSpec, pitch_m: float) -> int:
    """The largest odd window (px) whose simulation grid stays within :data:`MAX_GRID` (with 5 %
    to spare for the rounding to a fast FFT length) at every wavelength of the spec's bands."""
    dx, k = simulation_pitch(spec, spec.min_wavelength_m, pitch_m)
    longest = max(hi for _, hi in spec.bands_m)
    margin = MARGIN_FRESNEL * math.sqrt(longest * spec.focal_length_m)
    lens = 2 * math.ceil(spec.aperture_diameter_m / 2 / dx) + 1 + 2 * math.ceil(margin / dx)
    size = int((0.95 * MAX_GRID - lens) // k)
    return max(1, size - 1 + size % 2)


def simulation_pitch(spec: MetalensSpec, wavelength_m: float, pitch_m: float) -> tuple[float, int]:
    """Lens-plane sample pitch ``dx`` (m) and samples per sensor pixel ``k`` with dx = pitch_m / k.

    ``k = ceil(pitch_m / p)`` where p is ``spec.lens_pitch_m`` (or the required pitch), tightened
    for a wavelength shorter than the spec's bands so the sampling rule holds at ``wavelength_m``.
    """
    limit = spec.lens_pitch_m if spec.lens_pitch_m is not None else spec.required_lens_pitch_m
    limit = min(limit, spec.required_lens_pitch_m * wavelength_m / spec.min_wavelength_m)
    k = max(1, math.ceil(pitch_m / limit * (1 - 1e-12)))     # exact multiples stay exact
    return pitch_m / k, k


def lens_phase(spec: MetalensSpec, r2: np.ndarray, wavelength_m: float, ideal: bool) -> np.ndarray:
    """Phase (rad) imposed at squared radius ``r2`` (m²) on light of ``wavelength_m``.

    Metalens: ``(φ mod 2π)·λ0/λ`` with ``φ = (2π/λ0)(f − sqrt(r² + f²))``. Ideal (aberration-free)
    lens at λ: ``(2π/λ)(f − sqrt(r² + f²))``, unwrapped.
    """
    f = spec.focal_length_m
    path = -r2 / (f + np.sqrt(r2 + f * f))          # f − sqrt(r² + f²), without cancellation
    if ideal:
        return (2 * np.pi / wavelength_m) * path
    phi = (2 * np.pi / spec.design_wavelength_m) * path
    return np.mod(phi, 2 * np.pi) * (spec.design_wavelength_m / wavelength_m)


class LensSpectrum:
    """The angular spectrum of the lens-plane field at one wavelength, ready to propagate.

    Built once per (spec, wavelength, window), then :meth:`intensity` / :meth:`psf` give the
    sensor-plane intensity for any field angle and propagation distance at the cost of one
    band-limited, pruned inverse FFT.

    The lens field is even in x and y, so its spectrum is too: only the quadrant of non-negative
    frequencies is stored, computed with two type-I DCTs (the DFT of an even sequence).

    Args:
        spec: the lens.
        wavelength_m: wavelength λ (m).
        size_px: odd side of the output window in sensor pixels.
        pitch_m: sensor pixel pitch (m).
        ideal: use the aberration-free lens at λ (unwrapped phase) instead of the metalens.
    """

    def __init__(self, spec: MetalensSpec, wavelength_m: float, size_px: int, pitch_m: float,
                 ideal: bool = False, pixel_sampled: bool = False):
        _check_args(wavelength_m, size_px, pitch_m)
        self.spec, self.wavelength_m, self.size_px = spec, float(wavelength_m), int(size_px)
        self.dx, self.k = simulation_pitch(spec, wavelength_m, pitch_m)
        self.n_win = self.size_px * self.k
        self.radius_px = math.ceil(spec.aperture_diameter_m / 2 / self.dx)   # lens: |j| <= this
        margin = MARGIN_FRESNEL * math.sqrt(wavelength_m * spec.focal_length_m)
        n_min = 2 * self.radius_px + 1 + self.n_win + 2 * math.ceil(margin / self.dx)
        step = 2 * self.k if pixel_sampled else 2       # even (DCT-I); pixel sampling folds by k
        n = step * sfft.next_fast_len(math.ceil(n_min / step))
        if n > MAX_GRID:
            raise SpecError(
                f"the simulation grid would be {n} x {n} samples (limit {MAX_GRID}); reduce "
                f"aperture_diameter_m ({spec.aperture_diameter_m:g} m), psf_size_px or the pixel "
                f"pitch, or coarsen lens_pitch_m towards {spec.required_lens_pitch_m:.4g} m")
        self.n = n
        self.margin = (n - 2 * self.radius_px - 1 - self.n_win) * self.dx / 2   # actual margin
        self.quadrant, self.power = self._lens_spectrum(ideal)
        # FFT-order output index of each window sample; offset that puts pixel centres on x0
        self.win_idx = (np.arange(self.n_win) - self.n_win // 2) % n
        self.half_sample = (self.n_win // 2 - (self.n_win - 1) / 2) * self.dx

    def _lens_spectrum(self, ideal: bool) -> tuple[np.ndarray, float]:
        """DFT of the lens field (centre at sample 0) for frequencies 0..n/2 on both axes, Σ|u|².

        Returns complex128 (n/2 + 1, n/2 + 1) ``Û[k_y, k_x]`` (``Û[−k] = Û[k]``) and the number
        of samples inside the aperture (|u| = 1 there), the power entering the lens.
        """
        m, h = self.radius_px, self.n // 2
        s = np.arange(m + 1) * self.dx
        r2 = s[:, None] ** 2 + s[None, :] ** 2
        inside = r2 <= (self.spec.aperture_diameter_m / 2) ** 2
        rows = np.zeros((m + 1, h + 1), np.complex128)
        rows[:, :m + 1][inside] = np.exp(1j * lens_phase(self.spec, r2[inside], self.wavelength_m,
                                                         ideal))
        multiplicity = np.where(np.arange(m + 1) == 0, 1, 2)      # ±j samples share a value
        power = float(multiplicity @ inside @ multiplicity)
        spectrum = np.zeros((h + 1, h + 1), np.complex128)
        spectrum[:m + 1] = sfft.dct(rows, type=1, axis=1, workers=FFT_WORKERS)
        return sfft.dct(spectrum, type=1, axis=0, workers=FFT_WORKERS, overwrite_x=True), power

    def _band(self, z: float, x0: float, tilt: float) -> tuple[np.ndarray, int]:
        """The kept block of the spectrum: ``kx`` (signed column frequency indices, int (c,)) and
        ``n_up`` (rows are ``k_y = −n_up..n_up``). Only plane waves whose rays land within
        ``reach = L/2`` of (x0, 0) are kept (:meth:`_transfer` rolls them off near the limit).
        """
        lam, length = self.wavelength_m, self.n * self.dx
        reach, half = length / 2, self.n // 2
        tx = ((x0 - reach) / z, (x0 + reach) / z)                 # ray slopes that land in reach
        ty = (-reach / z, reach / z)
        ax, ay = _cosine_range(tx, ty), _cosine_range(ty, tx)
        kx = np.arange(max(math.ceil((ax[0] / lam - tilt) * length), -half),
                       min(math.floor((ax[1] / lam - tilt) * length), half - 1) + 1)
        n_up = min(math.floor(ay[1] / lam * length), half - 1)
        return kx, n_up

    def _transfer(self, z: float, x0: float, tilt: float, kx: np.ndarray,
                  ky: np.ndarray) -> np.ndarray:
        """``H(g_x + tilt, g_y)·exp(i2π g_x x0)`` for ``g = k / L``: complex (len(ky), len(kx)).

        Rays that land farther than ``reach = L/2`` from (x0, 0) are dropped, rolled off over the
        outer ``TAPER_FRACTION`` of the margin; evanescent waves are dropped. The global phase
        exp(i2πz/λ) is left out.
        """
        lam, length = self.wavelength_m, self.n * self.dx
        reach = length / 2
        px = lam * (kx / length + tilt)[None, :]                   # direction cosines
        py = lam * (ky / length)[:, None]
        q = 1 - px * px - py * py
        propagating = q > 0
        inv_root = 1 / np.sqrt(np.where(propagating, q, 1.0))
        width = TAPER_FRACTION * self.margin
        weight = _taper(np.abs(z * px * inv_root - x0), reach, width)
        weight *= _taper(np.abs(z * py * inv_root), reach, width)
        weight *= propagating
        phase = (2 * np.pi * z / lam) * (1 / inv_root - 1)
        phase += (2 * np.pi * x0 / length) * kx[None, :]
        # weight·exp(i·phase) via cos and sin (a complex exp is several times slower), taken in
        # float32 after reducing the phase to [−π, π] in float64: exact to ~1e-7, and float32
        # trigonometry is ~25x faster than float64's, which dominated the PSF time
        phase -= (2 * np.pi) * np.rint(phase / (2 * np.pi))
        phase = phase.astype(np.float32)
        h = np.empty(phase.shape, np.complex128)
        np.multiply(weight, np.cos(phase), out=h.real)
        np.multiply(weight, np.sin(phase), out=h.imag)
        return h

    def intensity(self, field_deg: float = 0.0, distance_m: float | None = None) -> np.ndarray:
        """Fine-sampled intensity (float64, (n_win, n_win)), normalised by the aperture power.

        The window is centred on the chief ray at ``distance_m·tan(field)`` (field along +x);
        sample (i, j) sits at ``(x0 + (j − (n_win−1)/2)·dx, (i − (n_win−1)/2)·dx)``.
        ``distance_m`` defaults to the spec's sensor distance (the sensor).
        """
        z = self.spec.sensor_distance_m if distance_m is None else float(distance_m)
        if not z > 0:
            raise SpecError(f"distance_m must be > 0 m, got {z:g}")
        if not -90 < field_deg < 90:
            raise SpecError(f"field_deg must be in (-90, 90) deg, got {field_deg:g}")
        theta = math.radians(field_deg)
        x0 = z * math.tan(theta) + self.half_sample
        tilt = math.sin(theta) / self.wavelength_m
        kx, n_up = self._band(z, x0, tilt)
        upper = self.quadrant[:n_up + 1, np.abs(kx)] * self._transfer(z, x0, tilt, kx,
                                                                      np.arange(n_up + 1))
        # sub-sample shift of the window along y: exp(i2π g_y y0), conjugate for k_y < 0
        shift_y = np.exp(2j * np.pi * self.half_sample / (self.n * self.dx) * np.arange(n_up + 1))
        # Pruned 2-D inverse FFT: only the kept block in, only the window out.
        tmp = np.zeros((self.n, kx.size), np.complex128)
        tmp[:n_up + 1] = upper * shift_y[:, None]
        tmp[self.n - n_up:] = upper[:0:-1] * shift_y[:0:-1, None].conj()
        tmp = sfft.ifft(tmp, axis=0, workers=FFT_WORKERS, overwrite_x=True)[self.win_idx]
        out = np.zeros((self.n_win, self.n), np.complex128)
        out[:, kx % self.n] = tmp
        out = sfft.ifft(out, axis=1, workers=FFT_WORKERS, overwrite_x=True)[:, self.win_idx]
        return (out.real ** 2 + out.imag ** 2) / self.power

    def psf(self, field_deg: float = 0.0, distance_m: float | None = None) -> np.ndarray:
        """Pixel-integrated PSF (float64, (size_px, size_px)), centre pixel on the chief ray."""
        return bin_pixels(self.intensity(field_deg, distance_m), self.k)

    def pixel_samples(self, field_deg: float = 0.0) -> np.ndarray:
        """The PSF on the sensor sampled once per pixel (float64, (size_px, size_px)).

        Each pixel gets ``k²`` times the intensity at its centre sample (for even ``k`` the
        sample half a lens-plane step past the centre) instead of the sum of its ``k × k``
        samples: the pixel integral of light that varies slowly across a pixel (a halo), at
        about ``1/k²`` of the inverse-FFT work of :meth:`psf`. Sampling every ``k``-th output
        point of a length-``n`` inverse DFT equals a length-``n/k`` inverse DFT of the spectrum
        folded modulo ``n/k``, so the lens spectrum must be built with ``pixel_sampled=True``
        (``n`` a multiple of ``2k``).
        """
        k, n = self.k, self.n
        if n % k:
            raise ValueError("pixel_samples needs a LensSpectrum built with pixel_sampled=True")
        m = n // k
        theta = math.radians(field_deg)
        z, tilt = self.spec.sensor_distance_m, math.sin(theta) / self.wavelength_m
        x0 = z * math.tan(theta) + self.half_sample
        kx, n_up = self._band(z, x0, tilt)
        s0 = k // 2 - self.n_win // 2                  # FFT index of pixel 0's centre sample
        ramp = np.exp(2j * np.pi * s0 / n * kx)[None, :]
        columns = np.empty((n_up + 1, m), np.complex128)

        def fold_rows(first: int) -> None:
            rows = slice(first, min(first + BAND_ROWS, n_up + 1))
            ky = np.arange(rows.start, rows.stop)
            upper = self.quadrant[rows][:, np.abs(kx)] * self._transfer(z, x0, tilt, kx, ky)
            columns[rows] = _fold(upper * ramp, int(kx[0]), m, axis=1)   # (len(ky), m)

        # a few rows at a time, on FFT_WORKERS threads (numpy releases the GIL): the kept block
        # has ~10⁷ entries for a 511-px halo, and block-sized temporaries spend more time in
        # page faults than in arithmetic
        with ThreadPoolExecutor(FFT_WORKERS) as pool:
            list(pool.map(fold_rows, range(0, n_up + 1, BAND_ROWS)))
        ky = np.arange(-n_up, n_up + 1)
        shift = np.exp(2j * np.pi * (self.half_sample / self.dx + s0) / n * ky)
        spectrum = _fold(columns[np.abs(ky)] * shift[:, None], -n_up, m, axis=0)   # (m, m)
        out = sfft.ifft2(spectrum, workers=FFT_WORKERS)[:self.size_px, :self.size_px]
        # the length-m inverse DFT carries 1/m² where the field needs 1/n² = 1/(k²m²): the
        # intensity is 1/k⁴ of |out|², times k² for the pixel's area
        return (out.real ** 2 + out.imag ** 2) / (self.power * k * k)


def _fold(a: np.ndarray, first: int, m: int, axis: int) -> np.ndarray:
    """Sum the entries of ``a`` along ``axis`` (signed frequency indices ``first, first + 1, …``)
    into ``m`` bins by index modulo ``m``."""
    a = np.moveaxis(a, axis, -1)
    start = (first // m) * m
    length = -(-(first + a.shape[-1] - start) // m) * m
    padded = np.zeros(a.shape[:-1] + (length,), a.dtype)
    padded[..., first - start:first - start + a.shape[-1]] = a
    return np.moveaxis(padded.reshape(a.shape[:-1] + (length // m, m)).sum(axis=-2), -1, axis)


def _taper(d: np.ndarray, reach: float, width: float) -> np.ndarray:
    """1 for d <= reach − width, raised-cosine roll-off to 0 at d = reach, 0 beyond."""
    out = (d <= reach - width).astype(np.float64)
    edge = (d > reach - width) & (d < reach)
    out[edge] = 0.5 + 0.5 * np.cos(np.pi * (d[edge] - reach + width) / width)
    return out


def _cosine_range(t: tuple[float, float], u: tuple[float, float]) -> tuple[float, float]:
    """Range of the direction cosine t/sqrt(1 + t² + u²) over slopes t ∈ [t0, t1], u ∈ [u0, u1]."""
    u2 = (0.0 if u[0] <= 0 <= u[1] else min(u[0] ** 2, u[1] ** 2), max(u[0] ** 2, u[1] ** 2))
    values = [ti / math.sqrt(1 + ti * ti + ui) for ti in t for ui in u2]
    return min(values), max(values)


def bin_pixels(fine: np.ndarray, k: int) -> np.ndarray:
    """Sum k × k blocks: (n·k, n·k) samples -> (n, n) pixels."""
    n = fine.shape[0] // k
    return fine.reshape(n, k, n, k).sum(axis=(1, 3))


def psf(spec: MetalensSpec, wavelength_m: float, field_deg: float, size_px: int,
        pitch_m: float) -> np.ndarray:
    """Metalens PSF at one wavelength and field angle, integrated over sensor pixels.

    Args:
        spec: the lens (aperture, focal length, design wavelength, sampling).
        wavelength_m: wavelength λ in metres.
        field_deg: field angle θ in degrees, along +x.
        size_px: odd window side in pixels; the centre pixel ``(size_px//2, size_px//2)`` is
            centred on the chief ray at ``x0 = f·tan θ``.
        pitch_m: sensor pixel pitch in metres.

    Returns:
        float64 (size_px, size_px), non-negative: the fraction of the power entering the aperture
        that falls on each pixel (so the window sums to <= 1). Rows are y, columns x.
    """
    return LensSpectrum(spec, wavelength_m, size_px, pitch_m).psf(field_deg)


def ideal_psf(spec: MetalensSpec, wavelength_m: float, size_px: int, pitch_m: float) -> np.ndarray:
    """Diffraction-limited on-axis PSF of an aberration-free lens with the same aperture and f.

    Same machinery, units and normalisation as :func:`psf`; the lens phase is the unwrapped
    ``(2π/λ)(f − sqrt(r² + f²))``, which focuses λ perfectly at f (an Airy-like pattern).
    """
    return LensSpectrum(spec, wavelength_m, size_px, pitch_m, ideal=True).psf(0.0)
