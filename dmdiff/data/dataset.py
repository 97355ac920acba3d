"""``PairedFolderDataset``: aligned (LR, GT) image pairs from a dataset folder, for torch.

Layouts read (see docs/architecture.md):

- the simulated layout of ``dmdiff simulate``: ``gt_<split>/``, ``lr_<split>/``, optionally
  ``gt_blur_<split>/`` and ``maps/<name>.npy`` (7, G, G);
- folders of real captures: only ``gt_<split>/`` and ``lr_<split>/`` (no maps, no gt_blur);
- plain pairs: ``gt/`` and ``lr/`` (optionally ``gt_blur/``), used when ``gt_<split>/`` is absent.

Pairs are matched by file stem (``astronaut_003.png`` ↔ ``astronaut_003.png``, or ``.jpg``). The
folder is validated **before** use: missing or empty folders, names that do not match between gt
and lr (the first few listed), pairs whose sizes differ, missing or malformed maps (wrong shape, not
real numbers, NaN or infinite values), or a crop larger than an image all raise
:class:`dmdiff.errors.DmdiffError` with the reason.

Random crops use the same window for every image of a pair, and the maps are resampled to the
window: the crop's G × G nodes (at the node positions of the crop, see the conventions) take the
bilinear interpolation of the full image's node values (clamped beyond the outer nodes), so maps
stay ``(7, G, G)``. Flips flip the maps too. Randomness derives from ``(seed, epoch, index)`` only,
so it is reproducible and identical across DataLoader workers; call :meth:`set_epoch` for new crops.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dmdiff.errors import DmdiffError
from dmdiff.imageio import IMAGE_EXTENSIONS, read_image
from dmdiff.optics.blur import node_weights
from dmdiff.optics.deconvolution import central_psf
from dmdiff.optics.grid import psf_grid
from dmdiff.optics.spec import MetalensSpec

__all__ = ["PairedFolderDataset", "crop_maps", "read_lens", "image_lens_spec", "LensGrids", "dataset_central_psf",
           "dataset_psf_grid", "images_by_stem",
           "DEAD_LEAVES", "image_source"]


def _first(items, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files of ``folder`` (not recursive; hidden files skipped), by name stem, sorted.

    Raises:
        DmdiffError: two images share a stem (``a.png`` and ``a.jpg``).
    """
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise DmdiffError(f"{folder}: two images share the name {p.stem!r} ({out[p.stem].name}, {p.name}); "
                              "names must be unique per folder")
        out[p.stem] = p
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header (the pixels are not decoded)."""

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001 - let read_image give the precise reason
        return read_image(path).shape[:2]


def crop_maps(maps: np.ndarray, image_hw: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """Resample degradation maps ``(C, G, G)`` of a full image to a crop window, keeping ``(C, G, G)``.

    Args:
        maps: values at the full image's nodes ``y_i = (i + 0.5)·H/G − 0.5`` (same for x).
        image_hw: (H, W) of the full image.
        window: (y0, x0, h, w) of the crop.

    Returns:
        float32 ``(C, G, G)``: bilinear interpolation (clamped beyond the outer nodes) at the crop's
        own nodes ``y0 + (i + 0.5)·h/G − 0.5``.
    """

    maps = np.asarray(maps, dtype=np.float64)
    _, gy, gx = maps.shape
    height, width = image_hw
    y0, x0, h, w = window
    wy = node_weights(y0 + (np.arange(gy) + 0.5) * h / gy - 0.5, height, gy)  # (G source, G new)
    wx = node_weights(x0 + (np.arange(gx) + 0.5) * w / gx - 0.5, width, gx)
    return np.einsum("ia,cij,jb->cab", wy, maps, wx).astype(np.float32)


def read_lens(root: str | Path) -> dict | None:
    """The dataset's ``lens.json`` as a dict (None when absent). ``MetalensSpec.from_dict(d["spec"])``
    rebuilds the lens."""
    path = Path(root) / "lens.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an integer too long to read
        raise DmdiffError(f"{path}: unreadable lens.json ({e})") from None


def image_lens_spec(meta: dict | None, name: str) -> MetalensSpec | None:
    """The lens that captured image ``name`` of a dataset whose ``lens.json`` is ``meta``.

    A lens-family dataset (``dmdiff simulate`` with a ``family``) records one lens per image:
    ``meta["images"][name]["lens"]`` names an entry of ``meta["lenses"]``, whose ``"spec"`` is the
    lens. A single-lens dataset has one ``meta["spec"]`` for all images. None without either
    (real captures).

    Raises:
        DmdiffError: a family dataset that does not know ``name`` or names a lens it does not list.
    """
    if not isinstance(meta, dict):
        return None
    if "lenses" not in meta:
        return MetalensSpec.from_dict(meta["spec"]) if "spec" in meta else None
    entry = meta.get("images", {}).get(name)
    lens = entry.get("lens") if isinstance(entry, dict) else None
    if lens not in meta["lenses"]:
        raise DmdiffError(f"lens.json: image {name!r} has no lens of the family "
                          f"({'not in its images' if entry is None else f'lens {lens!r} not listed'})")
    return MetalensSpec.from_dict(meta["lenses"][lens]["spec"])


class LensGrids:
    """The true PSF grid of each image's own lens in a dataset whose lens record is ``meta`` (a
    ``lens.json``, single lens or family: :func:`image_lens_spec`): ``grids(name)`` is the
    ``(3, G, G, K, K)`` float32 grid of the lens that captured image ``name``, one per distinct lens,
    loaded from (or computed into) the PSF disk cache on first use.

    Raises (on call):
        DmdiffError: the record has no lens for ``name`` (a family that does not list it).
    """

    def __init__(self, meta: dict, progress: bool = False):
        self.meta, self.progress = meta, progress
        self._grids: dict[str, np.ndarray] = {}

    def spec(self, name: str) -> MetalensSpec:
        """The lens that captured image ``name``."""
        spec = image_lens_spec(self.meta, name)
        if spec is None:
            raise DmdiffError(f"no lens spec for image {name!r} (the lens record has neither 'spec' nor 'lenses')")
        return spec

    def __call__(self, name: str) -> np.ndarray:
        spec = self.spec(name)
        key = spec.cache_key()
        if key not in self._grids:
            self._grids[key] = psf_grid(spec, progress=self.progress).psfs
        return self._grids[key]

    @classmethod
    def of_record(cls, meta: dict | None, progress: bool = False) -> LensGrids | None:
        """The grids of a lens record (a ``lens.json``'s contents), or None when it names no lens
        spec (no record: real captures)."""
        if not isinstance(meta, dict) or not ("spec" in meta or "lenses" in meta):
            return None
        return cls(meta, progress)

    @classmethod
    def of_dataset(cls, root: str | Path, progress: bool = False) -> LensGrids | None:
        """The grids of a simulated dataset's images (its ``lens.json``), or None without a lens spec
        (real captures)."""
        return cls.of_record(read_lens(root), progress)


def dataset_psf_grid(dataset, progress: bool = False) -> tuple[np.ndarray | None, dict | None, str | None]:
    """The true PSF grid of a simulated dataset's lens: ``(psfs (3, G, G, K, K) float64, spec dict,
    None)``, or ``(None, None, reason)`` when ``dataset`` has no ``lens.json`` with one lens spec (real
    captures, or a lens family). The grid comes from the disk cache (:func:`dmdiff.optics.grid.psf_grid`;
    ``progress``: its bar when it must be computed)."""
    lens = read_lens(dataset)
    if isinstance(lens, dict) and "lenses" in lens:
        return None, None, (f"{dataset} is a lens-family dataset (one lens per image): there is no single "
                            "true PSF to deconvolve with")
    if not lens or "spec" not in lens:
        return None, None, f"{dataset} has no lens.json with a lens spec (real captures?): no true PSF to deconvolve with"
    spec = MetalensSpec.from_dict(lens["spec"])
    return np.asarray(psf_grid(spec, progress=progress).psfs, dtype=np.float64), spec.to_dict(), None


def dataset_central_psf(dataset, progress: bool = False) -> tuple[np.ndarray | None, dict | None, str | None]:
    """The true central PSF of a simulated dataset's lens: ``(psf (3, K, K) float64, spec dict, None)``,
    or :func:`dataset_psf_grid`'s ``(None, None, reason)``."""
    grid, spec, reason = dataset_psf_grid(dataset, progress)
    return (None, None, reason) if grid is None else (central_psf(grid), spec, None)


