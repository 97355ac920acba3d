"""A family of metalenses for ``dmdiff simulate``: lenses drawn from ranges, some held out.

A lens-family dataset answers the question a user with a new metalens asks: does one model adapt
to the PSF it is told about, without retraining? Each image is captured by one lens of the family;
SVDA is given that lens's maps (and the capture's noise level), so the maps now vary between
images instead of being a fixed function of the position in the field.

Lenses ``lens_00 … lens_{n-1}`` are the training lenses (train and val splits), the next
``held_out_lenses`` never reach training: every test crop is captured once by each of them.
Each lens is the base spec (``SimulationConfig.spec``) with its aperture, focal length, design
wavelength and sensor offset drawn uniformly from the ranges (a range ``[a, a]`` fixes a field),
from a random stream of ``(seed, lens name)`` only. The field of view stays the base spec's
(the pixel pitch follows the focal length), so a field position means the same in every lens.
Noise is drawn per image, as in a single-lens dataset (``SimulationConfig.shot_range``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dmdiff.data.sources import named_rng
from dmdiff.errors import ConfigError
from dmdiff.optics.spec import MetalensSpec, SpecError

__all__ = ["LensFamily", "FamilyLens", "draw_lenses", "RANGED_FIELDS"]

#: The spec fields a family varies, each drawn uniformly from its range.
RANGED_FIELDS = ("aperture_diameter_m", "focal_length_m", "design_wavelength_m", "sensor_offset_m")


@dataclass(frozen=True)
class LensFamily:
    """The ``family`` section of a simulation config (``null``: one lens, the base spec).

    Attributes:
        train_lenses: number of lenses the train and val splits are captured with (>= 1).
        held_out_lenses: number of further lenses for the test split only (>= 1).
        aperture_diameter_m, focal_length_m, design_wavelength_m, sensor_offset_m: ``(lo, hi)``
            ranges in metres; the default ranges keep the default lens's f-number within
            f/1.7–f/2.4 and move its best-focus colour across the green band.
    """

    train_lenses: int = 6
    held_out_lenses: int = 2
    aperture_diameter_m: tuple[float, float] = (0.42e-3, 0.58e-3)
    focal_length_m: tuple[float, float] = (0.9e-3, 1.1e-3)
    design_wavelength_m: tuple[float, float] = (500e-9, 600e-9)
    sensor_offset_m: tuple[float, float] = (-15e-6, 15e-6)

    def __post_init__(self):
        for name in ("train_lenses", "held_out_lenses"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in RANGED_FIELDS:
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(f"{name} must be a (lo, hi) range with lo <= hi, got {[lo, hi]}")


@dataclass(frozen=True)
class FamilyLens:
    """One lens of a family: its name (``lens_07``), spec, and whether it is held out of training."""

    name: str
    spec: MetalensSpec
    held_out: bool


def draw_lenses(family: LensFamily, base: MetalensSpec, seed: int) -> list[FamilyLens]:
    """The family's lenses, training lenses first; the same ``(family, base, seed)`` gives the same.

    Raises:
        ConfigError: a drawn lens is not a valid spec (the message names the lens and the field).
    """
    lenses = []
    for k in range(family.train_lenses + family.held_out_lenses):
        name = f"lens_{k:02d}"
        rng = named_rng(seed, f"family/{name}")
        values = {field: float(rng.uniform(*getattr(family, field))) for field in RANGED_FIELDS}
        try:
            spec = replace(base, **values)
        except SpecError as err:
            raise ConfigError(f"family: {name} drawn from the ranges is not a valid lens: {err}") from None
        lenses.append(FamilyLens(name, spec, held_out=k >= family.train_lenses))
    return lenses
