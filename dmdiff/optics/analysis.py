"""Measurements on the simulated optics, for notebooks and tests against theory.

* :func:`best_focus_m` — where light of one wavelength actually focuses (the peak of the on-axis
  intensity along the optical axis), to compare with the diffractive-lens law ``f(λ) = f·λ0/λ``.
* :func:`first_dark_ring_m` — radius of the first minimum of a PSF's radial profile, to compare
  with the Airy pattern's ``1.22·λ·N``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from dmdiff.optics.propagation import LensSpectrum
from dmdiff.optics.spec import MetalensSpec


def best_focus_m(spec: MetalensSpec, wavelength_m: float, search: tuple[float, float] = (0.6, 1.6),
                 xtol_rel: float = 1e-4) -> float:
    """Distance (m) behind the lens where the on-axis intensity at ``wavelength_m`` peaks.

    The search brackets ``search`` × the diffractive-lens prediction ``f·λ0/λ``; the lens spectrum is
    computed once and reused for every trial distance.
    """
    predicted = spec.focal_length_m * spec.design_wavelength_m / wavelength_m
    lens = LensSpectrum(spec, wavelength_m, 3, spec.required_lens_pitch_m)
    centre = 3 * lens.k // 2

    def negative_peak(z: float) -> float:
        return -float(lens.intensity(0.0, z)[centre, centre])

    # coarse scan first (the axial profile has side lobes), then a bounded refinement
    zs = predicted * np.linspace(*search, 41)
    best = int(np.argmin([negative_peak(z) for z in zs]))
    lo, hi = zs[max(best - 1, 0)], zs[min(best + 1, len(zs) - 1)]
    result = minimize_scalar(negative_peak, bounds=(lo, hi), method="bounded",
                             options={"xatol": xtol_rel * predicted})
    return float(result.x)


def radial_profile(image: np.ndarray, pitch_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged profile of a centred square image: (radius_m, mean value) per 1-px ring."""
    n = image.shape[0]
    y, x = np.indices(image.shape) - (n - 1) / 2
    ring = np.rint(np.hypot(x, y)).astype(int)
    sums = np.bincount(ring.ravel(), image.ravel())
    counts = np.bincount(ring.ravel())
    keep = np.arange(len(sums)) <= (n - 1) // 2
    return np.arange(len(sums))[keep] * pitch_m, (sums / np.maximum(counts, 1))[keep]


def first_dark_ring_m(image: np.ndarray, pitch_m: float) -> float:
    """Radius (m) of the first local minimum of a centred PSF's radial profile."""
    radius, profile = radial_profile(image, pitch_m)
    for i in range(1, len(profile) - 1):
        if profile[i] <= profile[i - 1] and profile[i] < profile[i + 1]:
            # refine with a parabola through the three samples around the minimum
            a, b, c = profile[i - 1:i + 2]
            denom = a - 2 * b + c
            offset = 0.5 * (a - c) / denom if denom > 0 else 0.0
            return float(radius[i] + offset * pitch_m)
    raise ValueError("the profile has no local minimum inside the window; enlarge the window")
