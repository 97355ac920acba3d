"""``dmdiff pseudo``: pseudo pairs from a stage-1 (negative-path) model (docs/method.md, stage 2 data).

For each clean image ``gt`` (8-bit sRGB, ``size × size``): ``lr = pseudo_noise_augment(
DMDiff.degrade(gt, maps))`` — the learned GT → metalens-capture mapping, then signal-dependent shot
noise and low-frequency blotchy noise (stronger in the dark; :func:`dmdiff.optics.sensor.
pseudo_noise_augment`). Written in the dataset layout so ``PairedFolderDataset(out, "train")``
reads it and stage 2 can add it to the real pairs::

    OUT/
      gt_train/pseudo_<name>.png   lr_train/pseudo_<name>.png
      gt_blur_train/pseudo_<name>.png    ideal-lens target, when the dataset has lens.json + gt_blur
      maps/pseudo_<name>.npy             when the dataset has maps (see below)
      pseudo.json                        settings, model run, names, the lens each pair imitates, provenance

Clean images: ``--images DIR`` (every image file, a random ``size`` crop of each, upscaled first
when smaller), or by default ``count`` bundled ones: dead-leaves images and random crops of the
*training* photos, named ``pseudo_*`` so their random streams differ from the dataset's crops of
the same photos even under the same seed; the test photos are never used.

Maps: every image of a simulated dataset covers the same sensor field, so its PSF-width channels
are the same for all pairs; a pseudo pair gets the element-wise median of the dataset's training
maps (the noise channel is thus the dataset's median noise level, not that of the pseudo noise).
The same maps describe the lens to ``degrade``. A dataset without maps gives pairs without maps.
In a lens-family dataset (:mod:`dmdiff.data.family`) each pair imitates the lens of one training
image drawn for it (``(seed, name)``): that image's maps, and its lens for the ideal-lens target.

Reproducible (same model, settings and seed → same files); atomic (built in a temporary folder
beside ``OUT`` and renamed into place).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.config import merge, to_dict
from dmdiff.data.dataset import PairedFolderDataset, image_lens_spec, read_lens
from dmdiff.data.simulate import random_crop, resize_image
from dmdiff.data.sources import (
    TRAIN_PHOTOS,
    dead_leaves,
    load_photo,
    named_rng,
    photo_palette,
)
from dmdiff.device import torch_threads
from dmdiff.errors import DmdiffError
from dmdiff.imageio import IMAGE_EXTENSIONS, read_image, write_png
from dmdiff.optics.camera import MetalensCamera
from dmdiff.optics.sensor import pseudo_noise_augment, quantize
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import atomic_directory, check_replaceable, write_json, write_npy
from dmdiff.runinfo import provenance
from dmdiff.runs import CONFIG, PIPELINE, load_pipeline
from dmdiff.train.config import PseudoConfig, load_train_config

RECORD = "pseudo.json"
#: The kind of folder :func:`make_pseudo_pairs` builds (:mod:`dmdiff.outputs`).
PSEUDO_KIND = "pseudo-pairs"
PAIR_FOLDERS = ("gt_train", "lr_train", "gt_blur_train")


def _pairs_record(folder: Path) -> dict | None:
    """The ``pseudo.json`` of a pseudo-pair folder, or None when ``folder`` has no readable one."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "dmdiff-pseudo-pairs" else None


def pseudo_parts(folder: Path) -> set[str] | None:
    """The files of a pseudo-pair folder from its ``pseudo.json`` (the record, and per name its
    images and maps); None when ``folder`` has no such record."""
    record = _pairs_record(folder)
    if record is None or not isinstance(record.get("names"), list):
        return None
    return {RECORD} | {f"{d}/{n}.png" for n in record["names"] for d in PAIR_FOLDERS} \
        | {f"maps/{n}.npy" for n in record["names"]}