def gt_blur_note(root: str | Path) -> str | None:
    """A note when the dataset at ``root`` was simulated by an older dmdiff whose ``gt_blur`` is the
    ideal-lens image (``lens.json`` format 1) rather than the fidelity target; None otherwise (also for
    datasets without a ``lens.json``, whose ``gt_blur`` is whatever their maker put there)."""
    lens = read_lens(root)
    if not isinstance(lens, dict) or lens.get("format") != "dmdiff-dataset" or lens.get("format_version", 1) >= 2:
        return None
    return (f"{root} was simulated by an older dmdiff (dataset format {lens.get('format_version', 1)}): its gt_blur "
            "is the ideal-lens image, practically the scene, not the fidelity target, so the neutral and "
            "positive paths learn nearly the same output; re-simulate it with `dmdiff simulate` for the new target")


def has_split(root: str | Path, split: str) -> bool:
    """Whether the dataset at ``root`` has at least one image in ``gt_<split>/``."""
    folder = Path(root) / f"gt_{split}"
    return folder.is_dir() and bool(images_by_stem(folder))


#: What :func:`image_source` calls a procedural dead-leaves image.
DEAD_LEAVES = "dead leaves"


def image_source(name: str) -> str:
    """Where a pair came from, read from its name alone: :data:`DEAD_LEAVES` or the source photo.

    The naming of ``dmdiff simulate`` (:mod:`dmdiff.data.simulate`): a crop is ``<source>_<kkk>``
    (``coffee_002``: the third crop of the photo ``coffee``; with ``--images``, ``<source>`` is the
    file's sanitised stem), a dead-leaves image ``deadleaves_<kkk>``. Pseudo pairs
    (:mod:`dmdiff.train.pseudo`) prefix the same names with ``pseudo_`` (``pseudo_coffee_002``,
    ``pseudo_deadleaves_000``); the prefix is dropped. A name without a trailing ``_<digits>`` crop
    index (a pseudo pair of a whole ``--images`` file, ``pseudo_<stem>``) is its own source.

    ``"coffee_002"`` → ``"coffee"``, ``"pseudo_grace_hopper_001"`` → ``"grace_hopper"``,
    ``"deadleaves_007"`` → ``"dead leaves"``.
    """
    stem = name.removeprefix("pseudo_")
    if re.fullmatch(r"deadleaves_\d+", stem):
        return DEAD_LEAVES
    source, sep, index = stem.rpartition("_")
    return source if sep and source and index.isdigit() else stem


