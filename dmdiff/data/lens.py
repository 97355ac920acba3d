"""The lens of a capture, read from a lens file, and the optics maps it gives (``dmdiff restore --lens``).

A **lens file** is either

* a YAML or JSON mapping of :class:`~dmdiff.optics.spec.MetalensSpec` fields (unknown keys are
  errors naming the key), plus an optional ``noise: [shot, read]``: the captures' noise levels, the
  variance factors ``λ_shot, λ_read`` of :func:`dmdiff.optics.sensor.add_sensor_noise`; or
* a dataset's ``lens.json`` (written by ``dmdiff simulate``): a single-lens dataset's top-level
  ``spec`` is the lens of every capture; a lens-family dataset (``lenses``, no ``spec``) gives the
  lens of each image it lists in ``images``, matched by the file's name stem
  (:func:`dmdiff.data.dataset.image_lens_spec`), and knows no other image. The noise of a listed
  image is the one recorded for it (``images[stem]["noise"]``).

Noise not given (a spec file without ``noise``, an image a single-lens ``lens.json`` does not list)
is **assumed**: :func:`dmdiff.optics.sensor.typical_noise_levels`, the middle of the noise levels
``dmdiff simulate`` draws (a std of 0.023 at mid grey); :meth:`CaptureLens.record` says so.

**Maps** (:class:`LensMaps`): ``MetalensCamera(spec).maps(noise)``, ``(7, G, G)`` over the whole
sensor in field coordinates, with one camera per distinct spec (its PSF grid computed, or loaded
from the disk cache, once). An image of another size than the sensor (``spec.image_size_px``) is
taken as the whole sensor at another resolution: the PSF widths (FWHM and EE80 radius, in pixels)
are scaled by ``max(H, W) / image_size_px`` (:func:`image_maps`). A non-square image is taken as
the centred crop of the square sensor that its longer side spans (square pixels, so one scale for
both axes), and the maps are resampled to that window (:func:`dmdiff.data.dataset.crop_maps`). The
noise channel (std in ``[0, 1]`` units) is kept as it is: how an image was resampled is not known.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmdiff.config import read_yaml
from dmdiff.data.dataset import crop_maps, image_lens_spec
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.optics.camera import MAP_CHANNELS, MetalensCamera
from dmdiff.optics.sensor import typical_noise_levels
from dmdiff.optics.spec import MetalensSpec, SpecError

__all__ = ["CaptureLens", "LensFile", "LensMaps", "LensWarning", "image_maps", "WIDTH_CHANNELS"]

#: The map channels that are PSF widths in pixels (FWHM and EE80 radius per colour).
WIDTH_CHANNELS = [i for i, name in enumerate(MAP_CHANNELS) if name.startswith(("fwhm", "ee80"))]


class LensWarning(UserWarning):
    """A capture's maps were adapted to its size, or its noise levels were assumed."""


@dataclass(frozen=True)
class CaptureLens:
    """The lens of one capture.

    Attributes:
        file: the lens file it was read from.
        spec: the lens and its sensor.
        noise: ``(λ_shot, λ_read)`` variance factors of the capture's sensor noise.
        noise_assumed: True when the file gave no noise for the capture (module docstring).
        name: its name in a lens family (``lens.json`` ``lenses``), else None.
    """

    file: str
    spec: MetalensSpec
    noise: tuple[float, float]
    noise_assumed: bool
    name: str | None = None

    def record(self) -> dict:
        """What a report records of it: file, lens name, the spec's cache key, noise and whether it was assumed."""
        return {"file": self.file, "lens": self.name, "cache_key": self.spec.cache_key(),
                "noise": list(self.noise), "noise_assumed": self.noise_assumed}


