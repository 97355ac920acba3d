"""MetalensSpec: defaults, derived optics, validation messages, sampling rule, serialisation."""

import dataclasses
import json
import math

import numpy as np
import pytest

import dmdiff.optics.spec as spec_module
from dmdiff.errors import DmdiffError
from dmdiff.optics.spec import MetalensSpec, SpecError


def test_defaults_and_derived_quantities():
    s = MetalensSpec()
    assert (s.aperture_diameter_m, s.focal_length_m, s.design_wavelength_m) == (0.5e-3, 1e-3, 550e-9)
    assert (s.image_size_px, s.grid_size, s.psf_size_px, s.wavelengths_per_channel) == (256, 7, 63, 5)
    assert s.pitch_m == pytest.approx(2 * 1e-3 * math.tan(math.radians(20)) / 256)
    assert s.f_number == pytest.approx(2.0)
    assert s.na == pytest.approx(0.25 / math.sqrt(1 + 0.25**2))
    corner = math.degrees(math.atan(math.sqrt(2) * math.tan(math.radians(20))))
    assert s.max_field_deg == pytest.approx(corner)
    required = 420e-9 / (2 * (s.na + math.sin(math.radians(corner))))
    assert s.required_lens_pitch_m == pytest.approx(required)
    assert 0.25e-6 < s.required_lens_pitch_m < 0.35e-6


def test_explicit_pixel_pitch_sets_the_geometry():
    s = MetalensSpec(pixel_pitch_m=2e-6, image_size_px=100)
    assert s.pitch_m == 2e-6
    assert s.max_field_deg == pytest.approx(math.degrees(math.atan(math.sqrt(2) * 100e-6 / 1e-3)))


@pytest.mark.parametrize("c, band", [(0, (600e-9, 680e-9)), (1, (500e-9, 580e-9)), (2, (420e-9, 490e-9))])
def test_wavelengths_are_midpoints_of_equal_sub_bands(c, band):
    lams = MetalensSpec().wavelengths(c)
    assert lams.shape == (5,) and lams.dtype == np.float64
    width = (band[1] - band[0]) / 5
    np.testing.assert_allclose(lams, band[0] + width * (np.arange(5) + 0.5))
    one = MetalensSpec(wavelengths_per_channel=1).wavelengths(c)
    np.testing.assert_allclose(one, [(band[0] + band[1]) / 2])


@pytest.mark.parametrize("c", [3, -1, 1.0, True])
def test_wavelengths_rejects_bad_channel(c):
    with pytest.raises(SpecError, match="channel"):
        MetalensSpec().wavelengths(c)


@pytest.mark.parametrize("field, value, expected", [
    ("aperture_diameter_m", -1, r"aperture_diameter_m must be in \(1e-06, 0\.1\] m, got -1"),
    ("aperture_diameter_m", 1.0, r"aperture_diameter_m must be in \(1e-06, 0\.1\] m, got 1"),
    ("focal_length_m", 0.0, r"focal_length_m must be in \(1e-06, 1\] m, got 0"),
    ("design_wavelength_m", 5e-3, r"design_wavelength_m must be in \[1e-07, 2e-05\] m, got 0\.005"),
    ("half_field_deg", 75, r"half_field_deg must be in \(0, 60\] deg, got 75"),
    ("image_size_px", 4, r"image_size_px must be in \[8, 8192\] px, got 4"),
    ("pixel_pitch_m", -2e-6, r"pixel_pitch_m must be in \(1e-08, 0\.001\] m, got -2e-06"),
    ("wavelengths_per_channel", 0, r"wavelengths_per_channel must be in \[1, 64\], got 0"),
    ("grid_size", 0, r"grid_size must be in \[1, 64\], got 0"),
    ("psf_size_px", 1, r"psf_size_px must be in \[3, 1023\] px, got 1"),
    ("psf_size_px", 64, r"psf_size_px must be odd"),
    ("aperture_diameter_m", float("nan"), r"aperture_diameter_m must be a finite number"),
    ("image_size_px", 256.0, r"image_size_px must be an integer"),
    ("grid_size", True, r"grid_size must be an integer"),
    ("bands_m", ((600e-9, 680e-9), (500e-9, 580e-9)), r"bands_m must be three"),
    ("bands_m", ((680e-9, 600e-9), (500e-9, 580e-9), (420e-9, 490e-9)),
     r"bands_m\[R\] upper edge must be in \[6\.8e-07, 2e-05\] m, got 6e-07"),
    ("bands_m", ((600e-9, 680e-9), (5e-9, 580e-9), (420e-9, 490e-9)),
     r"bands_m\[G\] lower edge must be in \[1e-07, 2e-05\] m, got 5e-09"),
])
def test_nonsense_values_name_the_field_and_the_range(field, value, expected):
    with pytest.raises(SpecError, match=expected) as info:
        MetalensSpec(**{field: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, DmdiffError)


def test_aliasing_lens_pitch_is_rejected_with_the_required_sampling():
    s = MetalensSpec()
    required = s.required_lens_pitch_m
    with pytest.raises(SpecError, match="lens_pitch_m") as info:
        MetalensSpec(lens_pitch_m=2 * required)
    assert f"{required:.6g}" in str(info.value)
    assert MetalensSpec(lens_pitch_m=required / 2).lens_pitch_m == required / 2
    assert MetalensSpec(lens_pitch_m=required).lens_pitch_m == required


def test_the_required_pitch_tightens_with_field_and_short_wavelengths():
    base = MetalensSpec()
    assert MetalensSpec(half_field_deg=30).required_lens_pitch_m < base.required_lens_pitch_m
    blue = ((600e-9, 680e-9), (500e-9, 580e-9), (380e-9, 490e-9))
    assert MetalensSpec(bands_m=blue).required_lens_pitch_m == pytest.approx(
        base.required_lens_pitch_m * 380 / 420)


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MetalensSpec().grid_size = 5


def test_dict_round_trip_through_json():
    s = MetalensSpec(aperture_diameter_m=0.3e-3, pixel_pitch_m=3e-6, grid_size=5, lens_pitch_m=0.2e-6)
    d = json.loads(json.dumps(s.to_dict()))
    assert MetalensSpec.from_dict(d) == s
    assert MetalensSpec.from_dict(d).cache_key() == s.cache_key()
    assert isinstance(s.to_dict()["bands_m"], list)


def test_from_dict_rejects_unknown_keys():
    d = MetalensSpec().to_dict() | {"aperture_m": 1e-3}
    with pytest.raises(SpecError, match=r"unknown MetalensSpec field\(s\) \['aperture_m'\]"):
        MetalensSpec.from_dict(d)
    with pytest.raises(SpecError, match="dict"):
        MetalensSpec.from_dict([1, 2])


def test_cache_key_is_stable_and_sensitive(monkeypatch):
    a, b = MetalensSpec(), MetalensSpec()
    key = a.cache_key()
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == b.cache_key()
    assert MetalensSpec(grid_size=5).cache_key() != key
    assert MetalensSpec(bands_m=[[600e-9, 680e-9], [500e-9, 580e-9], [420e-9, 490e-9]]).cache_key() == key
    monkeypatch.setattr(spec_module, "OPTICS_MODEL_VERSION", spec_module.OPTICS_MODEL_VERSION + 1)
    assert a.cache_key() != key
