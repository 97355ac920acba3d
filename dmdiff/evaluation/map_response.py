"""How a model's output answers its optics maps: restores with the maps scaled, scored per field zone.

SVDA reads the optics maps (PSF widths and noise per grid cell) beside the capture. Restoring the
same capture with the maps multiplied by a factor — ×0 (every width and the noise zero), ×0.5 (a
sharper, cleaner lens than the real one), ×2 (a blurrier, noisier one) — and nothing else changed
shows how much of the output the maps decide. :func:`scaled_map_response` scores each output
against the output with the true maps (×1: mean ``|Δ|``) and against the ground truth (PSNR), over
the whole frame and per field zone (:mod:`dmdiff.evaluation.field`). :func:`field_scores` scores the
capture, the model with its maps and the model with the maps zeroed over several pairs, for the
per-zone gains (:func:`dmdiff.evaluation.field.zone_gains`) and the gain map. Images are numpy
``(H, W, 3)`` sRGB in ``[0, 1]``; maps ``(7, G, G)`` in ``MAP_CHANNELS`` order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from dmdiff.evaluation.field import FieldScores, field_angle_map, zone_masks
from dmdiff.metrics import psnr
from dmdiff.model.dmdiff import DMDiff
from dmdiff.optics.spec import MetalensSpec

__all__ = ["MAP_FACTORS", "CAPTURE", "WITH_MAPS", "MAPS_ZEROED", "restore_with_maps", "scaled_map_response",
           "format_response_table", "field_scores"]

#: The map scale factors of notebook 02 (×1: the true maps, the reference).
MAP_FACTORS = (0.0, 0.5, 1.0, 2.0)
#: Method names of :func:`field_scores`.
CAPTURE, WITH_MAPS, MAPS_ZEROED = "capture", "model, true maps", "model, maps × 0"


def restore_with_maps(model: DMDiff, image: np.ndarray, maps: np.ndarray | None, alpha: float = 1.0) -> np.ndarray:
    """``model.restore`` of one capture ``(H, W, 3)`` with ``maps`` ``(7, G, G)`` (None: none given)
    at ``alpha``: the restored ``(H, W, 3)`` float32 image."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    m = None if maps is None else torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return model.restore(x, m, alpha=alpha)[0].permute(1, 2, 0).float().cpu().numpy()


def scaled_map_response(model: DMDiff, pair: Mapping, spec: MetalensSpec | None,
                        factors: Sequence[float] = MAP_FACTORS, alpha: float = 1.0) -> dict:
    """Restore ``pair["lr"]`` with ``pair["maps"] × f`` for each factor and score the outputs.

    Args:
        pair: ``lr`` and ``gt`` ``(H, W, 3)``, ``maps`` ``(7, G, G)``.
        spec: the lens, for the field zones (None: zones by radius).
        factors: map scale factors; 1 is added when missing (the reference).

    Returns:
        ``{"outputs": {f: image}, "rows": {f: {"mean_abs_delta", "psnr_db", "psnr_change_db",
        "zones": {zone: {"mean_abs_delta", "psnr_db"}}}}}``: mean ``|output_f − output_1|`` over
        pixels and channels (sRGB, 0–1), PSNR against ``gt`` in dB and its change from ×1.
    """
    factors = sorted(set(float(f) for f in factors) | {1.0})
    outputs = {f: restore_with_maps(model, pair["lr"], np.asarray(pair["maps"]) * f, alpha) for f in factors}
    gt = np.asarray(pair["gt"], dtype=np.float32)
    masks = zone_masks(field_angle_map(*gt.shape[:2], spec))
    reference = outputs[1.0]
    rows = {}
    for f, output in outputs.items():
        delta = np.abs(output - reference).mean(axis=-1)
        error = ((output.astype(np.float64) - gt) ** 2).mean(axis=-1)
        rows[f] = {"mean_abs_delta": float(delta.mean()), "psnr_db": float(psnr(output, gt)),
                   "zones": {zone: {"mean_abs_delta": float(delta[mask].mean()),
                                    "psnr_db": float(10 * np.log10(1 / max(error[mask].mean(), 1e-12)))}
                             for zone, mask in masks.items()}}
    for row in rows.values():
        row["psnr_change_db"] = row["psnr_db"] - rows[1.0]["psnr_db"]
    return {"outputs": outputs, "rows": rows}


def format_response_table(rows: Mapping[float, Mapping]) -> str:
    """A markdown table of :func:`scaled_map_response`'s rows: per factor the mean ``|Δ|`` against
    ×1 and the PSNR change, over the frame and per zone."""
    zones = list(next(iter(rows.values()))["zones"])
    header = ("| maps × | mean \\|Δ\\| | " + " | ".join(f"\\|Δ\\| {z}" for z in zones) + " | PSNR (dB) | ΔPSNR | "
              + " | ".join(f"ΔPSNR {z}" for z in zones) + " |")
    lines = [header, "|---" * (4 + 2 * len(zones)) + "|"]
    for f, row in rows.items():
        zone_change = [row["zones"][z]["psnr_db"] - rows[1.0]["zones"][z]["psnr_db"] for z in zones]
        lines.append(f"| {f:g} | {row['mean_abs_delta']:.2e} | "
                     + " | ".join(f"{row['zones'][z]['mean_abs_delta']:.2e}" for z in zones)
                     + f" | {row['psnr_db']:.2f} | {row['psnr_change_db']:+.3f} | "
                     + " | ".join(f"{c:+.3f}" for c in zone_change) + " |")
    return "\n".join(lines) + "\n"


def field_scores(model: DMDiff, pairs: Sequence[Mapping], spec: MetalensSpec | None, alpha: float = 1.0,
                 cells: int = 8) -> FieldScores:
    """Zone scores and block errors of the capture (:data:`CAPTURE`), the model with each pair's
    maps (:data:`WITH_MAPS`) and with the maps zeroed (:data:`MAPS_ZEROED`) against the ground truth,
    over ``pairs`` (``name``, ``lr``, ``gt``, ``maps``); ``cells`` blocks per side of the gain map."""
    scores = FieldScores(spec, cells=cells)
    for pair in pairs:
        maps = np.asarray(pair["maps"])
        scores.add(pair["name"], CAPTURE, pair["lr"], pair["gt"])
        scores.add(pair["name"], WITH_MAPS, restore_with_maps(model, pair["lr"], maps, alpha), pair["gt"])
        scores.add(pair["name"], MAPS_ZEROED, restore_with_maps(model, pair["lr"], maps * 0, alpha), pair["gt"])
    return scores
