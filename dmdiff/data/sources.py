"""Clean images available offline: bundled natural photos (fixed split) and procedural dead leaves.

Photos (docs/method.md, "Data"): scikit-image's ``astronaut``, ``chelsea``, ``coffee``, ``rocket``,
``hubble_deep_field``, ``retina``, ``immunohistochemistry`` and matplotlib's sample
``grace_hopper.jpg``. The split is fixed at the image level, so no crop of a test photo ever
reaches a training set (the backbone's included)::

    TEST_PHOTOS  = ("chelsea", "coffee", "rocket")
    TRAIN_PHOTOS = ("astronaut", "grace_hopper", "hubble_deep_field", "immunohistochemistry", "retina")
    VALIDATION_PHOTOS = ("EveningGlow", "fruits", "leuvenA", "motorcycle")

The **validation** photos choose every setting of the training recipe (never the test photos): no
training has seen them, the backbone's pretraining included. ``motorcycle`` is the left view of
scikit-image's ``stereo_motorcycle``; the other three ship with dmdiff
(``dmdiff/assets/validation_photos``, their sources and licences in its README).

Eight photos are too few to train even a tiny backbone well (docs/method.md, "Data"), so training sets add
**dead leaves** images (:func:`dead_leaves`): random occluding discs with power-law radii, the
classic model of natural-image statistics (scale invariance, occlusion edges, flat regions);
Achddou et al. (2021) report that restoration networks trained on it generalise to real photos.

All images are float32 ``(H, W, 3)`` sRGB in ``[0, 1]``.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
from pathlib import Path

import matplotlib
import numpy as np
import scipy.ndimage
import skimage.data

from dmdiff.errors import DmdiffError
from dmdiff.imageio import read_image

__all__ = ["TEST_PHOTOS", "TRAIN_PHOTOS", "VALIDATION_PHOTOS", "PHOTOS", "bundled_photos", "load_photo", "photo_palette",
           "dead_leaves", "training_images", "named_rng"]

TEST_PHOTOS = ("chelsea", "coffee", "rocket")
TRAIN_PHOTOS = ("astronaut", "grace_hopper", "hubble_deep_field", "immunohistochemistry", "retina")
VALIDATION_PHOTOS = ("EveningGlow", "fruits", "leuvenA", "motorcycle")
PHOTOS = TRAIN_PHOTOS + TEST_PHOTOS + VALIDATION_PHOTOS
SPLITS = ("train", "test", "val", "all")
_SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "validation_photos"


def named_rng(seed: int, name: str) -> np.random.Generator:
    """A generator determined by ``(seed, name)`` only: independent of order and of other names."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    if name == "grace_hopper":
        image = read_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    elif (_SHIPPED / f"{name}.png").is_file():
        image = read_image(_SHIPPED / f"{name}.png")
    else:
        try:
            raw = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        except Exception as e:  # noqa: BLE001 - a broken or partial scikit-image install
            raise DmdiffError(f"bundled photo {name!r} could not be loaded from scikit-image ({e})") from None
        raw = np.asarray(raw)
        if raw.ndim == 2:
            raw = np.repeat(raw[:, :, None], 3, axis=2)
        image = (raw[:, :, :3].astype(np.float32) / 255.0).astype(np.float32)
    image.setflags(write=False)
    return image


def load_photo(name: str) -> np.ndarray:
    """One bundled photo by name (see :data:`PHOTOS`), float32 (H, W, 3) sRGB in [0, 1] (a copy)."""
    if name not in PHOTOS:
        raise DmdiffError(f"unknown bundled photo {name!r}; available: {list(PHOTOS)}")
    return _photo(name).copy()


