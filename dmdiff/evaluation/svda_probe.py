"""What SVDA does in a trained model, measured on a dataset split (docs/svda.md).

``python -m dmdiff.evaluation.svda_probe MODEL [MODEL ...] --data DATASET [--split val]`` loads
each model (a pipeline folder, a training run or a recipe run, :func:`dmdiff.runs.load_pipeline`),
takes the split's whole frames with their optics maps and prints, per model:

* **PSNR by field zone** at α = 1 (and at the model's recommended α when it has one): the zones of
  :mod:`dmdiff.evaluation.field`; models without SVDA get this row only;
* **modulation** per backbone part and block id (:mod:`dmdiff.model.introspect`): the distance of
  ``M`` from the identity ``‖M − I‖_F/√r`` and its spread over inputs ``‖M − M̄‖_F/√r``, on whole
  frames and on ``crop_px`` crops taken in each field zone (centre: the frame's middle; mid: centred
  half-way to the corner; edge: the top-left corner), the way training sees the field — each crop
  with its own maps (:func:`dmdiff.data.dataset.crop_maps`); global SVDA also gets the distance
  ``‖M_frame − M_crop‖_F/√r`` between a frame's one matrix and each of its zone crops' (training
  sees crops, inference whole frames); and how much the zone crops' optics-map features and SVDA
  embeddings differ (``rms ‖x − x̄‖ / rms ‖x‖``: 0 all alike, about 1 nothing shared);
* **attention** of each block query over the grid cells: entropy relative to uniform and the mass
  per zone over the zone's area;
* **sensitivity**: how much the α = 1 output changes, and its PSNR, when SVDA gets other maps —
  none (``maps missing``), the centre node's maps everywhere, the corner node's maps everywhere — on
  whole frames per zone, and on the edge crops given the centre crops' maps.

``--json FILE`` also writes everything as JSON. Choices belong on the validation split (default);
a test-split run is for reporting only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dmdiff.data.dataset import PairedFolderDataset, crop_maps, read_lens
from dmdiff.errors import DmdiffError
from dmdiff.evaluation.field import ZONES, field_angle_map, zone_masks
from dmdiff.model.introspect import (
    attention_summary,
    cell_zone_fractions,
    modulation,
    modulation_distance,
    modulation_spread,
    modulation_strength,
    sensitivity,
    uniform_maps,
    zone_means,
)
from dmdiff.optics.camera import MAP_CHANNELS
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import write_json
from dmdiff.runs import load_pipeline

__all__ = ["load_frames", "zone_crop_windows", "zone_crops", "probe_model", "format_probe", "format_summary", "main"]

PARTS = ("vae", "unet")


def load_frames(root: str | Path, split: str = "val") -> dict:
    """The whole frames of a split: ``lr``, ``gt`` ``(N, 3, H, W)``, ``maps`` ``(N, 7, G, G)`` and the
    zone masks ``{zone: bool (H, W)}`` of the dataset's lens (by radius without a ``lens.json``).

    Raises:
        DmdiffError: the split is missing, its frames differ in size, or the dataset has no maps.
    """
    dataset = PairedFolderDataset(root, split)
    if dataset.map_paths is None:
        raise DmdiffError(f"{root}: no maps/ folder — SVDA's optics input is needed to probe it")
    items = [dataset[i] for i in range(len(dataset))]
    sizes = {tuple(item["gt"].shape[-2:]) for item in items}
    if len(sizes) != 1:
        raise DmdiffError(f"{root}/{split}: frames of several sizes {sorted(sizes)}; the probe needs one")
    lens = read_lens(root)
    spec = MetalensSpec.from_dict(lens["spec"]) if lens and "spec" in lens else None
    height, width = sizes.pop()
    return {"lr": torch.stack([item["lr"] for item in items]), "gt": torch.stack([item["gt"] for item in items]),
            "maps": torch.stack([item["maps"] for item in items]),
            "zones": zone_masks(field_angle_map(height, width, spec))}


def zone_crop_windows(height: int, width: int, crop_px: int) -> dict[str, tuple[int, int, int, int]]:
    """One ``(y0, x0, h, w)`` crop window per field zone of an ``H × W`` frame: centre (the middle),
    mid (centred at a quarter of the height and width from the top-left, half-way to the corner in
    relative field radius), edge (the top-left corner)."""
    if crop_px > min(height, width):
        raise DmdiffError(f"crop_px {crop_px} is larger than the {height}×{width} frames")

    def at(cy: float, cx: float) -> tuple[int, int, int, int]:
        y0 = int(np.clip(round(cy - crop_px / 2), 0, height - crop_px))
        x0 = int(np.clip(round(cx - crop_px / 2), 0, width - crop_px))
        return y0, x0, crop_px, crop_px

    return {"centre": at(height / 2, width / 2), "mid": at(height / 4, width / 4), "edge": (0, 0, crop_px, crop_px)}


def zone_crops(frames: dict, crop_px: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{zone: {"lr", "gt", "maps"}}``: the frames' crops at :func:`zone_crop_windows`, each with its
    own maps resampled to the crop (:func:`~dmdiff.data.dataset.crop_maps`)."""
    height, width = frames["lr"].shape[-2:]
    out = {}
    for zone, (y0, x0, h, w) in zone_crop_windows(height, width, crop_px).items():
        maps = [torch.from_numpy(crop_maps(m.numpy(), (height, width), (y0, x0, h, w))) for m in frames["maps"]]
        out[zone] = {"lr": frames["lr"][..., y0:y0 + h, x0:x0 + w], "gt": frames["gt"][..., y0:y0 + h, x0:x0 + w],
                     "maps": torch.stack(maps)}
    return out


