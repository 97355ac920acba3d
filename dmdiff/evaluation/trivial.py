"""The untrained counterpart of a trained model, a trivial baseline of ``dmdiff evaluate``.

Three rows of the report make the network's own contribution one subtraction away: the capture
itself (``input``), the colour anchor alone (``color_anchor``: e.g. ``G_σ(RL_n(x))``, what an anchored
model adds to its own high-pass output, :meth:`dmdiff.model.dmdiff.DMDiff.input_anchor`), and
``untrained``: the same model — same config, same backbone preset, same anchor and anchor PSF — with
its adapters as they start training (:func:`untrained_pipeline`). Every LoRA ``B`` matrix and the
path modulation start at zero (:mod:`dmdiff.model.lora`), so whatever SVDA computes, the UNet and
VAE are the backbone's own: the output is the base backbone's one step, anchored. For the tiny
preset the backbone is the shipped one (``dmdiff/assets/tiny_backbone``), not the pipeline's
embedded copy, whose ``conv_in`` was trained.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import DMDiff
from dmdiff.model.pipeline import DMDiffPipeline

__all__ = ["untrained_pipeline"]


def untrained_pipeline(model: DMDiff, model_path: str | None = None) -> DMDiffPipeline:
    """A pipeline of ``model``'s config with untrained adapters, on its device and dtype.

    Args:
        model: the trained model (its config, device, dtype and anchor PSF are used).
        model_path: ``sd-turbo`` only: where SD-Turbo is (default: the config's ``model_path``, which
            for ``tiny`` names a saved tiny backbone, None: the shipped one).
    """
    config = replace(model.config, recommended_alpha=None)
    path = (model_path or config.model_path) if config.preset == "sd-turbo" else config.model_path
    backbone = load_backbone(config.preset, path, dtype=model.dtype, device=model.device, seed=config.seed)
    fresh = DMDiff(config, backbone)
    if model.anchor_psf is not None:
        fresh.set_anchor_psf(model.anchor_psf.detach().cpu().to(torch.float64).numpy())
    return DMDiffPipeline.from_model(fresh)