def pairs_lens(folder: Path) -> dict | None:
    """The lens record of the pseudo pairs in ``folder`` (``pseudo.json``'s ``lens``,
    :func:`pairs_lens_record`); None when ``folder`` holds no pseudo pairs or they imitate no lens spec.

    Raises:
        DmdiffError: pseudo pairs written before the record existed (the message says how to remake them).
    """
    record = _pairs_record(folder)
    if record is None:
        return None
    if "lens" not in record:
        raise DmdiffError(f"{Path(folder) / RECORD} does not record the lens each pseudo pair imitates (made by an "
                          f"older dmdiff), which the colour anchor deconvolves with: make them again "
                          f"(dmdiff pseudo --overwrite, or delete {folder} and rerun the recipe)")
    return record["lens"]


def load_trained(run: str | Path):
    """The DMDiff model of a finished training run (``RUN/pipeline/``, its base backbone as trained)
    and the run's :class:`~dmdiff.train.config.TrainConfig` (``RUN/config.yaml``).

    Raises:
        DmdiffError: not a run folder, or the run has no final model yet.
    """
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise DmdiffError(f"--model {run}: not a training run folder (no {CONFIG})")
    if not (run / PIPELINE).is_dir():
        raise DmdiffError(f"--model {run}: the run has no final model ({PIPELINE}/); finish it first "
                          "(dmdiff train ... --resume latest)")
    return load_pipeline(run / PIPELINE).model, load_train_config(run / CONFIG)


def _lens_size(dataset: Path) -> int:
    """The dataset's sensor side (lens.json), else its first training image's shorter side."""

    lens = read_lens(dataset)
    if lens and "camera" in lens:
        return int(lens["camera"]["image_size_px"])
    return int(min(PairedFolderDataset(dataset, "train").sizes[0]))


def dataset_maps(dataset: Path) -> np.ndarray | None:
    """Median of the training maps ``(7, G, G)`` float32 of ``dataset``; None when it has no maps."""

    ds = PairedFolderDataset(dataset, "train")
    if ds.map_paths is None:
        return None
    return np.median(np.stack([np.load(p, allow_pickle=False) for p in ds.map_paths]), axis=0).astype(np.float32)


def _ideal_lens(dataset: Path):
    """``MetalensCamera`` of the dataset's lens when it has lens.json and gt_blur images, else None."""

    lens = read_lens(dataset)
    if not lens or "spec" not in lens or not (dataset / "gt_blur_train").is_dir():
        return None
    return MetalensCamera(MetalensSpec.from_dict(lens["spec"]), progress=False)


def imitated_lenses(dataset: Path, seed: int) -> tuple[Callable[[str], tuple[np.ndarray | None, Any, str | None]],
                                                      bool, bool]:
    """What each pseudo pair imitates (module docstring, "Maps"): ``(lens, maps, targets)`` with
    ``lens(name) -> (maps (7, G, G) float32 or None, MetalensCamera or None, family lens name or
    None)`` for pair ``name``, and whether the pairs get maps and ideal-lens targets at all."""

    meta = read_lens(dataset)
    if not (isinstance(meta, dict) and "lenses" in meta):
        maps, camera = dataset_maps(dataset), _ideal_lens(dataset)
        return (lambda name: (maps, camera, None)), maps is not None, camera is not None
    train = PairedFolderDataset(dataset, "train")
    targets = (dataset / "gt_blur_train").is_dir()
    cameras: dict[str, MetalensCamera] = {}

    def lens(name: str) -> tuple[np.ndarray | None, Any, str | None]:
        k = int(named_rng(seed, f"{name}/lens").integers(len(train.names)))
        spec = image_lens_spec(meta, train.names[k])
        camera = cameras.setdefault(spec.cache_key(), MetalensCamera(spec, progress=False)) if targets else None
        maps = None if train.map_paths is None else np.load(train.map_paths[k], allow_pickle=False).astype(np.float32)
        return maps, camera, meta["images"][train.names[k]]["lens"]

    return lens, train.map_paths is not None, targets


