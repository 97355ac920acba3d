"""Metalens PSFs against theory and against an independent brute-force angular-spectrum code.

A small lens (D = 50 µm, f = 100 µm, N = 2, the default NA) keeps every case to well under a second.
"""

import math

import numpy as np
import pytest

from dmdiff.optics.propagation import LensSpectrum, ideal_psf, psf
from dmdiff.optics.spec import MetalensSpec, SpecError

D, F, LAMBDA0 = 50e-6, 100e-6, 550e-9
SPEC = MetalensSpec(aperture_diameter_m=D, focal_length_m=F)


def first_minimum_px(profile: np.ndarray) -> float:
    """Sub-pixel position (parabola through 3 samples) of the first local minimum of a profile."""
    i = next(j for j in range(1, len(profile) - 1)
             if profile[j] <= profile[j - 1] and profile[j] <= profile[j + 1])
    a, b, c = profile[i - 1], profile[i], profile[i + 1]
    return i + 0.5 * (a - c) / (a - 2 * b + c)


@pytest.mark.parametrize("make", [
    lambda pitch: psf(SPEC, LAMBDA0, 0.0, 61, pitch),
    lambda pitch: ideal_psf(SPEC, LAMBDA0, 61, pitch),
], ids=["metalens", "ideal"])
def test_on_axis_psf_at_design_wavelength_is_airy(make):
    pitch = 0.1e-6
    p = make(pitch)
    assert p.shape == (61, 61) and p.dtype == np.float64
    assert np.unravel_index(p.argmax(), p.shape) == (30, 30)
    ring = first_minimum_px(p[30, 30:]) * pitch
    assert ring == pytest.approx(1.22 * LAMBDA0 * SPEC.f_number, rel=0.10)
    np.testing.assert_allclose(p, p.T, atol=1e-12 * p.max())      # round spot


def test_ideal_lens_is_diffraction_limited_at_every_wavelength():
    for lam in (450e-9, 650e-9):
        p = ideal_psf(SPEC, lam, 61, 0.1e-6)
        ring = first_minimum_px(p[30, 30:]) * 0.1e-6
        assert ring == pytest.approx(1.22 * lam * SPEC.f_number, rel=0.10)


@pytest.mark.parametrize("lam", [450e-9, 550e-9, 650e-9])
def test_best_focus_follows_the_diffractive_focal_shift(lam):
    expected = F * LAMBDA0 / lam                                    # f(λ) ≈ f·λ0/λ
    lens = LensSpectrum(SPEC, lam, 5, 0.25e-6)
    zs = expected * np.linspace(0.85, 1.15, 61)
    peak = np.array([lens.psf(0.0, z)[2, 2] for z in zs])
    j = int(peak.argmax())
    assert 0 < j < len(zs) - 1, "the focus must lie inside the scanned range"
    a, b, c = peak[j - 1:j + 2]
    best = zs[j] + 0.5 * (a - c) / (a - 2 * b + c) * (zs[1] - zs[0])
    assert best == pytest.approx(expected, rel=0.03)