def bundled_photos(split: str = "train") -> dict[str, np.ndarray]:
    """The bundled photos of a split: ``"train"`` (5), ``"test"`` (3), ``"val"`` (4) or ``"all"`` (12).

    Returns:
        ``{name: float32 (H, W, 3) sRGB in [0, 1]}`` in a fixed order (copies: safe to modify).
    """
    if split not in SPLITS:
        raise DmdiffError(f"split must be one of {SPLITS}, got {split!r}")
    names = {"train": TRAIN_PHOTOS, "test": TEST_PHOTOS, "val": VALIDATION_PHOTOS, "all": PHOTOS}[split]
    return {name: load_photo(name) for name in names}


@functools.lru_cache(maxsize=8)
def _palette(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in TRAIN_PHOTOS]
    per = int(math.ceil(n / len(photos)))
    colours = []
    for p in photos:
        flat = p.reshape(-1, 3)
        # the astronomy and retina photos are mostly black background: keep few near-black pixels
        bright = flat[flat.max(axis=1) >= 0.04]
        n_dark = per // 20
        colours.append(flat[rng.integers(0, len(flat), n_dark)])
        colours.append(bright[rng.integers(0, len(bright), per - n_dark)])
    out = np.concatenate(colours)[:n].astype(np.float32)
    out.setflags(write=False)
    return out