def pairs_lens_record(meta: dict | None, lens_of: dict[str, str | None]) -> dict | None:
    """The lens record of pseudo pairs (``pseudo.json``'s ``lens``, read like a ``lens.json`` by
    :class:`dmdiff.data.dataset.LensGrids`): the dataset's ``{"spec": …}`` for a single lens; for a
    family, ``{"lenses": {lens: {"spec": …}}, "images": {pair: {"lens": lens}}}`` from
    ``lens_of`` (pair name → the family lens it imitates); None for a dataset without a lens spec."""
    if not isinstance(meta, dict):
        return None
    if "lenses" not in meta:
        return {"spec": meta["spec"]} if "spec" in meta else None
    return {"lenses": {k: {"spec": meta["lenses"][k]["spec"]} for k in sorted(set(lens_of.values()))},
            "images": {name: {"lens": k} for name, k in lens_of.items()}}


def _square_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) < size:
        f = size / min(h, w)
        image = resize_image(image, max(size, round(h * f)), max(size, round(w * f)))
    return random_crop(image, size, rng, (0.3, 1.0), hflip=True, vflip=False)[0]


def bundled_clean_images(count: int, size: int, seed: int, dead_leaves_fraction: float
                         ) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, float32 (size, size, 3) sRGB)``: dead leaves first, then crops of the training photos
    in turn (``pseudo_<photo>_<k>``); names start with ``pseudo_``."""

    n_dead = int(round(count * dead_leaves_fraction))
    palette = photo_palette() if n_dead else None
    for k in range(n_dead):
        name = f"pseudo_deadleaves_{k:03d}"
        yield name, dead_leaves(size, named_rng(seed, name), palette=palette)
    photos = {}
    for k in range(count - n_dead):
        photo = TRAIN_PHOTOS[k % len(TRAIN_PHOTOS)]
        name = f"pseudo_{photo}_{k // len(TRAIN_PHOTOS):03d}"
        if photo not in photos:
            photos[photo] = load_photo(photo)
        yield name, _square_crop(photos[photo], size, named_rng(seed, name))


def folder_clean_images(folder: Path, size: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Every image file of ``folder`` (sorted), a random ``size`` crop each, named ``pseudo_<stem>``.

    Raises:
        DmdiffError: not a folder, or no image files in it.
    """

    if not folder.is_dir():
        raise DmdiffError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DmdiffError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    seen = set()
    for p in files:
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p.stem)
        name, k = f"pseudo_{stem}", 1
        while name in seen:
            name, k = f"pseudo_{stem}_{k}", k + 1
        seen.add(name)
        yield name, _square_crop(read_image(p), size, named_rng(seed, name))