def propagating_fraction(lam: float, dx: float, n: int = 512) -> float:
    """Fraction of the sampled lens field's power in propagating plane waves (|ν| < 1/λ)."""
    s = (np.arange(n) - n // 2) * dx
    r2 = s[None, :] ** 2 + s[:, None] ** 2
    phi = 2 * np.pi / LAMBDA0 * (F - np.sqrt(r2 + F * F))
    u = np.where(r2 <= (D / 2) ** 2, np.exp(1j * np.mod(phi, 2 * np.pi) * LAMBDA0 / lam), 0)
    power = np.abs(np.fft.fft2(u)) ** 2
    nu = np.fft.fftfreq(n, dx)
    return float(power[nu[None, :] ** 2 + nu[:, None] ** 2 < lam ** -2].sum() / power.sum())


@pytest.mark.parametrize("lam", [450e-9, 550e-9, 650e-9])
def test_energy_is_conserved(lam):
    lens = LensSpectrum(SPEC, lam, 201, 0.5e-6)                     # 100 µm window, lens is 50 µm
    near = lens.psf(0.0, 0.05 * F).sum()                            # all the light is in the window
    # the propagator conserves the power of the propagating waves (evanescent ones carry none)
    assert near == pytest.approx(propagating_fraction(lam, lens.dx), abs=5e-4)
    assert 0.99 < near <= 1.0
    focal = lens.psf(0.0).sum()
    assert 0.95 < focal <= near + 1e-12


@pytest.mark.parametrize("lam, field", [(420e-9, 25.0), (550e-9, 10.0), (680e-9, 0.0), (600e-9, 60.0)])
def test_psf_is_non_negative_and_at_most_unit_energy(lam, field):
    p = psf(SPEC, lam, field, 31, 1e-6)
    assert p.min() >= 0
    assert 0 < p.sum() <= 1


def ray_traced_centroid_m(theta: float, n: int = 801) -> float:
    """Mean landing x of rays through the hyperbolic lens at λ0, minus the chief ray's f·tanθ."""
    s = np.linspace(-D / 2, D / 2, n)
    x, y = np.meshgrid(s, s)
    inside = x ** 2 + y ** 2 <= (D / 2) ** 2
    x, y = x[inside], y[inside]
    rho = np.sqrt(x ** 2 + y ** 2 + F * F)
    dir_x, dir_y = math.sin(theta) - x / rho, -y / rho             # tilt + lens phase gradient
    dir_z = np.sqrt(1 - dir_x ** 2 - dir_y ** 2)
    return float(np.mean(x + F * dir_x / dir_z) - F * math.tan(theta))


@pytest.mark.parametrize("field_deg", [5.0, 10.0])
def test_off_axis_psf_is_centred_on_the_chief_ray(field_deg):
    pitch = 0.5e-6
    p = psf(SPEC, LAMBDA0, field_deg, 81, pitch)
    offsets = (np.arange(81) - 40) * pitch
    cx = p.sum(axis=0) @ offsets / p.sum()
    cy = p.sum(axis=1) @ offsets / p.sum()
    assert abs(cx) < 1.5 * pitch and abs(cy) < 1e-9 * pitch
    np.testing.assert_allclose(p, p[::-1], atol=1e-12 * p.max())   # mirror symmetric in y
    # the coma flare pulls the centroid just past the chief ray, as geometric optics predicts
    assert cx == pytest.approx(ray_traced_centroid_m(math.radians(field_deg)), abs=0.05e-6)


# ---- independent reference: plain band-limited ASM on one big grid (no shifted window) --------

def brute_force_psf(lam, field_deg, size_px, pitch, k, n_big=1536):
    """PSF by Matsushima's band-limited ASM on a grid holding both the lens and the window.

    The lens (centre on sample n_big//2) gets the tilt in the lens plane; the intensity is read
    around x0 = f·tanθ (which must fall on a sample) and summed over k × k sample pixels. For even
    k the samples must sit half a sample off the pixel centres, so the output is shifted by dx/2.
    """
    dx = pitch / k
    s = (np.arange(n_big) - n_big // 2) * dx
    x, y = s[None, :], s[:, None]
    r2 = x ** 2 + y ** 2
    theta = math.radians(field_deg)
    phi = 2 * np.pi / LAMBDA0 * (F - np.sqrt(r2 + F * F))
    phase = np.mod(phi, 2 * np.pi) * LAMBDA0 / lam + 2 * np.pi / lam * x * math.sin(theta)
    u = np.where(r2 <= (D / 2) ** 2, np.exp(1j * phase), 0)
    nu = np.fft.fftfreq(n_big, dx)
    fx, fy = nu[None, :], nu[:, None]
    limit = 1 / (lam * math.sqrt((2 * F / (n_big * dx)) ** 2 + 1))   # Matsushima & Shimobaba 2009
    w2 = lam ** -2 - fx ** 2 - fy ** 2
    keep = (w2 > 0) & (np.abs(fx) < limit) & (np.abs(fy) < limit)
    shift = (k % 2 == 0) * dx / 2
    h = np.where(keep, np.exp(2j * np.pi * (F * np.sqrt(np.maximum(w2, 0)) + (fx + fy) * shift)), 0)
    field = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(u)) * h))
    intensity = np.abs(field) ** 2 / np.count_nonzero(u)
    x0 = round(F * math.tan(theta) / dx)
    assert x0 * dx == pytest.approx(F * math.tan(theta), abs=1e-6 * dx)
    n_win = size_px * k
    lo_y, lo_x = n_big // 2 - n_win // 2, n_big // 2 + x0 - n_win // 2
    win = intensity[lo_y:lo_y + n_win, lo_x:lo_x + n_win]
    return win.reshape(size_px, k, size_px, k).sum(axis=(1, 3))