def _zone_psnr(model, frames: dict, alpha: float) -> dict[str, float]:
    """Whole-frame (``all``) and zone PSNR (dB; per image, then the mean over images) at ``alpha``."""
    y = model.restore(frames["lr"], frames["maps"], alpha=alpha).double().cpu()
    squared = (y - frames["gt"].double()).pow(2).mean(dim=1)                      # (N, H, W)
    masks = {"all": torch.ones(squared.shape[1:], dtype=torch.bool),
             **{zone: torch.as_tensor(mask) for zone, mask in frames["zones"].items()}}
    return {zone: float((-10 * torch.log10(squared[:, mask].mean(dim=1))).mean()) for zone, mask in masks.items()}


def _per_block(values: torch.Tensor) -> list[float]:
    """Mean over every axis but the block axis (1) of ``(B, n[, G, G])``: ``n`` floats."""
    return values.mean(dim=tuple(i for i in range(values.dim()) if i != 1)).tolist()


def _relative_spread(x: torch.Tensor) -> float:
    """``rms_i ‖x_i − x̄‖ / rms_i ‖x_i‖`` for ``(N, D)`` rows: 0 when all rows are equal, about 1 when
    they share nothing."""
    return float((x - x.mean(dim=0)).norm(dim=1).pow(2).mean().sqrt() / x.norm(dim=1).pow(2).mean().sqrt())


def _modulation_record(model, frames: dict, crops: dict, fractions: torch.Tensor) -> dict:
    """Distance from identity and spread per part and block: on frames, per zone, on zone crops."""
    svda_out, matrices = modulation(model, frames["lr"], frames["maps"])
    on_zone_crops = {zone: modulation(model, c["lr"], c["maps"]) for zone, c in crops.items()}
    crop_matrices = {zone: out[1] for zone, out in on_zone_crops.items()}
    features = torch.cat([out[0].features for out in on_zone_crops.values()]).double().cpu()
    record = {"crop_map_feature_spread": _relative_spread(features[:, :len(MAP_CHANNELS)].flatten(1))}
    for part in PARTS:
        m = matrices[part].double().cpu()
        on_crops = {z: crop_matrices[z][part].double().cpu() for z in crops}
        strength = modulation_strength(m)
        entry = {"frame_distance": _per_block(strength), "frame_spread": _per_block(modulation_spread(m)),
                 "crop_spread": _per_block(modulation_spread(torch.cat(list(on_crops.values())))),
                 "crop_zone_distance": {z: _per_block(modulation_strength(c)) for z, c in on_crops.items()}}
        if m.dim() == 6:                                                          # spatial: per cell
            entry["frame_zone_distance"] = zone_means(strength, fractions).mean(dim=0).tolist()   # (n, Z)
        else:                                                                     # global: one M per input
            entry["frame_to_crop"] = {z: _per_block(modulation_distance(m, c)) for z, c in on_crops.items()}
        embeddings = torch.cat([out[0].embeddings[part] for out in on_zone_crops.values()]).double().cpu()
        entry["crop_embedding_spread"] = _relative_spread(embeddings.flatten(1))
        lora = model.vae_lora if part == "vae" else model.unet_lora
        entry["blocks_used"] = sorted(set(lora.block_ids.values()))
        attention = attention_summary(svda_out.attention[part].cpu(), fractions)
        entry["attention_entropy"] = attention["entropy"].tolist()
        entry["attention_mass_per_area"] = attention["mass_per_area"].tolist()
        record[part] = entry
    return record