class PairedFolderDataset(torch.utils.data.Dataset):
    """Aligned LR/GT pairs (plus gt_blur and maps when present) from a dataset folder.

    Args:
        root: the dataset folder.
        split: ``"train"`` or ``"test"`` (any ``<split>`` with ``gt_<split>/``); plain ``gt/`` + ``lr/``
            folders are used when ``gt_<split>/`` does not exist.
        crop_px: side of the random square crop (same window for all images of a pair); None: whole
            images (then batching needs equal sizes).
        seed: base seed of the crops and flips.
        flips: random horizontal flips (and vertical ones with ``vflips``), maps flipped alike.
        vflips: random vertical flips.
        use_maps: load ``maps/<name>.npy`` when the folder has them (False ignores them).

    Items are dicts: ``lr``, ``gt`` (and ``gt_blur``; the products of :meth:`with_frame_products`) float32 tensors ``(3, h, w)`` sRGB in
    ``[0, 1]``, ``maps`` float32 ``(7, G, G)`` when present, ``name`` (str).

    Raises:
        DmdiffError: the folder fails validation (see the module docstring).
    """

    def __init__(self, root: str | Path, split: str = "train", crop_px: int | None = None, seed: int = 0,
                 *, flips: bool = False, vflips: bool = False, use_maps: bool = True):
        self.root = Path(root)
        self.frame_products: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {}
        self._products: dict[tuple[str, int], np.ndarray] = {}
        self.split = split
        self.crop_px = crop_px
        self.seed = int(seed)
        self.flips = bool(flips)
        self.vflips = bool(vflips)
        self.epoch = 0
        if not self.root.is_dir():
            raise DmdiffError(f"dataset folder not found: {self.root}")
        if crop_px is not None and (isinstance(crop_px, bool) or not isinstance(crop_px, int) or crop_px < 1):
            raise DmdiffError(f"crop_px must be a positive integer or None, got {crop_px!r}")
        gt_dir, lr_dir, blur_dir = self._folders()
        gt, lr = images_by_stem(gt_dir), images_by_stem(lr_dir)
        if not gt:
            raise DmdiffError(f"{gt_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if not lr:
            raise DmdiffError(f"{lr_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self._check_same_names(gt_dir, gt, lr_dir, lr)
        blur = None
        if blur_dir is not None:
            blur = images_by_stem(blur_dir)
            self._check_same_names(gt_dir, gt, blur_dir, blur)
        self.names = sorted(gt)
        self.gt_paths = [gt[n] for n in self.names]
        self.lr_paths = [lr[n] for n in self.names]
        self.gt_blur_paths = [blur[n] for n in self.names] if blur is not None else None
        self.map_paths = self._map_paths() if use_maps else None
        self.sizes = self._check_sizes()
        if crop_px is not None:
            too_small = [f"{n} ({w}×{h} px)" for n, (h, w) in zip(self.names, self.sizes) if min(h, w) < crop_px]
            if too_small:
                smallest = min(min(hw) for hw in self.sizes)
                raise DmdiffError(f"crop_px = {crop_px} is larger than {len(too_small)} image(s) of {gt_dir}: "
                                  f"{_first(too_small)}; use a crop_px of at most {smallest} (the smallest "
                                  "image side)")

    # ---- validation -----------------------------------------------------------------------------

    def _folders(self) -> tuple[Path, Path, Path | None]:
        split = self.split
        gt_dir, lr_dir, blur_dir = (self.root / f"{p}_{split}" for p in ("gt", "lr", "gt_blur"))
        if not gt_dir.is_dir() and not lr_dir.is_dir() and (self.root / "gt").is_dir():
            gt_dir, lr_dir, blur_dir = self.root / "gt", self.root / "lr", self.root / "gt_blur"
        if not gt_dir.is_dir() or not lr_dir.is_dir():
            missing = [d.name for d in (gt_dir, lr_dir) if not d.is_dir()]
            present = sorted(p.name + "/" for p in self.root.iterdir() if p.is_dir())
            raise DmdiffError(
                f"{self.root}: missing folder(s) {', '.join(m + '/' for m in missing)} for split {split!r} "
                f"(found: {', '.join(present) or 'no folders'}); expected gt_{split}/ + lr_{split}/ "
                "(as written by `dmdiff simulate`) or gt/ + lr/")
        return gt_dir, lr_dir, blur_dir if blur_dir.is_dir() else None

    @staticmethod
    def _check_same_names(a_dir: Path, a: dict, b_dir: Path, b: dict) -> None:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            parts = []
            if only_a:
                parts.append(f"{len(only_a)} only in {a_dir.name}/ ({_first(only_a)})")
            if only_b:
                parts.append(f"{len(only_b)} only in {b_dir.name}/ ({_first(only_b)})")
            raise DmdiffError(f"{a_dir.parent}: image names of {a_dir.name}/ and {b_dir.name}/ do not match: "
                              + "; ".join(parts))

    def _map_paths(self) -> list[Path] | None:
        folder = self.root / "maps"
        if not folder.is_dir():
            return None
        paths = [folder / f"{n}.npy" for n in self.names]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DmdiffError(f"{folder}: {len(missing)} map file(s) missing: {_first(missing)} "
                              "(remove maps/ to use the pairs without maps)")
        shapes = set()
        for p in paths:
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DmdiffError(f"{p}: unreadable map file ({e})") from None
            if arr.ndim != 3 or arr.shape[0] != 7 or arr.shape[1] < 1 or arr.shape[2] < 1:
                raise DmdiffError(f"{p}: maps must have shape (7, G, G), got {arr.shape}")
            if arr.dtype.kind not in "fiu":
                raise DmdiffError(f"{p}: maps must hold real numbers, got dtype {arr.dtype}")
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise DmdiffError(f"{p}: {bad} of the {arr.size} map values are NaN or infinite "
                                  "(regenerate the maps, or remove maps/ to use the pairs without maps)")
            shapes.add(arr.shape)
        if len(shapes) > 1:
            raise DmdiffError(f"{folder}: maps of different shapes {sorted(shapes)}; a dataset has one grid size")
        return paths

    def _check_sizes(self) -> list[tuple[int, int]]:
        sizes, bad = [], []
        for i, name in enumerate(self.names):
            hw = _image_size(self.gt_paths[i])
            others = [("lr", self.lr_paths[i])] + ([("gt_blur", self.gt_blur_paths[i])] if self.gt_blur_paths else [])
            for label, path in others:
                other = _image_size(path)
                if other != hw:
                    bad.append(f"{name} (gt {hw[1]}×{hw[0]}, {label} {other[1]}×{other[0]} px)")
            sizes.append(hw)
        if bad:
            raise DmdiffError(f"{self.root}: {len(bad)} pair(s) with different image sizes: {_first(bad)}")
        return sizes

    # ---- items ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/flips (they depend on seed, epoch and index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        images = {"lr": read_image(self.lr_paths[index]), "gt": read_image(self.gt_paths[index])}
        if self.gt_blur_paths is not None:
            images["gt_blur"] = read_image(self.gt_blur_paths[index])
        for key in self.frame_products:
            images[key] = self._whole_product(key, index, images["lr"])
        maps = np.load(self.map_paths[index], allow_pickle=False) if self.map_paths is not None else None
        height, width = images["gt"].shape[:2]
        for key, img in images.items():
            if img.shape[:2] != (height, width):
                raise DmdiffError(f"{self.names[index]}: {key} is {img.shape[1]}×{img.shape[0]} px, gt is "
                                  f"{width}×{height} px (the files changed after the dataset was opened?)")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crop_px is not None:
            c = self.crop_px
            y0, x0 = int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))
            images = {k: v[y0:y0 + c, x0:x0 + c] for k, v in images.items()}
            if maps is not None:
                maps = crop_maps(maps, (height, width), (y0, x0, c, c))
        hflip = self.flips and rng.uniform() < 0.5
        vflip = self.vflips and rng.uniform() < 0.5
        if hflip:
            images = {k: v[:, ::-1] for k, v in images.items()}
            maps = maps[:, :, ::-1] if maps is not None else None
        if vflip:
            images = {k: v[::-1] for k, v in images.items()}
            maps = maps[:, ::-1] if maps is not None else None
        item = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1), dtype=np.float32))
                for k, v in images.items()}
        if maps is not None:
            item["maps"] = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
        item["name"] = self.names[index]
        return item

    def with_frame_products(self, products: dict[str, Callable[[torch.Tensor, str], torch.Tensor]]) -> PairedFolderDataset:
        """This dataset (a copy: same files, already checked) whose items also carry, under each key
        of ``products``, ``product(lr, name)``: a function of a whole ``lr`` image ``(1, 3, H, W)``
        and its name → ``(1, 3, H, W)`` (a model's colour anchor or network input with the image's
        lens, :func:`dmdiff.train.data.frame_products`), computed once per image and kept in memory,
        then cropped and flipped with the images."""
        copied = copy.copy(self)
        copied.frame_products, copied._products = dict(products), {}
        return copied

    def _whole_product(self, key: str, index: int, lr: np.ndarray) -> np.ndarray:
        """Product ``key`` of the whole ``lr`` image ``(H, W, 3)`` → ``(H, W, 3)`` float32, once per index."""
        if (key, index) not in self._products:
            x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1), dtype=np.float32))[None]
            self._products[key, index] = (self.frame_products[key](x, self.names[index])[0].cpu().numpy()
                                          .transpose(1, 2, 0))
        return self._products[key, index]