def make_pseudo_pairs(model_run: str | Path, out: str | Path, dataset: str | Path | None = None,
                      images: str | Path | None = None, settings: PseudoConfig = PseudoConfig(),
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Write pseudo pairs (module docstring) into ``out``; returns ``out``.

    Args:
        model_run: a finished (stage-1) training run folder.
        out: the folder to create.
        dataset: the real dataset whose lens the pairs imitate (maps, size, ideal lens); None: the
            run's ``data``.
        images: a folder of clean images; None: bundled images (``settings.count`` of them).
        settings: count, dead-leaves share, noise strength, size, batch size, seed.
        overwrite: replace an existing ``out``.
        progress: show a progress bar.

    Raises:
        DmdiffError: unusable model run, dataset or image folder, or an existing ``out``.
    """
    settings.validate()
    out = Path(out)
    if out.exists() or out.is_symlink():
        check_replaceable(out, PSEUDO_KIND, pseudo_parts)
        if not overwrite:
            raise DmdiffError(f"--out {out} already holds pseudo pairs; pass --overwrite to replace them")
    model, run_cfg = load_trained(model_run)
    with torch_threads(run_cfg.threads):
        return _write_pairs(model, run_cfg, Path(model_run), out, dataset, images, settings, progress)


def _write_pairs(model, run_cfg, model_run: Path, out: Path, dataset, images, settings: PseudoConfig,
                 progress: bool) -> Path:
    """The body of :func:`make_pseudo_pairs`, with the model loaded."""

    dataset = Path(dataset if dataset is not None else run_cfg.data)
    size = settings.size_px or _lens_size(dataset)
    imitate, has_maps, has_targets = imitated_lenses(dataset, settings.seed)
    clean = (folder_clean_images(Path(images), size, settings.seed) if images is not None
             else bundled_clean_images(settings.count, size, settings.seed, settings.dead_leaves_fraction))
    total = None if images is not None else settings.count

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names, lens_of = [], {}
    with atomic_directory(out, PSEUDO_KIND, replace=True, legacy=pseudo_parts) as tmp:
        folders = ["gt_train", "lr_train"] + (["gt_blur_train"] if has_targets else []) + (["maps"] if has_maps else [])
        for d in folders:
            (tmp / d).mkdir()
        bar = tqdm(total=total, desc="pseudo pairs", unit="img", disable=not progress, file=sys.stderr)
        while True:
            chunk = [(n, quantize(img, 8)) for n, img in _take(clean, settings.batch_size)]
            if not chunk:
                break
            gt = torch.from_numpy(np.stack([img for _, img in chunk]).transpose(0, 3, 1, 2).copy())
            lenses = [imitate(name) for name, _ in chunk]
            m = None if not has_maps else torch.from_numpy(np.stack([pair_maps for pair_maps, _, _ in lenses]))
            lr = model.degrade(gt, m).float().permute(0, 2, 3, 1).cpu().numpy()
            for (name, g), degraded, (pair_maps, pair_camera, lens_name) in zip(chunk, lr, lenses):
                noisy = pseudo_noise_augment(degraded, named_rng(settings.seed, f"{name}/noise"), settings.noise_strength)
                write_png(tmp / "gt_train" / f"{name}.png", g)
                write_png(tmp / "lr_train" / f"{name}.png", noisy)
                if has_targets:
                    write_png(tmp / "gt_blur_train" / f"{name}.png", pair_camera.ideal(g))
                if has_maps:
                    write_npy(tmp / "maps" / f"{name}.npy", pair_maps)
                names.append(name)
                lens_of[name] = lens_name
            bar.update(len(chunk))
        bar.close()
        settings = replace(settings, size_px=size, count=len(names))
        write_json(tmp / RECORD, {
            "format": "dmdiff-pseudo-pairs", "model_run": str(model_run.resolve()),
            "dataset": str(dataset.resolve()), "images": None if images is None else str(Path(images).resolve()),
            "settings": to_dict(settings), "maps": has_maps, "gt_blur": has_targets,
            "names": names, "lens": pairs_lens_record(read_lens(dataset), lens_of),
            "provenance": provenance(config=to_dict(settings), seed=settings.seed, command="dmdiff pseudo",
                                     elapsed_s=round(time.perf_counter() - t0, 1)),
        })
    return out


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    parser.add_argument("--model", required=True, help="finished training run folder (stage 1)")
    parser.add_argument("--out", required=True, help="folder to write (dataset layout: gt_train/, lr_train/, ...)")
    parser.add_argument("--images", default=None,
                        help="folder of clean images (default: bundled dead leaves + training-photo crops)")
    parser.add_argument("--dataset", default=None, help="real dataset whose lens maps/size to use (default: the run's data)")
    defaults = PseudoConfig()
    parser.add_argument("--count", type=int, default=defaults.count,
                        help="number of bundled clean images (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the clean images and the noise (default %(default)s)")
    parser.add_argument("--noise-strength", type=float, default=defaults.noise_strength,
                        help="sensor-noise augmentation scale (default %(default)s)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: the dataset's sensor size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing pseudo pairs in --out (only a pseudo-pair folder that holds nothing else)")


def main(args) -> int:
    """Entry point of ``dmdiff pseudo`` (args: model, out, images, dataset, count, seed,
    noise_strength, size, overwrite)."""
    settings = merge(PseudoConfig(), {"count": args.count, "seed": args.seed, "noise_strength": args.noise_strength,
                                      "size_px": args.size}).validate()
    out = make_pseudo_pairs(args.model, args.out, dataset=args.dataset, images=args.images, settings=settings,
                            overwrite=args.overwrite)
    record = json.loads((out / RECORD).read_text())
    print(f"dmdiff pseudo: wrote {len(record['names'])} pseudo pairs ({record['settings']['size_px']} px) to {out}")
    return 0
