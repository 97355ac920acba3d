"""The lens-family study's views (notebook 06): the lenses, their maps, scores per held-out lens,
and whether the model reads the maps it is given.

A lens-family dataset (:mod:`dmdiff.data.family`) records its lenses in ``lens.json``
(``lenses``) and each image's lens (``images[name].lens``); every test crop is captured once by
each held-out lens. :func:`maps_swap` restores each capture of a split three times — with its own
maps, with another lens's maps (on the test split those of the same crop under another held-out
lens) and with no maps at all — so the PSNR it loses when told the wrong lens is the part of the
restoration that depends on what SVDA is told (zero for a model without SVDA). Run it from the
shell as ``dmdiff maps-swap DATA MODEL… --split val``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.data.dataset import LensGrids, PairedFolderDataset, read_lens
from dmdiff.errors import DmdiffError
from dmdiff.metrics import psnr
from dmdiff.optics.camera import MAP_CHANNELS
from dmdiff.optics.sensor import quantize
from dmdiff.runs import load_pipeline

__all__ = ["family_lenses", "format_lens_table", "plot_family_maps", "format_per_lens", "swap_partners", "maps_swap"]


def family_lenses(data: str | Path) -> dict:
    """The ``lens.json`` of a lens-family dataset (:func:`read_lens`).

    Raises:
        DmdiffError: ``data`` is not a lens-family dataset (no ``lenses`` in its ``lens.json``).
    """
    meta = read_lens(data)
    if not isinstance(meta, dict) or "lenses" not in meta:
        raise DmdiffError(f"{data} is not a lens-family dataset (its lens.json lists no lenses); simulate one "
                          "with a `family` section (configs/lens-family.yaml)")
    return meta


def format_lens_table(meta: Mapping) -> str:
    """A markdown table of the family's lenses: role, aperture D (mm), focal length f (mm), f-number,
    design wavelength λ0 (nm), sensor offset (µm) and the number of images of each split."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in meta["images"].values():
        counts[entry["lens"]][entry["split"]] += 1
    lines = ["| lens | role | D (mm) | f (mm) | f-number | λ0 (nm) | sensor offset (µm) | train / val / test images |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, lens in meta["lenses"].items():
        s, n = lens["spec"], counts[name]
        lines.append(f"| {name} | {'held out' if lens['held_out'] else 'training'} | {s['aperture_diameter_m'] * 1e3:.3f} | "
                     f"{s['focal_length_m'] * 1e3:.3f} | {s['focal_length_m'] / s['aperture_diameter_m']:.2f} | "
                     f"{s['design_wavelength_m'] * 1e9:.0f} | {s.get('sensor_offset_m', 0.0) * 1e6:+.1f} | "
                     f"{n['train']} / {n['val']} / {n['test']} |")
    return "\n".join(lines)


def _lens_maps(data: Path, meta: Mapping) -> dict[str, np.ndarray]:
    """One image's maps ``(7, G, G)`` per lens (the PSF-width channels are the lens's own)."""
    found = {}
    for name, entry in sorted(meta["images"].items()):
        found.setdefault(entry["lens"], np.load(data / "maps" / f"{name}.npy", allow_pickle=False))
    return {lens: found[lens] for lens in meta["lenses"] if lens in found}


def plot_family_maps(data: str | Path, channel: str = "ee80"):
    """A figure: per lens (rows) the PSF width maps of R, G and B (columns), ``channel`` ``"ee80"``
    (80 % encircled-energy radius) or ``"fwhm"``, in sensor pixels on one colour scale."""
    import matplotlib.pyplot as plt

    data = Path(data)
    meta = family_lenses(data)
    maps = _lens_maps(data, meta)
    index = [MAP_CHANNELS.index(f"{channel}_{c}") for c in "rgb"]
    values = np.stack([m[index] for m in maps.values()])
    fig, axes = plt.subplots(len(maps), 3, figsize=(6.6, 2.0 * len(maps)), squeeze=False, constrained_layout=True)
    for row, (lens, m) in zip(axes, maps.items()):
        role = "held out" if meta["lenses"][lens]["held_out"] else "training"
        for ax, c, i in zip(row, "RGB", index):
            im = ax.imshow(m[i], vmin=values.min(), vmax=values.max(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{lens} ({role}) · {c}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"{channel.upper()} width (px)")
    return fig


def format_per_lens(metrics: Mapping, meta: Mapping, methods: Sequence[str], key: str = "psnr") -> str:
    """A markdown table: the mean ``key`` of each method (rows) on each held-out lens's test frames
    (columns), from an evaluation's ``per_image`` record."""
    lenses = sorted({meta["images"][r["name"]]["lens"] for r in metrics["per_image"]})
    lines = ["| method | " + " | ".join(lenses) + " |", "|---" * (len(lenses) + 1) + "|"]
    for method in methods:
        cells = []
        for lens in lenses:
            scores = [r["methods"][method][key] for r in metrics["per_image"]
                      if meta["images"][r["name"]]["lens"] == lens and method in r["methods"]]
            cells.append(f"{np.mean(scores):.2f}" if scores else "–")
        lines.append(f"| {metrics['labels'].get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def swap_partners(names: Sequence[str], meta: Mapping) -> dict[str, str]:
    """For each frame of a split, the frame whose maps it is given in :func:`maps_swap`: the same
    crop under another lens where the split has one (test crops are named ``<crop>_<lens>``, one per
    held-out lens), else the next frame in name order, cyclically, taken by another lens (a whole
    frame's maps depend only on its lens). Frames with no other lens in the split are left out."""
    lens_of = {name: meta["images"][name]["lens"] for name in names}
    partners = {}
    for i, name in enumerate(names):
        lens = lens_of[name]
        crop = name[: -len(lens)] if name.endswith(lens) else None
        others = [n for n in [*names[i + 1:], *names[:i]] if lens_of[n] != lens]
        twins = [n for n in others if crop is not None and n == crop + lens_of[n]]
        if others:
            partners[name] = (twins or others)[0]
    return partners


def maps_swap(pipeline, data: str | Path, alpha: float = 1.0, split: str = "test", progress: bool = True) -> dict:
    """PSNR of each capture of a split restored with its own maps, another lens's maps
    (:func:`swap_partners`: on the test split the same crop under another held-out lens) and no
    maps (module docstring); a deconvolved colour anchor uses the capture's own lens in all three,
    so only what SVDA is told changes.

    Args:
        pipeline: a :class:`~dmdiff.model.pipeline.DMDiffPipeline`.
        data: a lens-family dataset.
        alpha: the decoding α.
        split: ``"test"`` (held-out lenses: report) or ``"val"`` (training lenses: where choices are made).

    Returns:
        ``{"alpha", "split", "images", "own", "swapped", "none"}``: mean RGB PSNR (dB, 8-bit) over the
        frames of each variant, and ``"per_image"``: ``{name: {"own", "swapped", "none", "swapped_with"}}``.

    Raises:
        DmdiffError: not a lens-family dataset, or a split without maps or without two lenses.
    """
    data = Path(data)
    meta = family_lenses(data)
    frames = PairedFolderDataset(data, split)
    if frames.map_paths is None:
        raise DmdiffError(f"{data}: the {split} split has no maps to swap")
    partners = swap_partners(frames.names, meta)
    if not partners:
        raise DmdiffError(f"{data}: every frame of the {split} split is captured by one lens; there is no other lens's maps to give")
    items = {name: frames[i] for i, name in enumerate(frames.names)}     # each frame read once
    grids = LensGrids(meta)
    per_image = {}
    for name, partner in tqdm(partners.items(), desc="maps swapped", unit="img", disable=not progress):
        item = items[name]
        pipeline.model.use_capture_lens(grids(name))      # the anchor deconvolves with the capture's true lens
        target = item["gt"].permute(1, 2, 0).numpy()
        scores = {}
        for variant, maps in (("own", item["maps"]), ("swapped", items[partner]["maps"]), ("none", None)):
            out = pipeline(item["lr"], maps, alpha).images[0]
            scores[variant] = psnr(quantize(out, 8), target)       # 8-bit, as dmdiff evaluate scores
        per_image[name] = {**scores, "swapped_with": partner}
    means = {v: float(np.mean([s[v] for s in per_image.values()])) for v in ("own", "swapped", "none")}
    return {"alpha": float(alpha), "split": split, "images": len(per_image), **means, "per_image": per_image}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dmdiff maps-swap``."""
    parser.add_argument("data", help="lens-family dataset folder (dmdiff simulate with a family)")
    parser.add_argument("models", nargs="+", help="pipeline folders, training runs or recipe runs")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="choices on val; test only to report")
    parser.add_argument("--alpha", type=float, default=1.0, help="decoding α (default 1: the positive path)")


def main(args: argparse.Namespace) -> int:
    """``dmdiff maps-swap DATA MODEL… [--split val]``: :func:`maps_swap` of each model, one line each
    (on one torch thread, as the figures in docs/svda.md were measured)."""
    family_lenses(args.data)                               # a wrong dataset fails before any model loads
    torch.set_num_threads(1)
    print(f"{'model':60s} {'own':>8s} {'another':>8s} {'none':>8s} {'own − another':>14s}  (dB, {args.split} split, α = {args.alpha:g})")
    for model in args.models:
        r = maps_swap(load_pipeline(model).pipeline, args.data, args.alpha, args.split, progress=False)
        print(f"{model:60s} {r['own']:8.3f} {r['swapped']:8.3f} {r['none']:8.3f} {r['own'] - r['swapped']:+14.3f}", flush=True)
    return 0
