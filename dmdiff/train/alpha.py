"""The recommended α of a trained model, chosen on the validation split (never the test split).

:func:`alpha_sweep` restores every validation pair once (both paths' latents cached) and re-decodes
them along a grid of α, scoring each against the scene. :func:`recommend_alpha` then takes the
**largest** α of ``[0, 1]`` whose mean PSNR is within ``tolerance_db`` of the best α's: as much of
the perceptual path as costs (almost) no fidelity — the operating point the method is meant for
(perception moves a lot at nearly constant fidelity). :func:`set_recommended_alpha` stores it in
the pipeline's config, where ``dmdiff restore`` and ``dmdiff evaluate`` find it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.data.dataset import LensGrids, PairedFolderDataset
from dmdiff.errors import DmdiffError
from dmdiff.metrics import psnr
from dmdiff.model.pipeline import CONFIG_FILE, DMDiffPipeline
from dmdiff.outputs import write_json

__all__ = ["ALPHA_GRID", "alpha_sweep", "recommend_alpha", "set_recommended_alpha"]

#: The α values scored: 0, 0.1, …, 1.
ALPHA_GRID = tuple(round(0.1 * k, 1) for k in range(11))


@torch.no_grad()
def alpha_sweep(pipeline_dir: str | Path, data: str | Path, split: str = "val",
                alphas: tuple[float, ...] = ALPHA_GRID, progress: bool = True) -> dict:
    """Mean PSNR (dB, 8-bit RGB outputs) against the GT of the ``split`` pairs of ``data`` at each α
    (a deconvolved colour anchor uses each pair's own lens: ``DMDiff.use_capture_lens``).

    Returns:
        ``{"split", "images", "alphas": [...], "psnr": [...] (same order), "psnr_input"}``.

    Raises:
        DmdiffError: the split is missing or empty, or the pipeline cannot be loaded.
    """
    pipe = DMDiffPipeline.from_pretrained(pipeline_dir)
    pairs = PairedFolderDataset(data, split)
    grids = LensGrids.of_dataset(data)
    scores = np.zeros((len(pairs), len(alphas)))
    inputs = []
    for i in tqdm(range(len(pairs)), desc=f"α sweep ({split})", unit="img", disable=not progress):
        pair = pairs[i]
        gt = np.round(pair["gt"].permute(1, 2, 0).numpy() * 255) / 255
        pipe.model.use_capture_lens(None if grids is None else grids(pair["name"]))
        out = pipe(pair["lr"], pair.get("maps"), alpha=alphas[0], return_latents=True)
        images = [out.images[0]] + [pipe.decode(out, a)[0] for a in alphas[1:]]
        scores[i] = [psnr(np.round(im * 255) / 255, gt) for im in images]
        inputs.append(psnr(pair["lr"].permute(1, 2, 0).numpy(), gt))
    return {"split": split, "images": len(pairs), "alphas": list(alphas), "psnr": scores.mean(axis=0).tolist(),
            "psnr_input": float(np.mean(inputs))}


def recommend_alpha(sweep: dict, tolerance_db: float) -> float:
    """The largest α of ``sweep`` (at most 1) whose PSNR is within ``tolerance_db`` of the best one."""
    alphas, scores = np.asarray(sweep["alphas"]), np.asarray(sweep["psnr"])
    scores = np.where(alphas <= 1.0, scores, -np.inf)
    return float(alphas[scores >= scores.max() - tolerance_db].max())


def set_recommended_alpha(pipeline_dir: str | Path, alpha: float, sweep: dict) -> None:
    """Record ``alpha`` (and the sweep it came from) in the pipeline's ``dmdiff_config.json``,
    atomically; the rest of the file is kept.

    Raises:
        DmdiffError: the folder holds no readable pipeline config.
    """
    path = Path(pipeline_dir) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DmdiffError(f"{path}: cannot read the pipeline config ({e})") from None
    meta["config"]["recommended_alpha"] = float(alpha)
    meta["alpha_choice"] = sweep
    write_json(path, meta)
