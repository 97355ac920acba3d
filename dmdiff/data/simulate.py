"""``dmdiff simulate``: build a paired metalens dataset in the DMDiff folder layout.

::

    DATASET/
      gt_train/ lr_train/ gt_blur_train/     aligned PNG names, e.g. astronaut_003.png
      gt_val/   lr_val/   gt_blur_val/       the validation split (bundled source only)
      gt_test/  lr_test/  gt_blur_test/
      maps/<name>.npy                        float32 (7, G, G) in MetalensCamera.MAP_CHANNELS order
      lens.json                              spec, simulation settings, per-image record, provenance

With a lens ``family`` (:mod:`dmdiff.data.family`) each image has its own lens: ``lens.json`` lists
the lenses (``lenses``: name → spec, ``held_out``, white-balance gains) instead of one ``spec``,
each image's record names its ``lens``, the train and val splits are captured with the training
lenses (in turn) and every test crop once with each held-out lens
(``<crop name>_<lens name>``); maps and noise are per image as always.

For each clean image ``gt`` (8-bit sRGB, ``spec.image_size_px`` square): ``lr`` is
:meth:`MetalensCamera.capture` of it (blur, haze, noise, ISP), ``gt_blur`` is
:meth:`MetalensCamera.fidelity_target` at that capture's noise level (the neutral path's target: the
scene band-limited by the Wiener transfer of the lens, docs/method.md), ``maps`` the capture's
degradation maps. Datasets of format 1 (``lens.json`` ``format_version`` 1) hold the ideal-lens image
as ``gt_blur`` instead; they still load, with a note (:func:`dmdiff.data.dataset.gt_blur_note`).

Sources:

- default: random crops (random position, a log-uniform random scale, random flips) of the bundled
  photos, resized to the sensor; training photos plus procedural dead-leaves images for the train
  split, the validation photos for the val split (they choose the recipe's settings), the test photos
  only for the test split (never seen in training, scored once);
- ``--images DIR``: every image file in DIR (not recursive), split by a fixed hash of the file name
  (``test_fraction`` of them, at least one per split when there are two or more); unreadable files
  (and images over the pixel limit, :func:`dmdiff.imageio.max_pixels`) are skipped with a warning
  that lists them, and recorded in ``lens.json`` (``skipped``: file and reason; the command then
  exits with status 1); images smaller than the sensor are upscaled with a warning (or rejected,
  ``small_images: reject``).

Reproducible: every image's randomness derives from ``(seed, name)`` only, so the same seed gives
byte-identical image and map files (lens.json differs only in its ``provenance`` block: time,
versions, git revision, duration). Atomic (:func:`dmdiff.outputs.atomic_directory`): the dataset
is built in a hidden folder beside ``--out`` and renamed into place at the end; on any failure
nothing half-written remains, and a later run removes what a killed one left. An existing dataset
is replaced only with ``--overwrite``, and only when the folder holds nothing but the dataset's
own files (those its ``lens.json`` lists): a folder with anything else is never replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dmdiff.config import load_config, merge, read_yaml, smoke_preset, to_dict
from dmdiff.data.corpus import corpus_record, external_photos
from dmdiff.data.family import LensFamily, draw_lenses
from dmdiff.data.dataset import read_lens
from dmdiff.data.sources import (
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    VALIDATION_PHOTOS,
    dead_leaves,
    load_photo,
    named_rng,
    photo_palette,
)
from dmdiff.errors import EXIT_PARTIAL, ConfigError, DmdiffError, ImageReadError
from dmdiff.imageio import IMAGE_EXTENSIONS, read_image, write_png
from dmdiff.optics.camera import MAP_CHANNELS, MetalensCamera
from dmdiff.optics.sensor import quantize
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import atomic_directory, check_replaceable, write_json, write_npy
from dmdiff.runinfo import provenance

__all__ = ["SimulationConfig", "SimulationWarning", "simulate_dataset", "main", "DATASET_FOLDERS",
           "resize_image", "random_crop", "centre_square"]

#: The kind of folder :func:`simulate_dataset` builds (:mod:`dmdiff.outputs`).
DATASET_KIND = "dataset"
#: The splits of a dataset, in the order they are listed.
SPLITS = ("train", "val", "test")
DATASET_FOLDERS = tuple(f"{kind}_{split}" for split in SPLITS for kind in ("gt", "lr", "gt_blur")) + ("maps",)
#: What ``gt_blur`` holds in datasets of this format (``lens.json`` key ``gt_blur``).
GT_BLUR = "fidelity target: the scene filtered by the Wiener transfer of the lens's PSF grid at the capture's noise level"
#: 2: ``gt_blur`` is the fidelity (Wiener) target and there is a ``val`` split; 1: ``gt_blur`` was
#: the ideal-lens image.
FORMAT_VERSION = 2


class SimulationWarning(UserWarning):
    """Something in the input was skipped or changed (unreadable file, upscaled image...)."""


@dataclass
class SimulationConfig:
    """Settings of ``dmdiff simulate`` (YAML keys of ``--config``; unknown keys are errors).

    Attributes:
        crops_per_train_photo: crops taken from each training photo (or training file of --images).
        crops_per_test_photo: crops taken from each test photo (or test file).
        crops_per_val_photo: crops taken from each validation photo (bundled source only).
        dead_leaves_train: procedural dead-leaves images added to the train split (bundled source
            only; they can be added to --images with ``dead_leaves_with_images``).
        dead_leaves_with_images: also add ``dead_leaves_train`` dead-leaves images with --images.
        crop_scale: (min, max) crop side as a fraction of the photo's shorter side, drawn
            log-uniformly; never below the sensor size (crops are downscaled to it, never upscaled).
        hflip, vflip: random horizontal / vertical flips (probability 1/2 each).
        test_fraction: --images: fraction of files held out for the test split (by name hash).
        small_images: --images: what to do with images smaller than the sensor: "upscale" (warn) or
            "reject" (skip, listed in a warning).
        raw_bits: raw A/D bit depth of the camera.
        haze: add the unfocused light as a veil (see dmdiff.optics.camera).
        shot_range: (min, max) shot-noise variance factor λ_shot (Brooks et al. 2019 by default);
            read noise follows from it.
        spec: the MetalensSpec (any of its fields may be overridden, e.g. ``spec: {grid_size: 5}``);
            with a ``family``, the base spec the lenses are drawn around.
        family: a lens family (:class:`~dmdiff.data.family.LensFamily`), or None for one lens.
    """

    crops_per_train_photo: int = 8
    crops_per_test_photo: int = 4
    crops_per_val_photo: int = 3
    dead_leaves_train: int = 40
    dead_leaves_with_images: bool = False
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = True
    vflip: bool = False
    test_fraction: float = 0.2
    small_images: Literal["upscale", "reject"] = "upscale"
    raw_bits: int = 10
    haze: bool = True
    shot_range: tuple[float, float] = (1e-4, 1.2e-2)
    spec: MetalensSpec = field(default_factory=MetalensSpec)
    family: LensFamily | None = None

    def validate(self) -> "SimulationConfig":
        """Raise ConfigError on out-of-range values; return self."""
        for name in ("crops_per_train_photo", "crops_per_test_photo", "crops_per_val_photo", "dead_leaves_train"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.crops_per_train_photo == self.crops_per_test_photo == self.dead_leaves_train == 0:
            raise ConfigError("crops_per_train_photo, crops_per_test_photo and dead_leaves_train are all 0: "
                              "the dataset would hold no images")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if not 1 <= self.raw_bits <= 16:
            raise ConfigError(f"raw_bits must be in [1, 16], got {self.raw_bits}")
        if not 0 < self.shot_range[0] <= self.shot_range[1] < 1:
            raise ConfigError(f"shot_range must satisfy 0 < min <= max < 1, got {list(self.shot_range)}")
        return self


SMOKE_MAX_FILES = 3  # --smoke with --images: at most this many files per split


def resolve_config(config: str | os.PathLike | Mapping | SimulationConfig | None = None,
                   smoke: bool = False) -> SimulationConfig:
    """The simulation settings: defaults (or, with ``smoke``, the smoke preset of configs/smoke.yaml:
    :func:`dmdiff.config.smoke_preset`), with ``config`` laid over them."""
    if isinstance(config, SimulationConfig):
        return config.validate()
    data = {} if config is None else dict(config) if isinstance(config, Mapping) else read_yaml(config)
    if smoke:
        base = merge(SimulationConfig(), smoke_preset("simulate"))
        return merge(base, data).validate()
    return load_config(SimulationConfig, data).validate()


# ---- image helpers ------------------------------------------------------------------------------


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a float (H, W, 3) image with Lanczos filtering (area-aware when shrinking), clipped."""

    if image.shape[:2] == (height, width):
        return image.astype(np.float32, copy=True)
    out = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.asarray(channel.resize((width, height), Image.Resampling.LANCZOS))
    return np.clip(out, 0.0, 1.0)


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
    """The largest centred square of ``image``, resized to ``size`` × ``size`` (float32 sRGB)."""
    height, width = image.shape[:2]
    side = min(height, width)
    y, x = (height - side) // 2, (width - side) // 2
    return resize_image(np.asarray(image, dtype=np.float32)[y:y + side, x:x + side], size, size)


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float],
                hflip: bool, vflip: bool) -> tuple[np.ndarray, dict]:
    """A random square crop resized to ``size``: side log-uniform in ``scale`` × the shorter side
    (at least ``size``), random position, optional random flips. The image must be >= ``size``.

    Returns:
        (crop float32 (size, size, 3), record {"crop": [y, x, side], "hflip": bool, "vflip": bool}).
    """
    height, width = image.shape[:2]
    short = min(height, width)
    lo = max(float(size), scale[0] * short)
    hi = max(lo, scale[1] * short)
    side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if hi > lo else int(round(lo))
    side = max(size, min(side, short))
    y = int(rng.integers(0, height - side + 1))
    x = int(rng.integers(0, width - side + 1))
    crop = resize_image(image[y:y + side, x:x + side], size, size)
    flip_h = bool(hflip and rng.uniform() < 0.5)
    flip_v = bool(vflip and rng.uniform() < 0.5)
    if flip_h:
        crop = crop[:, ::-1]
    if flip_v:
        crop = crop[::-1]
    return np.ascontiguousarray(crop), {"crop": [y, x, side], "hflip": flip_h, "vflip": flip_v}