def probe_model(path: str | Path, frames: dict, crop_px: int = 64) -> dict:
    """Everything the module docstring lists, for one model, as a JSON-ready dict."""
    loaded = load_pipeline(path, device="cpu")
    model = loaded.pipeline.model
    record = {"model": str(path), "svda": model.svda is not None,
              "spatial": bool(model.config.svda_spatial), "recommended_alpha": model.config.recommended_alpha,
              "psnr_a1": _zone_psnr(model, frames, 1.0)}
    if model.config.recommended_alpha is not None:
        record["psnr_arec"] = _zone_psnr(model, frames, model.config.recommended_alpha)
    if model.svda is None:
        return record
    crops = zone_crops(frames, crop_px)
    fractions = cell_zone_fractions({z: torch.as_tensor(m) for z, m in frames["zones"].items()}, model.config.grid_size)
    record["modulation"] = _modulation_record(model, frames, crops, fractions)
    maps, G = frames["maps"], frames["maps"].shape[-1]
    alternatives = {"maps missing": None, "centre maps everywhere": uniform_maps(maps, (G // 2, G // 2)),
                    "corner maps everywhere": uniform_maps(maps, (0, 0))}
    record["sensitivity"] = sensitivity(model, frames["lr"], maps, alternatives, frames["zones"], target=frames["gt"])
    edge, centre = crops["edge"], crops["centre"]
    whole = {"crop": torch.ones(edge["lr"].shape[-2:], dtype=torch.bool)}
    record["crop_sensitivity"] = sensitivity(model, edge["lr"], edge["maps"], {"centre crop's maps": centre["maps"],
                                                                               "maps missing": None},
                                             whole, target=edge["gt"])
    return record


def _row(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    return " | ".join(fmt.format(v) for v in values)


def format_probe(record: dict) -> str:
    """A markdown rendering of :func:`probe_model`'s record (docs/svda.md uses these tables)."""
    zones = list(ZONES)
    scored = ["all", *zones]
    lines = [f"### {record['model']}", "", f"| α | PSNR {' | '.join(scored)} |", "|---|" + "---:|" * len(scored)]
    lines.append(f"| 1 | {_row([record['psnr_a1'][z] for z in scored], '{:.2f}')} |")
    if "psnr_arec" in record:
        lines.append(f"| {record['recommended_alpha']} | {_row([record['psnr_arec'][z] for z in scored], '{:.2f}')} |")
    if not record["svda"]:
        return "\n".join(lines) + "\n"
    for part in PARTS:
        entry = record["modulation"][part]
        crop_zones = [z for z in zones if z in entry["crop_zone_distance"]]
        to_crop = [z for z in zones if z in entry.get("frame_to_crop", {})]
        frame_zones = zones if "frame_zone_distance" in entry else []                 # spatial SVDA
        header = (["block", "frame ‖M−I‖", "frame spread", "crop spread"]
                  + [f"frame {z} ‖M−I‖" for z in frame_zones]
                  + [f"crop {z} ‖M−I‖" for z in crop_zones] + [f"‖M frame − M {z} crop‖" for z in to_crop]
                  + ["attention entropy"]
                  + [f"mass/area {z}" for z in zones])
        lines += ["", f"{part}: SVDA embedding spread over the zone crops {entry['crop_embedding_spread']:.4f} "
                  f"(their optics-map features': {record['modulation']['crop_map_feature_spread']:.4f}); "
                  "block ids with layers only", "", f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
        for k in entry["blocks_used"]:
            cells = [entry["frame_distance"][k], entry["frame_spread"][k], entry["crop_spread"][k],
                     *(entry["frame_zone_distance"][k][zones.index(z)] for z in frame_zones),
                     *(entry["crop_zone_distance"][z][k] for z in crop_zones),
                     *(entry["frame_to_crop"][z][k] for z in to_crop),
                     entry["attention_entropy"][k], *entry["attention_mass_per_area"][k]]
            lines.append(f"| {part} {k} | {_row(cells)} |")
    for title, table in (("frames", record["sensitivity"]), ("edge crops", record["crop_sensitivity"])):
        names = [n for n in table if n != "own"]
        zone_names = [z for z in [*zones, "crop"] if z in table[names[0]]]
        header = ["alternative"] + [f"{z} {q}" for z in zone_names for q in ("RMS change (8-bit)", "rel.", "ΔPSNR")]
        lines += ["", f"sensitivity ({title}):", "", f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
        for name in names:
            cells = [v for z in zone_names for v in (table[name][z]["rms_change"], table[name][z]["relative_change"],
                                                     table[name][z]["psnr_change"])]
            lines.append(f"| {name} | {_row(cells)} |")
    return "\n".join(lines) + "\n"


def format_summary(records: Sequence[dict]) -> str:
    """One markdown row per model: validation PSNR at α = 1 (whole frame and zones) and at its
    recommended α, then, for models with SVDA, the UNet's mean ‖M − I‖ over its blocks, the largest
    spread of any block of either part (frames or zone crops), the mean attention entropy, the block
    embeddings' spread over the zone crops, and the largest RMS output change and PSNR change (any
    alternative maps, any zone, frames or edge crops)."""
    zones = ["all", *ZONES]
    header = (["model"] + [f"α=1 {z}" for z in zones] + ["rec. α", "rec. α all", "UNet ‖M−I‖", "max spread",
                                                           "attention entropy", "embedding spread",
                                                           "max RMS change (8-bit)", "max ΔPSNR (abs., dB)"])
    lines = [f"| {' | '.join(header)} |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for r in records:
        cells = [f"{r['psnr_a1'][z]:.2f}" for z in zones]
        cells += ([f"{r['recommended_alpha']}", f"{r['psnr_arec']['all']:.2f}"] if "psnr_arec" in r else ["–", "–"])
        if r["svda"]:
            m = r["modulation"]
            changes = [s for table in (r["sensitivity"], r["crop_sensitivity"]) for name, zs in table.items()
                       if name != "own" for s in zs.values()]
            cells += [f"{np.mean(m['unet']['frame_distance']):.3f}",
                      f"{max(v for p in PARTS for key in ('frame_spread', 'crop_spread') for v in m[p][key]):.4f}",
                      f"{np.mean([v for p in PARTS for v in m[p]['attention_entropy']]):.4f}",
                      f"{max(m[p]['crop_embedding_spread'] for p in PARTS):.4f}",
                      f"{max(s['rms_change'] for s in changes):.3f}",
                      f"{max(abs(s['psnr_change']) for s in changes):.3f}"]
        else:
            cells += ["no SVDA"] + ["–"] * 5
        lines.append(f"| {r['model']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmdiff.evaluation.svda_probe", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="pipeline folders, training runs or recipe runs")
    parser.add_argument("--data", required=True, help="dataset folder (dmdiff simulate layout, with maps/)")
    parser.add_argument("--split", default="val", choices=("val", "test"), help="choices on val; test only to report")
    parser.add_argument("--crop-px", type=int, default=64, help="side of the per-zone crops (the training crop)")
    parser.add_argument("--json", default=None, help="also write the records here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        frames = load_frames(args.data, args.split)
        records = []
        for path in args.models:
            records.append(probe_model(path, frames, args.crop_px))
            print(format_probe(records[-1]), flush=True)
    except DmdiffError as err:
        print(f"svda_probe: {err}", file=sys.stderr)
        return 2
    if len(records) > 1:
        print(format_summary(records))
    if args.json:
        write_json(args.json, {"data": str(args.data), "split": args.split, "crop_px": args.crop_px, "models": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