@pytest.mark.parametrize("lam, pitch", [(470e-9, 0.75e-6), (650e-9, 0.5e-6), (550e-9, 0.5e-6)],
                         ids=["blue-k3", "red-k2", "green-k2"])
def test_shifted_band_limited_psf_matches_brute_force_asm(lam, pitch):
    lens_pitch = 0.25e-6
    spec = MetalensSpec(aperture_diameter_m=D, focal_length_m=F, lens_pitch_m=lens_pitch)
    k = math.ceil(pitch / lens_pitch)                               # the documented sampling rule
    field_deg = math.degrees(math.atan(60 * pitch / k / F))         # chief ray on a sample
    ours = psf(spec, lam, field_deg, 31, pitch)
    ref = brute_force_psf(lam, field_deg, 31, pitch, k)
    assert np.abs(ours - ref).max() < 1e-3 * ref.max()
    assert ours.sum() == pytest.approx(ref.sum(), abs=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(wavelength_m=-5e-7), "wavelength_m"),
    (dict(size_px=32), "size_px must be a positive odd integer"),
    (dict(pitch_m=0.0), "pitch_m"),
    (dict(field_deg=95.0), "field_deg"),
])
def test_psf_argument_errors(kwargs, match):
    args = dict(spec=SPEC, wavelength_m=LAMBDA0, field_deg=0.0, size_px=31, pitch_m=1e-6) | kwargs
    with pytest.raises(SpecError, match=match):
        psf(**args)


def test_oversized_simulation_is_refused():
    huge = MetalensSpec(aperture_diameter_m=0.05, focal_length_m=0.1)
    with pytest.raises(SpecError, match="simulation grid"):
        psf(huge, LAMBDA0, 0.0, 31, huge.pitch_m)


@pytest.mark.parametrize("lam, field, pitch", [(420e-9, 0.0, 3e-6), (650e-9, 15.0, 2e-6)])
def test_pixel_samples_are_every_kth_fine_sample_times_the_pixel_area(lam, field, pitch):
    """The folded inverse DFT gives exactly the centre sample of each pixel of the full one."""
    lens = LensSpectrum(SPEC, lam, 21, pitch, pixel_sampled=True)
    k = lens.k
    assert lens.n % (2 * k) == 0 and k > 1
    fine = lens.intensity(field)
    np.testing.assert_allclose(lens.pixel_samples(field), fine[k // 2::k, k // 2::k] * k * k,
                               rtol=1e-9, atol=1e-12 * fine.max() * k * k)
    with pytest.raises(ValueError, match="pixel_sampled=True"):
        plain = LensSpectrum(SPEC, lam, 21, pitch)
        if plain.n % k == 0:       # a multiple by chance: nothing to refuse
            raise ValueError("pixel_sampled=True")
        plain.pixel_samples(field)