def _upscale_to(image: np.ndarray, size: int) -> np.ndarray:
    """Upscale so the shorter side is ``size`` (aspect kept)."""
    height, width = image.shape[:2]
    f = size / min(height, width)
    return resize_image(image, max(size, int(round(height * f))), max(size, int(round(width * f))))


def _safe_name(stem: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)
    return keep or "image"


def _hash_unit(name: str) -> float:
    """A fixed number in [0, 1) from a file name (the --images split)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---- sources -----------------------------------------------------------------------------------


@dataclass
class _Source:
    """A clean image to crop from: a bundled photo, a user file, or a dead-leaves generator."""

    name: str  # output name prefix
    split: str
    kind: str  # "photo", "file", "deadleaves"
    path: Path | None = None
    crops: int = 1


def _bundled_sources(cfg: SimulationConfig) -> list[_Source]:
    out = [_Source(p, "train", "photo", crops=cfg.crops_per_train_photo) for p in TRAIN_PHOTOS]
    out += [_Source(p, "val", "photo", crops=cfg.crops_per_val_photo) for p in VALIDATION_PHOTOS]
    out += [_Source(p, "test", "photo", crops=cfg.crops_per_test_photo) for p in TEST_PHOTOS]
    return out


def _user_sources(folder: Path, cfg: SimulationConfig, smoke: bool) -> tuple[list[_Source], list[dict]]:
    """Check every image file of ``folder`` and split them by a hash of the file name.

    Returns:
        (the sources, the skipped files as ``{"file": name, "reason": why}``).
    """
    if not folder.is_dir():
        raise DmdiffError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    ignored = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not candidates:
        raise DmdiffError(f"--images {folder}: no image files there (looked for {', '.join(IMAGE_EXTENSIONS)}"
                          + (f"; found only {_first(ignored)}" if ignored else "") + ")")
    return _file_sources(candidates, cfg, smoke, f"--images {folder}")


def _file_sources(candidates: list[Path], cfg: SimulationConfig, smoke: bool, where: str,
                  all_test: bool = False) -> tuple[list[_Source], list[dict]]:
    """Check image files and split them by a hash of the file name (``all_test``: every one to the
    test split); returns the sources and the skipped files (as :func:`_user_sources`)."""
    size = cfg.spec.image_size_px
    readable, bad, small = [], [], []    # bad / small: {"file": name, "reason": why}
    for p in tqdm(candidates, desc="checking images", unit="img", leave=False, disable=len(candidates) < 50):
        try:
            img = read_image(p)
        except ImageReadError as e:
            bad.append({"file": p.name, "reason": e.reason})
            continue
        h, w = img.shape[:2]
        if min(h, w) < size and (cfg.small_images == "reject" or min(h, w) < 16):
            limit = size if cfg.small_images == "reject" else 16
            small.append({"file": p.name, "reason": f"{w}×{h} px, smaller than {limit} px"})
            continue
        if min(h, w) < size:
            warnings.warn(f"{p.name} is {w}×{h} px, smaller than the {size} px sensor: upscaled "
                          "(its crops are softer than the sensor's resolution)", SimulationWarning, stacklevel=3)
        readable.append(p)

    def listing(items: list[dict], n: int) -> str:
        return _first([f"{d['file']} ({d['reason']})" for d in items], n)

    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s) of {where}: {listing(bad, 10)}",
                      SimulationWarning, stacklevel=3)
    if small:
        why = "smaller than the sensor" if cfg.small_images == "reject" else "smaller than 16 px"
        warnings.warn(f"skipped {len(small)} image(s) {why} ({size} px): {listing(small, 10)}",
                      SimulationWarning, stacklevel=3)
    if not readable:
        raise DmdiffError(f"{where}: none of the {len(candidates)} image file(s) could be used"
                          + (f"; unreadable: {listing(bad, 5)}" if bad else "")
                          + (f"; too small: {listing(small, 5)}" if small else ""))
    skipped = bad + small
    # names: unique, filesystem-safe stems
    names, seen = {}, set()
    for p in readable:
        base = _safe_name(p.stem)
        name = base if base not in seen else _safe_name(p.name)
        k = 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names[p] = name
    units = {p: _hash_unit(p.name) for p in readable}
    test = [p for p in readable if units[p] < cfg.test_fraction or all_test]
    train = [p for p in readable if p not in test]
    if all_test:
        pass
    elif len(readable) >= 2 and cfg.test_fraction > 0:
        if not test:  # keep at least one image out of training
            test = [min(train, key=units.get)]
            train.remove(test[0])
        if not train:
            train = [max(test, key=units.get)]
            test.remove(train[0])
    elif cfg.test_fraction > 0:
        warnings.warn(f"only one usable image in {where}: it goes to the train split, the test split "
                      "is empty", SimulationWarning, stacklevel=3)
        train, test = readable, []
    if smoke:
        train, test = train[:SMOKE_MAX_FILES], test[:SMOKE_MAX_FILES]
    out = [_Source(names[p], "train", "file", p, cfg.crops_per_train_photo) for p in train]
    out += [_Source(names[p], "test", "file", p, cfg.crops_per_test_photo) for p in test]
    return out, skipped


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---- the simulation ----------------------------------------------------------------------------


def dataset_parts(folder: Path) -> set[str] | None:
    """The files a dmdiff dataset in ``folder`` consists of, from its ``lens.json`` (relative POSIX
    paths: ``lens.json``, and per image of its record ``gt_<split>/``, ``lr_<split>/``,
    ``gt_blur_<split>/<name>.png`` and ``maps/<name>.npy``); None when ``folder`` has no
    ``lens.json`` with the dataset format tag. Datasets of every version list their images there."""

    try:
        meta = read_lens(folder)
    except DmdiffError:
        return None
    if not isinstance(meta, dict) or meta.get("format") != "dmdiff-dataset" or not isinstance(meta.get("images"), dict):
        return None
    parts = {"lens.json"}
    for name, entry in meta["images"].items():
        split = entry.get("split") if isinstance(entry, dict) else None
        if split in SPLITS:
            parts |= {f"{d}_{split}/{name}.png" for d in ("gt", "lr", "gt_blur")} | {f"maps/{name}.npy"}
    return parts


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless it is empty, or a dmdiff dataset that holds nothing else and
    ``overwrite`` is set."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DmdiffError(f"--out {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    check_replaceable(out, DATASET_KIND, dataset_parts)
    if not overwrite:
        raise DmdiffError(f"--out {out} already holds a dataset; pass --overwrite to replace it, "
                          "or choose another --out")


def simulate_dataset(out: str | os.PathLike, seed: int = 0,
                     config: str | os.PathLike | Mapping | SimulationConfig | None = None,
                     images: str | os.PathLike | None = None, smoke: bool = False, overwrite: bool = False,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     external: str | os.PathLike | None = None) -> Path:
    """Simulate a dataset into ``out`` (see the module docstring); returns the dataset path.

    Args:
        out: dataset folder to create.
        seed: the seed; the same seed (and settings, inputs, package versions) gives the same files.
        config: YAML file, mapping or :class:`SimulationConfig` laid over the defaults.
        images: folder of clean images (default: bundled photos + dead leaves).
        external: instead, the root under which the external check set's Debian package is
            installed (``/``) or extracted (:func:`dmdiff.data.corpus.external_photos`): every photo
            goes to the **test** split, there is no train split (an evaluation set only).
        smoke: a tiny dataset (the ``simulate`` smoke preset of configs/smoke.yaml) for quick checks.
        overwrite: replace an existing dataset at ``out``.
        cache_dir: PSF cache folder (default: the optics default, ``$DMDIFF_CACHE``).
        progress: show progress bars.

    Raises:
        DmdiffError: bad settings, unusable inputs, or an existing ``out`` (see ``overwrite``).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    cfg = resolve_config(config, smoke)
    out = Path(out)
    _check_out(out, overwrite)
    if images is not None and external is not None:
        raise DmdiffError("--images and --external are two different sources: give one")
    if external is not None:
        photos = external_photos(external)
        sources, skipped = _file_sources([p.path for p in photos], cfg, smoke, "the external check set", all_test=True)
    elif images is not None:
        sources, skipped = _user_sources(Path(images), cfg, smoke)
    else:
        sources, skipped = _bundled_sources(cfg), []
    n_dead = cfg.dead_leaves_train if (images is None and external is None) or cfg.dead_leaves_with_images else 0

    t0 = time.perf_counter()
    with atomic_directory(out, DATASET_KIND, replace=True, legacy=dataset_parts) as tmp:
        record = _build(tmp, cfg, seed, sources, n_dead, cache_dir, progress)
        meta = {
            "format": "dmdiff-dataset",
            "format_version": FORMAT_VERSION,
            ("base_spec" if cfg.family else "spec"): cfg.spec.to_dict(),
            "simulation": {k: v for k, v in to_dict(cfg).items() if k != "spec"},
            "seed": seed,
            "gt_blur": GT_BLUR,
            "smoke": bool(smoke),
            "source": "external" if external is not None else "bundled" if images is None else "images",
            **({"corpus": corpus_record(photos)} if external is not None else {}),
            "skipped": skipped,
            **record,
            "provenance": provenance(config=to_dict(cfg), seed=seed, command="dmdiff simulate",
                                     images=None if images is None else str(Path(images).resolve()),
                                     elapsed_s=round(time.perf_counter() - t0, 1)),
        }
        write_json(tmp / "lens.json", meta)
    return out


