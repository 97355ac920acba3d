"""The metalens camera specification: validated fields, derived optical quantities, sampling rule.

All lengths are in metres, angles in degrees, sizes in pixels. A :class:`MetalensSpec` is frozen and
validated on construction, so code that receives one can trust its values.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from dmdiff.errors import DmdiffError

#: Version of the PSF model (propagation + grid code). Bump it whenever a change to the physics or
#: numerics changes computed PSFs, so that disk caches keyed by :meth:`MetalensSpec.cache_key` miss.
OPTICS_MODEL_VERSION = 4

CHANNELS = ("R", "G", "B")


class SpecError(DmdiffError, ValueError):
    """A :class:`MetalensSpec` value is invalid; the message names the field and the allowed range."""


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SpecError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_range(name: str, value: float, lo: float, hi: float, unit: str = "",
                 lo_open: bool = True, hi_open: bool = False) -> None:
    """Raise SpecError unless ``value`` lies in the interval; the message shows the interval."""
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (above and below):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        shown = f"{value:g}" if isinstance(value, float) else value  # an int may be too large for :g
        raise SpecError(f"{name} must be in {interval}{' ' + unit if unit else ''}, got {shown}")


@dataclass(frozen=True)
class MetalensSpec:
    """A hyperbolic metalens in front of a square sensor placed at the design focal length.

    Fields:
        aperture_diameter_m: lens aperture diameter D, in (1 µm, 10 cm].
        focal_length_m: focal length f at the design wavelength; the sensor sits at distance f.
        design_wavelength_m: wavelength λ0 at which the hyperbolic phase focuses perfectly.
        half_field_deg: field angle at the middle of the sensor's edge; with ``pixel_pitch_m=None``
            it sets the pitch, otherwise it is informational (the geometry follows the pitch).
        image_size_px: sensor width = height, in pixels.
        pixel_pitch_m: sensor pixel pitch; None derives ``2·f·tan(half_field) / image_size_px``.
        bands_m: ((lo, hi) R, (lo, hi) G, (lo, hi) B) wavelength bands of the colour channels.
        wavelengths_per_channel: number of wavelengths integrated per channel.
        grid_size: G, the PSF grid is G × G nodes over the sensor.
        psf_size_px: K, odd side of the PSF window in sensor pixels.
        lens_pitch_m: lens-plane sampling; None uses :attr:`required_lens_pitch_m`. A larger value
            aliases the lens phase and is rejected.
        sensor_offset_m: sensor defocus: the sensor sits at ``f + sensor_offset_m`` behind the lens
            (:attr:`sensor_distance_m`), |offset| < f / 2; 0 puts it at the design focal plane.
    """

    aperture_diameter_m: float = 0.5e-3
    focal_length_m: float = 1.0e-3
    design_wavelength_m: float = 550e-9
    half_field_deg: float = 20.0
    image_size_px: int = 256
    pixel_pitch_m: float | None = None
    bands_m: tuple = ((600e-9, 680e-9), (500e-9, 580e-9), (420e-9, 490e-9))
    wavelengths_per_channel: int = 5
    grid_size: int = 7
    psf_size_px: int = 63
    lens_pitch_m: float | None = None
    sensor_offset_m: float = 0.0

    def __post_init__(self):
        def set_(name, value):  # the dataclass is frozen: normalise validated values in place
            object.__setattr__(self, name, value)

        set_("aperture_diameter_m", _real("aperture_diameter_m", self.aperture_diameter_m))
        _check_range("aperture_diameter_m", self.aperture_diameter_m, 1e-6, 0.1, "m")
        set_("focal_length_m", _real("focal_length_m", self.focal_length_m))
        _check_range("focal_length_m", self.focal_length_m, 1e-6, 1.0, "m")
        set_("design_wavelength_m", _real("design_wavelength_m", self.design_wavelength_m))
        _check_range("design_wavelength_m", self.design_wavelength_m, 100e-9, 20e-6, "m",
                     lo_open=False)
        set_("half_field_deg", _real("half_field_deg", self.half_field_deg))
        _check_range("half_field_deg", self.half_field_deg, 0.0, 60.0, "deg")
        set_("image_size_px", _integer("image_size_px", self.image_size_px))
        _check_range("image_size_px", self.image_size_px, 8, 8192, "px", lo_open=False)
        if self.pixel_pitch_m is not None:
            set_("pixel_pitch_m", _real("pixel_pitch_m", self.pixel_pitch_m))
            _check_range("pixel_pitch_m", self.pixel_pitch_m, 1e-8, 1e-3, "m")
        set_("bands_m", self._validated_bands(self.bands_m))
        set_("wavelengths_per_channel",
             _integer("wavelengths_per_channel", self.wavelengths_per_channel))
        _check_range("wavelengths_per_channel", self.wavelengths_per_channel, 1, 64, lo_open=False)
        set_("sensor_offset_m", _real("sensor_offset_m", self.sensor_offset_m))
        _check_range("sensor_offset_m", self.sensor_offset_m, -self.focal_length_m / 2,
                      self.focal_length_m / 2, "m", hi_open=True)
        set_("grid_size", _integer("grid_size", self.grid_size))
        _check_range("grid_size", self.grid_size, 1, min(64, self.image_size_px), lo_open=False)
        set_("psf_size_px", _integer("psf_size_px", self.psf_size_px))
        _check_range("psf_size_px", self.psf_size_px, 3, 1023, "px", lo_open=False)
        if self.psf_size_px % 2 == 0:
            raise SpecError(f"psf_size_px must be odd (the kernel is centred), got {self.psf_size_px}")
        if self.lens_pitch_m is not None:
            set_("lens_pitch_m", _real("lens_pitch_m", self.lens_pitch_m))
            _check_range("lens_pitch_m", self.lens_pitch_m, 1e-10, 1e-3, "m")
            required = self.required_lens_pitch_m
            if self.lens_pitch_m > required * (1 + 1e-9):
                raise SpecError(
                    f"lens_pitch_m = {self.lens_pitch_m:g} m aliases the lens phase: the lens plane "
                    f"must be sampled at most every λ_min / (2·(NA + sin θ_max)) = {required:.6g} m "
                    f"(λ_min = {self.min_wavelength_m:g} m, NA = {self.na:.4g}, "
                    f"θ_max = {self.max_field_deg:.4g}°); set lens_pitch_m <= {required:.6g} or None")

    @staticmethod
    def _validated_bands(bands) -> tuple:
        """Bands as a tuple of three (lo, hi) float pairs with 100 nm <= lo <= hi <= 20 µm (given as
        lists, tuples or arrays: a mapping or set of the right length is no pair)."""
        sequence = (list, tuple, np.ndarray)
        if not isinstance(bands, sequence) or len(bands) != 3:
            raise SpecError(f"bands_m must be three (lo, hi) wavelength pairs for R, G, B, got {bands!r}")
        out = []
        for channel, band in zip(CHANNELS, bands):
            name = f"bands_m[{channel}]"
            if not isinstance(band, sequence) or len(band) != 2:
                raise SpecError(f"{name} must be a (lo, hi) pair in metres, got {band!r}")
            lo, hi = _real(name, band[0]), _real(name, band[1])
            _check_range(f"{name} lower edge", lo, 100e-9, 20e-6, "m", lo_open=False)
            _check_range(f"{name} upper edge", hi, lo, 20e-6, "m", lo_open=False)
            out.append((lo, hi))
        return tuple(out)

    # ---- derived quantities -------------------------------------------------------------------

    @property
    def pitch_m(self) -> float:
        """Sensor pixel pitch in metres (``pixel_pitch_m`` or ``2·f·tan(half_field)/image_size_px``)."""
        if self.pixel_pitch_m is not None:
            return self.pixel_pitch_m
        return 2 * self.focal_length_m * math.tan(math.radians(self.half_field_deg)) / self.image_size_px

    @property
    def sensor_distance_m(self) -> float:
        """Distance from the lens to the sensor, ``f + sensor_offset_m``, in metres."""
        return self.focal_length_m + self.sensor_offset_m

    @property
    def f_number(self) -> float:
        """Working f-number N = f / D."""
        return self.focal_length_m / self.aperture_diameter_m

    @property
    def na(self) -> float:
        """Image-side numerical aperture sin(atan(R / f)), R = D / 2."""
        return math.sin(math.atan(self.aperture_diameter_m / 2 / self.focal_length_m))

    @property
    def max_field_deg(self) -> float:
        """Field angle of the sensor corner, atan(√2 · half sensor width / sensor distance), in degrees."""
        half_width = self.image_size_px * self.pitch_m / 2
        return math.degrees(math.atan(math.sqrt(2) * half_width / self.sensor_distance_m))

    @property
    def min_wavelength_m(self) -> float:
        """Shortest wavelength of all bands, in metres."""
        return min(lo for lo, _ in self.bands_m)

    @property
    def required_lens_pitch_m(self) -> float:
        """Largest alias-free lens-plane pitch, λ_min / (2·(NA + sin θ_max)), in metres."""
        return self.min_wavelength_m / (2 * (self.na + math.sin(math.radians(self.max_field_deg))))

    def wavelengths(self, c: int) -> np.ndarray:
        """Wavelengths (m, float64, shape (wavelengths_per_channel,)) integrated for channel c.

        c = 0, 1, 2 for R, G, B; they are the midpoints of equal sub-bands of the channel's band.
        """
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c < 3:
            raise SpecError(f"channel must be 0 (R), 1 (G) or 2 (B), got {c!r}")
        lo, hi = self.bands_m[c]
        n = self.wavelengths_per_channel
        return lo + (hi - lo) * (np.arange(n) + 0.5) / n

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-safe dict of the fields (bands as nested lists); inverse of :meth:`from_dict`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bands_m"] = [list(band) for band in self.bands_m]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MetalensSpec":
        """Build a spec from a dict such as :meth:`to_dict` gives; unknown keys raise SpecError."""
        if not isinstance(d, dict):
            raise SpecError(f"a MetalensSpec needs a dict of fields, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise SpecError(f"unknown MetalensSpec field(s) {unknown}; valid fields: {known}")
        return cls(**d)

    def cache_key(self) -> str:
        """Stable sha256 hex digest of the canonical field dict and :data:`OPTICS_MODEL_VERSION`."""
        payload = {"optics_model_version": OPTICS_MODEL_VERSION, "spec": self.to_dict()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
