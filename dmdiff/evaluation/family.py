"""The lens-family study's views (notebook 06): the lenses, their maps, scores per held-out lens,
and whether the model reads the maps it is given.

A lens-family dataset (:mod:`dmdiff.data.family`) records its lenses in ``lens.json``
(``lenses``) and each image's lens (``images[name].lens``); every test crop is captured once by
each held-out lens. :func:`maps_swap` restores each test capture three times — with its own maps,
with the maps of the same crop under another held-out lens, and with no maps at all — so the PSNR
it loses when told the wrong lens is the part of the restoration that depends on what SVDA is
told (zero for a model without SVDA).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from dmdiff.data.dataset import PairedFolderDataset, read_lens
from dmdiff.errors import DmdiffError
from dmdiff.metrics import psnr
from dmdiff.optics.camera import MAP_CHANNELS
from dmdiff.optics.sensor import quantize

__all__ = ["family_lenses", "format_lens_table", "plot_family_maps", "format_per_lens", "maps_swap"]


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


def maps_swap(pipeline, data: str | Path, alpha: float = 1.0, progress: bool = True) -> dict:
    """PSNR of each test capture restored with its own maps, another held-out lens's maps of the same
    crop, and no maps (module docstring).

    Args:
        pipeline: a :class:`~dmdiff.model.pipeline.DMDiffPipeline`.
        data: a lens-family dataset with at least two held-out lenses.
        alpha: the decoding α.

    Returns:
        ``{"alpha", "images", "own", "swapped", "none"}``: mean RGB PSNR (dB) over the test frames
        of each variant, and ``"per_image"``: ``{name: {"own", "swapped", "none"}}``.

    Raises:
        DmdiffError: not a lens-family dataset, or fewer than two held-out lenses.
    """
    data = Path(data)
    meta = family_lenses(data)
    held_out = sorted(n for n, lens in meta["lenses"].items() if lens["held_out"])
    if len(held_out) < 2:
        raise DmdiffError(f"{data}: maps_swap needs two held-out lenses to swap their maps, the family has {len(held_out)}")
    test = PairedFolderDataset(data, "test")
    if test.map_paths is None:
        raise DmdiffError(f"{data}: the test split has no maps to swap")
    index = {name: i for i, name in enumerate(test.names)}
    per_image = {}
    for name in tqdm(test.names, desc="maps swapped", unit="img", disable=not progress):
        lens = meta["images"][name]["lens"]
        other = held_out[(held_out.index(lens) + 1) % len(held_out)]
        twin = name[: -len(lens)] + other                  # the same crop under the other lens
        if twin not in index:
            continue
        item = test[index[name]]
        own, swapped = item["maps"], test[index[twin]]["maps"]
        target = item["gt"].permute(1, 2, 0).numpy()
        scores = {}
        for variant, maps in (("own", own), ("swapped", swapped), ("none", None)):
            out = pipeline(item["lr"], maps, alpha).images[0]
            scores[variant] = psnr(quantize(out, 8), target)       # 8-bit, as dmdiff evaluate scores
        per_image[name] = scores
    if not per_image:
        raise DmdiffError(f"{data}: no test crop is captured by two held-out lenses")
    means = {v: float(np.mean([s[v] for s in per_image.values()])) for v in ("own", "swapped", "none")}
    return {"alpha": float(alpha), "images": len(per_image), **means, "per_image": per_image}