def _build(root: Path, cfg: SimulationConfig, seed: int, sources: list[_Source], n_dead: int,
           cache_dir, progress: bool) -> dict:
    """Write all image pairs and maps into ``root``; return the lens.json record parts."""

    size = cfg.spec.image_size_px

    def camera_of(spec: MetalensSpec) -> MetalensCamera:
        return MetalensCamera(spec, cache_dir=cache_dir, raw_bits=cfg.raw_bits, haze=cfg.haze,
                              shot_range=cfg.shot_range, progress=progress).prepare()

    lenses = draw_lenses(cfg.family, cfg.spec, seed) if cfg.family else []
    cameras = {lens.name: camera_of(lens.spec) for lens in tqdm(lenses, desc="lens family", unit="lens",
                                                                  disable=not progress or not lenses)}
    camera = None if lenses else camera_of(cfg.spec)
    training = [lens.name for lens in lenses if not lens.held_out]
    held_out = [lens.name for lens in lenses if lens.held_out]
    assigned = {split: 0 for split in SPLITS}

    def captured_by(name: str, split: str) -> list[tuple[str, str | None, MetalensCamera]]:
        """``(image name, lens name or None, camera)`` of each capture of the clean image ``name``."""
        if not lenses:
            return [(name, None, camera)]
        if split == "test":
            return [(f"{name}_{lens}", lens, cameras[lens]) for lens in held_out]
        lens = training[assigned[split] % len(training)]      # in turn, so every lens is used
        assigned[split] += 1
        return [(name, lens, cameras[lens])]

    for d in DATASET_FOLDERS:
        (root / d).mkdir()
    jobs = [(s, k) for s in sources for k in range(s.crops)]
    jobs += [(_Source(f"deadleaves_{k:03d}", "train", "deadleaves"), 0) for k in range(n_dead)]
    images: dict[str, dict] = {}
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    palette = photo_palette() if n_dead else None
    current = (None, None)  # the source image last loaded, reused for its crops
    bar = tqdm(jobs, desc="simulating", unit="img", disable=not progress)
    for source, k in bar:
        if source.kind == "deadleaves":
            name = source.name
            clean = dead_leaves(size, named_rng(seed, name), palette=palette)
            entry: dict[str, Any] = {"source": "dead_leaves"}
        else:
            name = f"{source.name}_{k:03d}"
            if current[0] is not source:
                full = load_photo(source.name) if source.kind == "photo" else read_image(source.path)
                if min(full.shape[:2]) < size:
                    full = _upscale_to(full, size)
                current = (source, full)
            clean, entry = random_crop(current[1], size, named_rng(seed, name), cfg.crop_scale,
                                       cfg.hflip, cfg.vflip)
            entry = {"source": source.name if source.kind == "photo" else source.path.name, **entry}
        gt = quantize(clean, 8)  # the capture is of exactly what is stored as GT
        split = source.split
        for image, lens, cam in captured_by(name, split):
            cap = cam.capture(gt, seed=_capture_seed(seed, image))
            write_png(root / f"gt_{split}" / f"{image}.png", gt)
            write_png(root / f"lr_{split}" / f"{image}.png", cap.image)
            write_png(root / f"gt_blur_{split}" / f"{image}.png", cam.fidelity_target(gt, cap.noise))
            write_npy(root / "maps" / f"{image}.npy", cap.maps.astype(np.float32))
            images[image] = {**entry, "split": split, "noise": [cap.noise[0], cap.noise[1]],
                             **({"lens": lens} if lens else {})}
            splits[split].append(image)
    bar.close()
    record: dict[str, Any] = {}
    if lenses:
        record["lenses"] = {lens.name: {"spec": lens.spec.to_dict(), "held_out": lens.held_out,
                                        **_camera_record(cameras[lens.name])} for lens in lenses}
    return {
        **record,
        "camera": {
            "raw_bits": cfg.raw_bits, "haze": cfg.haze, **({} if lenses else _camera_record(camera)),
            "map_channels": list(MAP_CHANNELS), "image_size_px": size,
        },
        "counts": {split: len(names) for split, names in splits.items()},
        "splits": {split: sorted(names) for split, names in splits.items()},
        "images": images,
    }