def _read_mapping(path: Path) -> dict:
    """The top-level mapping of a JSON (``.json``) or YAML file; DmdiffError naming the file otherwise."""
    if not path.is_file():
        raise DmdiffError(f"--lens {path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DmdiffError(f"--lens {path}: cannot read the file ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise DmdiffError(f"--lens {path}: not valid JSON ({e})") from None
    else:
        try:
            data = read_yaml(path)
        except ConfigError as e:                 # its message starts with the path
            raise ConfigError(f"--lens {e}") from None
    if not isinstance(data, dict):
        raise DmdiffError(f"--lens {path}: expected a mapping (lens spec fields, or a dataset's lens.json), "
                          f"got {type(data).__name__}")
    return data


def _noise(value, where: str) -> tuple[float, float]:
    """``value`` as ``(shot, read)``: two finite numbers >= 0, else DmdiffError naming ``where``."""
    def level(v) -> float | None:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return None
        try:
            v = float(v)
        except OverflowError:
            return None
        return v if math.isfinite(v) and v >= 0 else None

    levels = [level(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == 2 else [None]
    if None in levels:
        raise DmdiffError(f"{where} must be [shot, read], two finite numbers >= 0 (the variance factors of "
                          f"dmdiff.optics.sensor.add_sensor_noise), got {value!r}")
    return levels[0], levels[1]


class LensFile:
    """A lens file (module docstring), read and checked whole: :meth:`lens_of` gives each capture's lens.

    Args:
        path: a YAML/JSON file of MetalensSpec fields (and ``noise``), or a dataset's ``lens.json``.

    Raises:
        DmdiffError: the file is missing, unreadable, not YAML/JSON or not a mapping; a spec field is
            unknown or has a bad value (:class:`~dmdiff.optics.spec.SpecError`, naming the field and,
            in a family, the lens); ``noise`` is not two numbers >= 0.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = _read_mapping(self.path)
        self.is_dataset = "spec" in self.meta or "lenses" in self.meta
        self.spec, self.noise = None, None
        if self.is_dataset:
            self._check_dataset()
        else:
            fields = dict(self.meta)
            if "noise" in fields:
                self.noise = _noise(fields.pop("noise"), f"--lens {self.path}: noise")
            self.spec = self._spec(fields, None)

    def _spec(self, fields, where: str | None) -> MetalensSpec:
        """The spec of ``fields``; DmdiffError naming the file, ``where`` (the key) and the field."""
        try:
            odd = [k for k in fields if not isinstance(k, str)] if isinstance(fields, dict) else []
            if odd:
                raise SpecError(f"field names must be strings, got {odd[0]!r}")
            return MetalensSpec.from_dict(fields)
        except SpecError as e:
            raise SpecError(f"--lens {self.path}: {where + ': ' if where else ''}{e}") from None

    def _check_dataset(self) -> None:
        """Check a ``lens.json``'s lens specs and image records up front (DmdiffError naming the key)."""
        images = self.meta.get("images", {})
        if not isinstance(images, dict):
            raise DmdiffError(f"--lens {self.path}: images must be a mapping of image name to its record")
        if "lenses" not in self.meta:
            self._spec(self.meta["spec"], "spec")
            return
        lenses = self.meta["lenses"]
        if not isinstance(lenses, dict) or not lenses:
            raise DmdiffError(f"--lens {self.path}: lenses must be a mapping of lens name to {{spec: ...}}")
        for name, lens in lenses.items():
            self._spec(lens.get("spec") if isinstance(lens, dict) else None, f"lenses.{name}.spec")

    def lens_of(self, stem: str) -> CaptureLens:
        """The lens of the capture whose file's name stem is ``stem``.

        Raises:
            DmdiffError: a lens-family ``lens.json`` that does not list the image, or names a lens it
                does not hold, or records a bad noise for it (naming the file and the key).
        """
        if not self.is_dataset:
            return self._capture(self.spec, self.noise, None)
        entry = self.meta.get("images", {}).get(stem)
        entry = entry if isinstance(entry, dict) else {}
        try:
            spec = image_lens_spec(self.meta, stem)
        except DmdiffError as e:
            raise DmdiffError(f"--lens {self.path}: {e}") from None
        except TypeError:                       # an unhashable lens name
            raise DmdiffError(f"--lens {self.path}: images.{stem}.lens must be the name of a lens, "
                              f"got {entry.get('lens')!r}") from None
        recorded = entry.get("noise")
        noise = None if recorded is None else _noise(recorded, f"--lens {self.path}: images.{stem}.noise")
        return self._capture(spec, noise, entry.get("lens") if "lenses" in self.meta else None)

    def _capture(self, spec: MetalensSpec, noise: tuple[float, float] | None, name: str | None) -> CaptureLens:
        """A :class:`CaptureLens` of this file, with the assumed noise when ``noise`` is None."""
        if noise is None:
            return CaptureLens(str(self.path), spec, typical_noise_levels(), True, name)
        return CaptureLens(str(self.path), spec, noise, False, name)


def image_maps(maps: np.ndarray, sensor_px: int, image_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
    """A whole sensor's maps for an image of another size (module docstring).

    Args:
        maps: ``(7, G, G)`` maps of a square sensor of ``sensor_px`` px (``MAP_CHANNELS`` order).
        sensor_px: the sensor's side in pixels (``spec.image_size_px``).
        image_hw: the image's (H, W) in pixels.

    Returns:
        ``(maps, scale)``: float32 ``(7, G, G)`` with the PSF widths times ``scale = max(H, W) /
        sensor_px``, resampled to the centred H × W window of the max(H, W)-px square when H ≠ W; the
        maps unchanged (a copy) for a square image of the sensor's size.
    """
    h, w = image_hw
    side = max(h, w)
    scale = side / sensor_px
    out = np.array(maps, dtype=np.float32)
    out[WIDTH_CHANNELS] *= np.float32(scale)
    if h != w:
        out = crop_maps(out, (side, side), ((side - h) / 2, (side - w) / 2, h, w))
    return out, scale


class LensMaps:
    """The optics maps of captures from their lenses (module docstring), one
    :class:`~dmdiff.optics.camera.MetalensCamera` per distinct spec.

    Args:
        progress: show a progress bar while a PSF grid is computed (the first use of a new lens:
            seconds to minutes; later runs load it from the disk cache).
        cache_dir: PSF cache folder (default :func:`dmdiff.optics.grid.default_cache_dir`).

    Not thread-safe: use it from one thread at a time.
    """

    def __init__(self, progress: bool = True, cache_dir: str | os.PathLike | None = None):
        self.progress, self.cache_dir = progress, cache_dir
        self._cameras: dict[str, MetalensCamera] = {}
        self._warned = False

    def camera(self, spec: MetalensSpec) -> MetalensCamera:
        """The camera of ``spec``, made once per distinct spec (by its cache key)."""
        key = spec.cache_key()
        if key not in self._cameras:
            self._cameras[key] = MetalensCamera(spec, self.cache_dir, progress=self.progress)
        return self._cameras[key]

    def prepare(self, specs) -> None:
        """Compute (or load from the cache) the PSF widths of each distinct spec of ``specs`` now."""
        for spec in specs:
            self.camera(spec).sharpness  # noqa: B018 - built lazily and kept

    def maps(self, lens: CaptureLens, image_hw: tuple[int, int], name: str = "the image") -> tuple[np.ndarray, float]:
        """``(maps (7, G, G) float32, scale)`` of a capture of ``image_hw`` (H, W) px through ``lens``
        (:func:`image_maps`); warns once per instance when an image is not the sensor's size or not
        square, saying what was done (``name``: the image, for the warning)."""
        spec = lens.spec
        out, scale = image_maps(self.camera(spec).maps(lens.noise), spec.image_size_px, image_hw)
        h, w = image_hw
        if (scale != 1 or h != w) and not self._warned:
            self._warned = True
            crop = (", and as it is not square, as the centred crop of the square sensor its longer side spans "
                    "(maps resampled to that window)") if h != w else ""
            warnings.warn(f"{name} is {w}×{h} px, the lens's sensor {spec.image_size_px}×{spec.image_size_px} px: "
                          f"taken as the whole sensor at another resolution, its PSF widths (FWHM, EE80) scaled by "
                          f"{scale:.4g}{crop}. Said once; restore.json gives each image's psf_scale.", LensWarning, stacklevel=2)
        return out, scale
