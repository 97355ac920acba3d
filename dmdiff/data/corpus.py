"""A broad photo corpus for pretraining the tiny backbone, from Debian packages, with each photo's licence.

The bundled photos (:mod:`dmdiff.data.sources`) are too few for a prior worth the name. Three
Debian packages carry natural photos with clear licences; dmdiff reads them where they are
installed (``apt-get install …``) or extracted (``dpkg-deb -x PACKAGE.deb ROOT``) under a root
folder, and redistributes none of them except downscaled copies of the three held-out validation
photos below (``dmdiff/assets/validation_photos``; the pretrained weights are what users get):

* ``plasma-workspace-wallpapers``: 11 of its 30 wallpapers are photographs
  (:data:`PLASMA_PHOTOS`; the others are rendered graphics and illustrations), 2560–5120 px,
  each under the licence its ``metadata.json`` states (LGPL-3.0 for these);
* ``opencv-doc``: the colour photographs of ``examples/data`` (:data:`OPENCV_PHOTOS`; left out:
  synthetic drawings, text, logos, a painting, motion-blurred shots, grayscale images and the
  second view of a pair), under OpenCV's licence (Apache-2.0 and BSD-3-Clause, Debian's
  ``copyright`` file);
* ``lomiri-wallpapers-16.04``: 15 contest photographs (CC-BY-4.0 / CC-BY-SA-4.0, per file). These
  are the **external check set**: no training of any kind sees them (:func:`external_photos`).

Three of the training packages' photos (:data:`VALIDATION_PHOTOS`) are held out of pretraining as
its validation set: layouts and settings are chosen on them, never on the external check set. They
are also three of the four photos of the datasets' validation split
(:data:`dmdiff.data.sources.VALIDATION_PHOTOS`).

:func:`multiscale_crop` takes crops at the whole range of scales at which a sensor of ``sensor_px``
pixels could see such a scene: from one photo pixel per sensor pixel to the whole scene filling
the sensor, so a ``size``-px crop covers a window of side log-uniform in ``[size, size · S /
sensor_px]`` photo pixels (``S`` the photo's shorter side), resized to ``size``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dmdiff.data.sources import TRAIN_PHOTOS
from dmdiff.errors import DmdiffError

__all__ = ["CorpusPhoto", "PLASMA_PHOTOS", "OPENCV_PHOTOS", "VALIDATION_PHOTOS", "PACKAGES", "training_photos",
           "validation_photos", "external_photos", "multiscale_crop", "corpus_record"]

#: The photographs among plasma-workspace-wallpapers (folder names under usr/share/wallpapers).
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "OneStandsOut", "Path", "summer_1am")
#: The colour photographs of opencv-doc's examples/data (file names without extension).
OPENCV_PHOTOS = ("aero1", "aero3", "aloeL", "apple", "baboon", "board", "building", "butterfly", "chicky_512",
                 "ela_original", "fruits", "graf1", "home", "leuvenA", "messi5", "orange", "rubberwhale1",
                 "squirrel_cls", "stuff")
#: Corpus photos held out of pretraining and only scored: they choose layouts and settings (the external
#: check set never does).
VALIDATION_PHOTOS = ("plasma_EveningGlow", "opencv_fruits", "opencv_leuvenA")
#: The Debian packages the corpus comes from, and what each is for.
PACKAGES = {"plasma-workspace-wallpapers": "training", "opencv-doc": "training", "lomiri-wallpapers-16.04": "external check"}

_PLASMA = Path("usr/share/wallpapers")
_OPENCV = Path("usr/share/doc/opencv-doc/examples/data")
_OPENCV_COPYRIGHT = Path("usr/share/doc/opencv-doc/copyright")
_LOMIRI = Path("usr/share/backgrounds")
_LOMIRI_COPYRIGHT = Path("usr/share/doc/lomiri-wallpapers-16.04/copyright")


@dataclass(frozen=True)
class CorpusPhoto:
    """One photo of the corpus: ``name`` (unique), ``path``, the Debian ``package`` it comes from,
    its ``licence`` and ``author`` as the package states them."""

    name: str
    path: Path
    package: str
    licence: str
    author: str


def _missing(package: str, root: Path, what: str) -> DmdiffError:
    return DmdiffError(f"{what} of {package} not found under {root}: install it (`apt-get update && apt-get "
                       f"install {package}`) or extract it (`apt-get download {package} && dpkg-deb -x "
                       f"{package}_*.deb {root}`)")


def _plasma(root: Path) -> list[CorpusPhoto]:
    photos = []
    for name in PLASMA_PHOTOS:
        folder = root / _PLASMA / name
        images = sorted((folder / "contents" / "images").glob("*"))
        if not images:
            raise _missing("plasma-workspace-wallpapers", root, f"the wallpaper {name}")
        meta = json.loads((folder / "metadata.json").read_text())["KPlugin"]
        authors = ", ".join(a.get("Name", "") for a in meta.get("Authors", []))
        largest = max(images, key=lambda p: math.prod(int(v) for v in p.stem.split("x")))
        photos.append(CorpusPhoto(f"plasma_{name}", largest, "plasma-workspace-wallpapers",
                                  meta.get("License", "unknown"), authors))
    return photos


def _stanzas(copyright_file: Path) -> list[dict[str, str]]:
    """The paragraphs of a machine-readable Debian ``copyright`` file as ``{field: value}``."""
    stanzas, current, key = [], {}, None
    for line in copyright_file.read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return stanzas


def _opencv(root: Path) -> list[CorpusPhoto]:
    licence = next((s["License"] for s in _stanzas(root / _OPENCV_COPYRIGHT) if s.get("Files") == "*"), "unknown") \
        if (root / _OPENCV_COPYRIGHT).is_file() else "unknown"
    photos = []
    for name in OPENCV_PHOTOS:
        found = sorted((root / _OPENCV).glob(f"{name}.*"))
        if not found:
            raise _missing("opencv-doc", root, f"examples/data/{name}")
        photos.append(CorpusPhoto(f"opencv_{name}", found[0], "opencv-doc", licence, "OpenCV contributors"))
    return photos


def _corpus(root: str | Path) -> list[CorpusPhoto]:
    root = Path(root)
    return _plasma(root) + _opencv(root)


def training_photos(root: str | Path = "/") -> list[CorpusPhoto]:
    """The corpus photos that training may use (plasma + opencv, less :data:`VALIDATION_PHOTOS`),
    from packages under ``root``.

    Raises:
        DmdiffError: a package is neither installed nor extracted there (the message says how).
    """
    return [p for p in _corpus(root) if p.name not in VALIDATION_PHOTOS]


def validation_photos(root: str | Path = "/") -> list[CorpusPhoto]:
    """The corpus photos held out of pretraining (:data:`VALIDATION_PHOTOS`), from packages under ``root``.

    Raises:
        DmdiffError: a package is neither installed nor extracted there (the message says how).
    """
    return [p for p in _corpus(root) if p.name in VALIDATION_PHOTOS]


def external_photos(root: str | Path = "/") -> list[CorpusPhoto]:
    """The external check set: lomiri-wallpapers-16.04's 15 photographs (never used for training).

    Raises:
        DmdiffError: the package is neither installed nor extracted under ``root``.
    """
    root = Path(root)
    copyright_file = root / _LOMIRI_COPYRIGHT
    if not copyright_file.is_file():
        raise _missing("lomiri-wallpapers-16.04", root, "the copyright file")
    photos = []
    for stanza in _stanzas(copyright_file):
        files = stanza.get("Files", "")
        if not files.startswith("16.04/"):
            continue
        path = root / _LOMIRI / files.split("/", 1)[1]
        if not path.is_file():
            raise _missing("lomiri-wallpapers-16.04", root, f"the photo {path.name}")
        author = stanza.get("Copyright", "").rsplit(",", 1)[0].strip()
        photos.append(CorpusPhoto(f"external_{path.stem}", path, "lomiri-wallpapers-16.04",
                                  stanza.get("License", "unknown"), author))
    if not photos:
        raise _missing("lomiri-wallpapers-16.04", root, "the 16.04 photos")
    return photos


def multiscale_crop(image: np.ndarray, size: int, rng: np.random.Generator, sensor_px: int = 256) -> np.ndarray:
    """A ``size``² crop of ``image`` (``(H, W, 3)`` float in ``[0, 1]`` or uint8, shorter side ``S``
    ≥ ``size``) at a random scale at which a ``sensor_px`` sensor could see the photo's scene: a
    square window of side log-uniform in ``[size, max(size, size · S / sensor_px)]`` at a random
    position, resized to ``size`` (Lanczos, area-aware when shrinking), flipped left–right half of
    the time.

    Returns:
        float32 ``(size, size, 3)`` in ``[0, 1]``.
    """
    height, width = image.shape[:2]
    short = min(height, width)
    if short < size:
        raise DmdiffError(f"a {width}×{height} px photo is smaller than the {size} px crop")
    largest = min(short, max(size, size * short / sensor_px))
    side = int(round(math.exp(rng.uniform(math.log(size), math.log(largest))))) if largest > size else size
    y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    window = np.asarray(image[y:y + side, x:x + side], dtype=np.float32)
    if np.issubdtype(image.dtype, np.integer):
        window = window / 255.0
    crop = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(window[:, :, c]), mode="F")
                                .resize((size, size), Image.Resampling.LANCZOS)) for c in range(3)], axis=-1)
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop, 0.0, 1.0).astype(np.float32)


def corpus_record(photos: list[CorpusPhoto]) -> dict:
    """What a report records of a corpus: per package its photos, licences and authors, plus the
    bundled training photos (scikit-image / matplotlib sample data)."""
    record: dict = {"bundled": list(TRAIN_PHOTOS), "packages": {}}
    for photo in photos:
        entry = {k: str(v) for k, v in asdict(photo).items() if k not in ("package",)}
        record["packages"].setdefault(photo.package, []).append(entry)
    return record