def _camera_record(camera: MetalensCamera) -> dict:
    """What ``lens.json`` records of one lens's camera: its halo cell and white-balance gains."""
    return {"halo_bin_px": camera.grid.halo_bin_px, "wb_gains": [float(g) for g in camera.wb_gains]}


def _capture_seed(seed: int, name: str) -> np.random.SeedSequence:
    digest = hashlib.sha256(f"{name}/capture".encode("utf-8")).digest()
    return np.random.SeedSequence([int(seed), *(int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    parser.add_argument("--images", default=None, help="folder of clean images (default: bundled photos + procedural images)")
    parser.add_argument("--external", default=None, metavar="ROOT",
                        help="instead, the external check set: the photos of lomiri-wallpapers-16.04 installed "
                             "(ROOT /) or extracted under ROOT, all in the test split (dmdiff.data.corpus)")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="YAML file overriding the simulation/lens defaults")
    parser.add_argument("--smoke", action="store_true", help="a tiny dataset for quick checks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out (only a dmdiff dataset that holds nothing else)")


def main(args) -> int:
    """Entry point of ``dmdiff simulate`` (args: images, external, out, seed, config, smoke, overwrite).

    Returns:
        0, or 1 (:data:`~dmdiff.errors.EXIT_PARTIAL`) when input files were skipped (they are
        listed, and recorded in ``lens.json`` under ``skipped``).
    """
    start = time.perf_counter()
    out = simulate_dataset(args.out, seed=args.seed, config=args.config, images=args.images, external=args.external,
                           smoke=args.smoke, overwrite=args.overwrite)
    meta = json.loads((out / "lens.json").read_text())
    counts = meta["counts"]
    total = sum(counts.values())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    split_counts = ", ".join(f"{counts.get(split, 0)} {split}" for split in SPLITS)
    print(f"dmdiff simulate: wrote {total} pairs ({split_counts}, {meta['spec']['image_size_px']} px) to {out} ({size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - start:.0f} s")
    if meta["skipped"]:
        print(f"dmdiff simulate: {len(meta['skipped'])} input file(s) skipped (listed in lens.json):", file=sys.stderr)
        for entry in meta["skipped"]:
            print(f"  {entry['file']}: {entry['reason']}", file=sys.stderr)
        return EXIT_PARTIAL
    return 0