def photo_palette(n: int = 4096, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` float32 colours sampled from the pixels of the *training* photos.

    Equal numbers per photo; near-black pixels (max channel < 0.04, the background of the astronomy
    and retina photos) are kept at 5 % only.
    """
    return _palette(int(n), int(seed)).copy()


def _natural_colour(rng: np.random.Generator) -> np.ndarray:
    """A random sRGB colour: uniform hue, mostly low saturation, mid-weighted brightness."""
    h = rng.uniform()
    s = rng.beta(1.2, 2.5)
    v = rng.beta(2.0, 1.6)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64)


def _pink_noise(shape: tuple[int, int], rng: np.random.Generator, beta: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std random field with a 1/f^beta amplitude spectrum (natural texture)."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**beta
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(h, w))
    return field / max(field.std(), 1e-12)


def dead_leaves(size: int | tuple[int, int], rng: np.random.Generator, *, rmin: float | None = None,
                rmax: float | None = None, alpha: float = 3.0, palette: np.ndarray | None = None,
                palette_prob: float = 0.7, texture_prob: float = 0.35, blur_sigma: float = 0.6, supersample: int = 2,
                coverage: float = 0.998, max_discs: int = 200_000) -> np.ndarray:
    """A dead-leaves image: random occluding discs with power-law radii (docs/method.md, "Data").

    Discs are drawn front to back: each new disc lies *behind* all earlier ones and only paints
    the pixels still uncovered, until ``coverage`` of the image is covered (any last gaps take the
    colour of the nearest disc). Radii follow ``p(r) ∝ r^-alpha`` on ``[rmin, rmax]`` (alpha = 3
    gives the scale invariance of natural images). Colours come from ``palette`` (rows of sRGB
    values, e.g. :func:`photo_palette`) with probability ``palette_prob``, else (and always without
    a palette) from a natural-looking random distribution (uniform hue, mostly low saturation). With probability ``texture_prob`` a disc is not flat but carries a
    linear shading gradient, a sinusoidal grating or a 1/f noise texture. The image is rendered at
    ``supersample`` × the size and box-downsampled (anti-aliased edges), then slightly blurred
    (Gaussian, ``blur_sigma`` px), like a photo from a good lens.

    Args:
        size: side in pixels, or (height, width).
        rng: the random generator (the only source of randomness).
        rmin, rmax: radius range in output pixels (defaults: ``max(1.5, side/160)`` and ``side/2``).

    Returns:
        float32 ``(H, W, 3)`` sRGB in ``[0, 1]``.
    """

    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    side = min(height, width)
    rmin = max(1.5, side / 160) if rmin is None else float(rmin)
    rmax = side / 2 if rmax is None else float(rmax)
    if not 0 < rmin <= rmax:
        raise ValueError(f"need 0 < rmin <= rmax, got rmin={rmin}, rmax={rmax}")
    s = int(supersample)
    hs, ws = height * s, width * s
    img = np.zeros((hs, ws, 3), dtype=np.float64)
    covered = np.zeros((hs, ws), dtype=bool)
    texture = None
    a1 = 1.0 - alpha
    lo, hi = rmin**a1, rmax**a1
    remaining = hs * ws
    target = (1.0 - coverage) * hs * ws
    for _ in range(max_discs):
        u = rng.uniform()
        r = ((lo + u * (hi - lo)) ** (1.0 / a1) if alpha != 1 else rmin * (rmax / rmin) ** u) * s
        cy, cx = rng.uniform(-0.5, hs - 0.5), rng.uniform(-0.5, ws - 0.5)
        from_palette = palette is not None and rng.uniform() < palette_prob
        colour = palette[rng.integers(len(palette))].astype(np.float64) if from_palette \
            else _natural_colour(rng)
        kind = rng.uniform()
        y0, y1 = max(0, int(math.floor(cy - r))), min(hs, int(math.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(math.floor(cx - r))), min(ws, int(math.ceil(cx + r)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1)[:, None] - cy
        xx = np.arange(x0, x1)[None, :] - cx
        new = ((yy**2 + xx**2) <= r * r) & ~covered[y0:y1, x0:x1]
        if not new.any():
            continue
        if kind < texture_prob:  # a textured disc
            which = rng.integers(3)
            amp = rng.uniform(0.1, 0.5)
            phi = rng.uniform(0, 2 * math.pi)
            proj = (xx * math.cos(phi) + yy * math.sin(phi)) / max(r, 1.0)
            if which == 0:  # linear shading across the disc
                mod = np.broadcast_to(amp * proj, new.shape)
            elif which == 1:  # grating, period between 3 px and the disc's diameter
                period = math.exp(rng.uniform(math.log(3 * s), math.log(max(3 * s + 1, 2 * r))))
                mod = np.broadcast_to(amp * np.sin(2 * math.pi * proj * r / period + rng.uniform(0, 6.3)),
                                      new.shape)
            else:  # natural 1/f texture (one field per image, shared by the textured discs)
                if texture is None:
                    texture = _pink_noise((hs, ws), rng)
                mod = 0.5 * amp * texture[y0:y1, x0:x1]
            values = colour[None, None, :] * (1.0 + mod[:, :, None])
            img[y0:y1, x0:x1][new] = values[new]
        else:
            img[y0:y1, x0:x1][new] = colour
        covered[y0:y1, x0:x1] |= new
        remaining -= int(new.sum())
        if remaining <= target:
            break
    if remaining > 0:  # fill the last gaps from the nearest covered pixel
        if covered.any():
            idx = scipy.ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
            img = img[idx[0], idx[1]]
        else:
            img[:] = _natural_colour(rng)
    if s > 1:
        img = img.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    if blur_sigma > 0:
        img = scipy.ndimage.gaussian_filter(img, sigma=(blur_sigma, blur_sigma, 0), mode="reflect")
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def training_images(size: int = 256, n_dead_leaves: int = 40, seed: int = 0, *,
                    photos: bool = True) -> dict[str, np.ndarray]:
    """Clean images for training: the *training* photos (full size) plus dead-leaves images.

    The test photos (:data:`TEST_PHOTOS`) are never included. Dead leaves use colours sampled from
    the training photos (:func:`photo_palette`) and are named ``deadleaves_000``...; image ``k``
    depends only on ``(seed, name)`` (so it equals the one ``dmdiff simulate`` makes with the same
    seed and size).

    Returns:
        ``{name: float32 (H, W, 3) sRGB in [0, 1]}``.
    """
    out = bundled_photos("train") if photos else {}
    palette = photo_palette() if n_dead_leaves else None
    for k in range(int(n_dead_leaves)):
        name = f"deadleaves_{k:03d}"
        out[name] = dead_leaves(size, named_rng(seed, name), palette=palette)
    return out
