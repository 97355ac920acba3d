"""A grid of band-integrated metalens PSFs over the sensor, disk-cached, and its sharpness maps.

Nodes follow docs/architecture.md: node (i, j) of an H × W sensor sits at pixel
``(y_i, x_j) = ((i + 0.5)·H/G − 0.5, (j + 0.5)·W/G − 0.5)``. Its sensor position relative to the
optical axis is ``(x, y) = (x_j − (W−1)/2, y_i − (H−1)/2)·pitch`` (y grows downwards, like rows),
its field angle ``θ = atan(r / z)`` (z the sensor distance, f at focus) with ``r = hypot(x, y)`` and its azimuth ``atan2(y, x)``.

The lens is rotationally symmetric, so PSFs are computed once per distinct radius with the field
along +x (:class:`dmdiff.optics.propagation.LensSpectrum`, one lens spectrum per wavelength),
averaged over the channel's wavelengths (equal weights) on the fine simulation grid, rotated to
each node's azimuth (bilinear interpolation on the fine grid, which over-samples the intensity),
binned to pixels and rescaled so rotation does not change the energy in the window.

The ``K × K`` window holds the sharp core of each PSF, not all of its light: a diffractive lens
sends part of the light into other diffraction orders, which land as wide, defocused discs (up
to about twice the aperture across), and the defocused red and blue cores spread beyond ``K``
too. So each node also gets a *halo*: the PSF over a window of ``Kh`` pixels
(:func:`halo_layout`: every pixel of the sensor a point on it can reach), sampled once per pixel
(:meth:`~dmdiff.optics.propagation.LensSpectrum.pixel_samples`, enough for light that varies
slowly across a pixel), with the core window set to zero, rotated like the core, and summed
over ``b × b`` pixel cells into a coarse ``Kc × Kc`` kernel (``b`` odd, so the image point
sits at the centre of the centre cell). Core plus halo hold all the light that reaches the
sensor (at least 99 % for the default lens and at the edges of the spec's ranges, the tests
check it); the camera applies the halo on a ``b``-times coarser image
(:mod:`dmdiff.optics.camera`).

Grids are cached as safetensors files named by :meth:`MetalensSpec.cache_key` (which includes
the optics model version) in ``cache_dir``, ``$DMDIFF_CACHE`` or ``~/.cache/dmdiff/psf``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file
from scipy import ndimage
from tqdm.auto import tqdm

from dmdiff.optics.propagation import LensSpectrum, bin_pixels, largest_window_px
from dmdiff.optics.spec import OPTICS_MODEL_VERSION, MetalensSpec
from dmdiff.weights import save_safetensors

FWHM_OVERSAMPLE = 8       # bilinear sub-samples per pixel side when measuring the half-max area
EE_BIN_PX = 0.02          # radial bin (pixels) of the encircled-energy curve
EE_OVERSAMPLE = 5         # uniform sub-samples per pixel side for the encircled energy
HALO_MAX_CELLS = 63          # coarse halo kernels have at most this many cells per side


@dataclass
class PSFGrid:
    """PSFs on the G × G node grid.

    Attributes:
        psfs: float32 (3, G, G, K, K): channel (R, G, B), node row i, node column j, kernel rows,
            kernel columns; centred at (K//2, K//2), each kernel sums to <= 1 (the fraction of the
            light entering the aperture that falls in the window).
        field_deg: float64 (G, G, 2): the node's field angle θ split along the sensor axes,
            ``(θ·cos(azimuth), θ·sin(azimuth))`` in degrees (x right, y down); ``hypot`` gives θ.
        spec: the lens and sensor.
        halo: float32 (3, G, G, Kc, Kc) or None: the light of each PSF outside its K × K window,
            summed over ``halo_bin_px × halo_bin_px`` pixel cells, the image point at the centre of
            cell (Kc//2, Kc//2) (module docstring); None for a grid without one (made by hand).
        halo_bin_px: b, the side of a halo cell in pixels (odd).
    """

    psfs: np.ndarray
    field_deg: np.ndarray
    spec: MetalensSpec
    halo: np.ndarray | None = None
    halo_bin_px: int = 1

    def energy(self) -> np.ndarray:
        """(3, G, G) float64: the fraction of the light entering the aperture held by core + halo."""
        total = self.psfs.astype(np.float64).sum(axis=(-2, -1))
        if self.halo is not None:
            total += self.halo.astype(np.float64).sum(axis=(-2, -1))
        return total


def node_offsets_px(spec: MetalensSpec) -> np.ndarray:
    """Node offsets from the sensor centre along one axis, ``x_j − (W−1)/2``, float64 (G,) px."""
    g, w = spec.grid_size, spec.image_size_px
    return (2 * np.arange(g) + 1 - g) * w / (2 * g)


def node_field_deg(spec: MetalensSpec) -> np.ndarray:
    """Field angles of the nodes as in :attr:`PSFGrid.field_deg`, float64 (G, G, 2) degrees."""
    off = node_offsets_px(spec) * spec.pitch_m
    x, y = np.meshgrid(off, off)                       # x varies along columns j, y along rows i
    r = np.hypot(x, y)
    theta = np.degrees(np.arctan(r / spec.sensor_distance_m))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_az, sin_az = np.where(r > 0, x / r, 1.0), np.where(r > 0, y / r, 0.0)
    return np.stack([theta * cos_az, theta * sin_az], axis=-1)


def halo_layout(spec: MetalensSpec) -> tuple[int, int, int]:
    """``(Kh, b, Kc)``: the halo window side (px, odd), its cell side (px, odd), cells per side (odd).

    ``Kh = 2·image_size − 1``, the window that holds every pixel of the sensor a point on it can
    send light to, at most what the simulation grid allows
    (:func:`~dmdiff.optics.propagation.largest_window_px`: only for sensors of thousands of
    pixels) and at least ``K``; ``b`` the smallest odd cell with at most
    :data:`HALO_MAX_CELLS` cells per side; ``Kc·b >= Kh``.
    """
    kh = min(2 * spec.image_size_px - 1, largest_window_px(spec, spec.pitch_m))
    kh = max(spec.psf_size_px, kh)
    b = math.ceil(kh / HALO_MAX_CELLS)
    b += 1 - b % 2
    kc = math.ceil(kh / b)
    kc += 1 - kc % 2
    return kh, b, kc


def default_cache_dir() -> Path:
    """``$DMDIFF_CACHE`` if set, else ``~/.cache/dmdiff/psf``."""
    env = os.environ.get("DMDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dmdiff" / "psf"


def psf_grid(spec: MetalensSpec, cache_dir: str | os.PathLike | None = None,
             progress: bool = True) -> PSFGrid:
    """The band-integrated PSF grid of ``spec``, loaded from the disk cache or computed and cached.

    The cache file is ``<cache_dir>/psfgrid-<spec.cache_key()>.safetensors`` (``cache_dir``
    defaults to :func:`default_cache_dir`), written atomically. ``progress`` shows a tqdm bar.
    """
    g, k = spec.grid_size, spec.psf_size_px
    _, b, kc = halo_layout(spec)
    path = Path(cache_dir or default_cache_dir()) / f"psfgrid-{spec.cache_key()}.safetensors"
    data = _read(path, {"psfs": (3, g, g, k, k), "field_deg": (g, g, 2), "halo": (3, g, g, kc, kc)})
    if data is None:
        psfs, halo = _compute_psfs(spec, progress)
        data = {"psfs": psfs, "field_deg": node_field_deg(spec), "halo": halo}
        try:
            _write(path, data, spec)
        except OSError as exc:   # a read-only or full cache is not fatal: the grid is recomputed next time
            warnings.warn(f"could not cache the PSF grid in {path} ({exc.strerror or exc}); it will be "
                          "computed again next time (set DMDIFF_CACHE to a writable folder)", stacklevel=2)
    return PSFGrid(data["psfs"].astype(np.float32), data["field_deg"].astype(np.float64), spec,
                   data["halo"].astype(np.float32), b)


def _compute_psfs(spec: MetalensSpec, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 (3, G, G, K, K) cores and (3, G, G, Kc, Kc) halos; see the module docstring."""
    g = spec.grid_size
    kh, b, kc = halo_layout(spec)
    # squared node radius in units of (W / 2G) px: exact integers, so equal radii match exactly
    units = 2 * np.arange(g) + 1 - g
    radii2, node_radius = np.unique(units[None, :] ** 2 + units[:, None] ** 2, return_inverse=True)
    node_radius = node_radius.reshape(g, g)
    radii_m = np.sqrt(radii2) * spec.image_size_px / (2 * g) * spec.pitch_m
    fields = np.degrees(np.arctan(radii_m / spec.sensor_distance_m))
    x, y = np.meshgrid(units, units)                     # node direction, x right, y down
    out = np.empty((3, g, g, spec.psf_size_px, spec.psf_size_px), np.float32)
    halo = np.empty((3, g, g, kc, kc), np.float32)
    core = slice((kh - spec.psf_size_px) // 2, (kh + spec.psf_size_px) // 2)
    pad = (kc * b - kh) // 2
    total = 3 * spec.wavelengths_per_channel * len(fields)
    with tqdm(total=total, desc="PSF grid", unit="psf", disable=not progress) as bar:
        for c in range(3):
            fine, wide, k = _radial_intensities(spec, c, fields, kh, bar)
            for i, j in np.ndindex(g, g):
                r = math.hypot(x[i, j], y[i, j])
                cos_az, sin_az = (x[i, j] / r, y[i, j] / r) if r > 0 else (1.0, 0.0)
                out[c, i, j] = _rotated_binned(fine[node_radius[i, j]], cos_az, sin_az, k)
                outer = wide[node_radius[i, j]].copy()
                outer[core, core] = 0.0         # the core's light, before rotation: no overlap
                outer = _rotated_binned(outer, cos_az, sin_az, 1)
                halo[c, i, j] = bin_pixels(np.pad(outer, pad), b)
    return out, halo


def _radial_intensities(spec: MetalensSpec, c: int, fields: np.ndarray, halo_px: int,
                        bar) -> tuple[np.ndarray, np.ndarray, int]:
    """Channel averages for fields along +x: fine core intensities (len(fields), n_win, n_win),
    pixel-sampled halo windows (len(fields), halo_px, halo_px), and k."""
    lams = spec.wavelengths(c)
    acc = wide = None
    for lam in lams:
        lens = LensSpectrum(spec, lam, spec.psf_size_px, spec.pitch_m)   # same k for all bands
        far = LensSpectrum(spec, lam, halo_px, spec.pitch_m, pixel_sampled=True)
        if acc is None:
            acc = np.zeros((len(fields), lens.n_win, lens.n_win))
            wide = np.zeros((len(fields), halo_px, halo_px))
        for ri, field in enumerate(fields):
            acc[ri] += lens.intensity(field) / len(lams)
            wide[ri] += far.pixel_samples(field) / len(lams)
            bar.update()
    return acc, wide, lens.k


def _rotated_binned(fine: np.ndarray, cos_az: float, sin_az: float, k: int) -> np.ndarray:
    """Rotate a sampled PSF (field along +x) so +x points to the azimuth, then bin k × k.

    The result is rescaled to the energy of the unrotated window.
    """
    if (cos_az, sin_az) == (1, 0):
        return bin_pixels(fine, k)
    n = fine.shape[0]
    centre = (n - 1) / 2
    v, u = np.mgrid[0:n, 0:n] - centre                  # output row / column offsets
    src_col = u * cos_az + v * sin_az + centre
    src_row = -u * sin_az + v * cos_az + centre
    rotated = ndimage.map_coordinates(fine, [src_row, src_col], order=1, mode="constant", cval=0.0)
    binned = bin_pixels(rotated, k)
    total = binned.sum()
    return binned * (fine.sum() / total) if total > 0 else binned


def ideal_psf_rgb(spec: MetalensSpec, size_px: int) -> np.ndarray:
    """Band-integrated, on-axis PSFs of the aberration-free lens (same D, f), float32 (3, K, K).

    Each channel averages :func:`dmdiff.optics.propagation.ideal_psf` over the channel's
    wavelengths (equal weights) at the sensor pitch; ``K = size_px`` (odd). Not cached: a few
    seconds for the default spec (one lens spectrum and one propagation per wavelength).
    """
    out = np.zeros((3, size_px, size_px))
    for c in range(3):
        lams = spec.wavelengths(c)
        for lam in lams:
            out[c] += LensSpectrum(spec, lam, size_px, spec.pitch_m, ideal=True).psf() / len(lams)
    return out.astype(np.float32)


# ---- sharpness ---------------------------------------------------------------------------------

def sharpness_maps(grid: PSFGrid) -> dict[str, np.ndarray]:
    """PSF widths per channel and node, in sensor pixels.

    Returns ``{"fwhm_px": (3, G, G), "ee80_px": (3, G, G)}`` float32:

    * ``fwhm_px``: diameter of the disc whose area equals the area where the pixel-integrated PSF
      is at least half its maximum, the area measured on a bilinear ×8 interpolation of the pixels
      (equals the FWHM for a round spot; counts every region above half max).
    * ``ee80_px``: radius around the PSF centroid that encloses 80 % of the energy inside the
      window, each pixel's energy spread uniformly over its area.
    """
    psfs = np.asarray(grid.psfs, np.float64)
    shape = psfs.shape[:3]
    flat = psfs.reshape(-1, *psfs.shape[3:])
    fwhm = np.array([_fwhm_px(p) for p in flat]).reshape(shape)
    ee80 = np.array([_encircled_radius_px(p, 0.8) for p in flat]).reshape(shape)
    return {"fwhm_px": fwhm.astype(np.float32), "ee80_px": ee80.astype(np.float32)}


def _fwhm_px(p: np.ndarray) -> float:
    """Equivalent-disc diameter (px) of the region where the bilinear-interpolated p >= max/2."""
    s = FWHM_OVERSAMPLE
    n = p.shape[0]
    coords = (np.arange(n * s) + 0.5) / s - 0.5
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    fine = ndimage.map_coordinates(p, [rows, cols], order=1, mode="nearest")
    area = np.count_nonzero(fine >= 0.5 * p.max()) / s**2
    return 2 * math.sqrt(area / math.pi)


def _encircled_radius_px(p: np.ndarray, fraction: float) -> float:
    """Radius (px) around the centroid of p enclosing ``fraction`` of p's sum (pixels uniform)."""
    n, s = p.shape[0], EE_OVERSAMPLE
    total = p.sum()
    idx = np.arange(n)
    cy, cx = (p.sum(axis=1) @ idx) / total, (p.sum(axis=0) @ idx) / total
    sub = (np.arange(n * s) + 0.5) / s - 0.5                       # sub-sample centres, px
    d = np.hypot(sub[:, None] - cy, sub[None, :] - cx)
    weights = np.repeat(np.repeat(p, s, axis=0), s, axis=1) / s**2
    bins = (d / EE_BIN_PX).astype(np.int64).ravel()
    cumulative = np.cumsum(np.bincount(bins, weights=weights.ravel()))
    b = int(np.searchsorted(cumulative, fraction * total))
    below = cumulative[b - 1] if b > 0 else 0.0
    step = cumulative[b] - below
    return EE_BIN_PX * (b + ((fraction * total - below) / step if step > 0 else 0.0))


# ---- cache -------------------------------------------------------------------------------------

def _read(path: Path, shapes: dict[str, tuple]) -> dict[str, np.ndarray] | None:
    """Arrays of the cache file at ``path``; None when it is absent or unreadable (warned)."""
    if not path.exists():
        return None
    try:
        data = load_file(str(path))
        for name, shape in shapes.items():
            if data[name].shape != shape:
                raise ValueError(f"{name} has shape {data[name].shape}, expected {shape}")
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        warnings.warn(f"ignoring unreadable PSF cache {path} ({exc}); recomputing", stacklevel=3)
        return None
    return data


def _write(path: Path, arrays: dict[str, np.ndarray], spec: MetalensSpec) -> None:
    """Save ``arrays`` as safetensors (with the spec as metadata), atomically."""
    metadata = {"spec": json.dumps(spec.to_dict(), sort_keys=True),
                "optics_model_version": str(OPTICS_MODEL_VERSION)}
    save_safetensors(path, {name: np.ascontiguousarray(a) for name, a in arrays.items()}, metadata)