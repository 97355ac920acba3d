"""Looking inside a DMDiff model: its SVDA attention and the LoRA modulation it produces.

Used by notebook 02 to show how the modulation varies across the field and with the degradation
maps, and by :mod:`dmdiff.evaluation.svda_probe` to measure what SVDA does after training
(docs/svda.md). Functions that run the model do so without gradients and leave its train/eval
mode as it was.

Units: modulation distances are relative Frobenius norms (``/ ‖I‖_F = √r``, dimensionless; 1 is a
change the size of the identity); attention entropies are fractions of the uniform distribution's;
output changes are RMS 8-bit levels or ratios; PSNR in dB. Field zones come in as pixel masks
(``dmdiff.evaluation.field.zone_masks``), so this module needs no lens.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from dmdiff.device import eval_mode
from dmdiff.model.dmdiff import DMDiff


@torch.no_grad()
def modulation(model: DMDiff, image: torch.Tensor, maps: torch.Tensor | None = None):
    """SVDA output and the modulation matrices per backbone part for a batch.

    Args:
        model: a DMDiff model built with ``svda=True``.
        image: ``(B, 3, H, W)`` captures in ``[0, 1]``.
        maps: ``(B, 7, G', G')`` optics maps or None.

    Returns:
        ``(svda_output, {"vae": M, "unet": M})`` with ``M`` of shape ``(B, n_blocks, r, r)`` (global
        SVDA) or ``(B, n_blocks, r, r, G, G)`` (spatial SVDA).
    """
    if model.svda is None:
        raise ValueError("this model has no SVDA (config.svda=False): there is no modulation to show")
    with eval_mode(model):
        image = image.to(model.device, model.dtype)
        out = model.svda(image, None if maps is None else maps.to(model.device, model.dtype))
        matrices = {part: model.mlp[part](out.embeddings[part]) for part in ("vae", "unet")}
    return out, matrices


def modulation_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a − b‖_F / √r`` between modulation matrices (broadcasting), relative to the identity's norm.

    ``(B, n, r, r)`` → ``(B, n)``; ``(B, n, r, r, G, G)`` → ``(B, n, G, G)``.
    """
    return (a - b).pow(2).sum(dim=(2, 3)).sqrt() / a.shape[2] ** 0.5


def modulation_strength(matrices: torch.Tensor) -> torch.Tensor:
    """How far each modulation is from plain LoRA: ``‖M − I‖_F / ‖I‖_F`` (:func:`modulation_distance`
    to the identity).

    ``(B, n, r, r)`` → ``(B, n)``; ``(B, n, r, r, G, G)`` → ``(B, n, G, G)``.
    """
    r = matrices.shape[2]
    eye = torch.eye(r, device=matrices.device, dtype=matrices.dtype)
    if matrices.dim() == 6:
        eye = eye[:, :, None, None]
    return modulation_distance(matrices, eye)


def attention_maps(attention: torch.Tensor, grid_size: int, query_cell: int | None = None) -> torch.Tensor:
    """Head-averaged attention of each block query over the grid: ``(n_blocks, G, G)`` for sample 0.

    ``attention`` is an :class:`~dmdiff.model.svda.SVDAOutput` attention tensor: ``(B, heads, n, G²)``
    (global) or ``(B, heads, n, G², G²)`` (spatial; ``query_cell`` picks the query cell, row-major,
    default the centre).
    """
    a = attention[0].mean(0)
    if a.dim() == 3:
        a = a[:, (grid_size * grid_size) // 2 if query_cell is None else query_cell]
    return a.reshape(-1, grid_size, grid_size)


def block_modulation(model: DMDiff, image: torch.Tensor, maps: torch.Tensor | None = None,
                     part: str = "unet") -> torch.Tensor:
    """How strongly SVDA modulates each LoRA block of ``part`` (``"unet"`` or ``"vae"``) for one
    capture: ``‖M − I‖_F / ‖I‖_F`` per block, ``(n_blocks,)`` (spatial SVDA: the mean over the grid).

    ``image`` ``(1, 3, H, W)`` and ``maps`` ``(1, 7, G', G')`` or None as for :func:`modulation`.
    """
    _, matrices = modulation(model, image, maps)
    strength = modulation_strength(matrices[part])[0]
    return strength.flatten(1).mean(1) if strength.dim() == 3 else strength


def modulation_spread(matrices: torch.Tensor) -> torch.Tensor:
    """The input-dependent part of the modulation: ``‖M − M̄‖_F / ‖I‖_F`` per block.

    ``M̄`` is the mean of each block's matrices over the batch (and, spatial, over the grid cells):
    what a constant matrix — which the LoRA ``A`` weights can absorb, so plain LoRA can express it —
    would give. Only the spread around it carries information about the input. Shapes as
    :func:`modulation_strength`: ``(B, n, r, r)`` → ``(B, n)``; ``(B, n, r, r, G, G)`` → ``(B, n, G, G)``.
    """
    mean_dims = (0, 4, 5) if matrices.dim() == 6 else (0,)
    return modulation_distance(matrices, matrices.mean(dim=mean_dims, keepdim=True))


def cell_zone_fractions(zones: Mapping[str, torch.Tensor], grid_size: int) -> torch.Tensor:
    """The share of each grid cell's pixels that lie in each field zone: ``(G, G, Z)``.

    Args:
        zones: ``{zone: bool (H, W)}`` masks of one frame (e.g. ``dmdiff.evaluation.field.zone_masks``),
            covering every pixel exactly once; ``Z`` zones in the mapping's order.
        grid_size: G; pixel row ``y`` belongs to cell row ``floor(y·G/H)`` (same for columns).

    Returns:
        float64 ``(G, G, Z)``, summing to 1 over the last axis.
    """
    masks = torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in zones.values()], dim=-1)  # (H, W, Z)
    H, W, Z = masks.shape
    rows = torch.arange(H) * grid_size // H
    cols = torch.arange(W) * grid_size // W
    cell = (rows[:, None] * grid_size + cols[None, :]).flatten()
    sums = torch.zeros(grid_size * grid_size, Z, dtype=torch.float64).index_add_(0, cell, masks.reshape(-1, Z))
    return (sums / sums.sum(dim=-1, keepdim=True)).reshape(grid_size, grid_size, Z)


def zone_means(values: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Per-zone mean of a per-cell quantity ``(..., G, G)`` → ``(..., Z)``, each cell weighted by its
    pixels in the zone (``fractions`` from :func:`cell_zone_fractions`): the pixel average of the
    quantity over the zone when every pixel takes its cell's value."""
    weights = fractions.to(values.dtype)
    return torch.einsum("...gh,ghz->...z", values, weights) / weights.sum(dim=(0, 1))


def attention_summary(attention: torch.Tensor, fractions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where each block query looks, averaged over the batch and heads (and, spatial, query cells).

    Args:
        attention: an :class:`~dmdiff.model.svda.SVDAOutput` attention tensor, ``(B, heads, n, G²)``
            or ``(B, heads, n, G², G²)`` (cells row-major).
        fractions: ``(G, G, Z)`` from :func:`cell_zone_fractions`.

    Returns:
        ``entropy``: ``(n,)`` the attention's entropy over the cells divided by ``log(G²)`` (1: uniform,
        0: one cell), the mean of the per-query entropies; ``mass``: ``(n, Z)`` the share of the
        attention on each zone's pixels (each cell's weight spread evenly over its pixels), summing to 1;
        ``mass_per_area``: ``(n, Z)`` the mass divided by the zone's share of the grid (the mean of its
        cell fractions: its share of the frame's pixels up to the cells' one-pixel size differences),
        so 1 everywhere for uniform attention, above 1 where the query looks more than the zone's
        size warrants.
    """
    a = attention.double()
    n_cells = a.shape[-1]
    entropy = -(a * a.clamp_min(1e-30).log()).sum(dim=-1) / math.log(n_cells)       # (B, h, n[, G²])
    entropy = entropy.movedim(2, 0).reshape(a.shape[2], -1).mean(dim=1)
    weights = a.movedim(2, 0).reshape(a.shape[2], -1, n_cells).mean(dim=1)          # (n, G²)
    per_cell = fractions.reshape(n_cells, -1)                                       # (G², Z)
    mass = weights @ per_cell
    area = per_cell.mean(dim=0)
    return {"entropy": entropy, "mass": mass, "mass_per_area": mass / area}


def uniform_maps(maps: torch.Tensor, node: tuple[int, int]) -> torch.Tensor:
    """Optics maps ``(B, 7, G, G)`` with every node given the value of node ``(i, j)``: the whole field
    described as if it had the PSF found there (e.g. the centre node, or a corner)."""
    return maps[:, :, node[0]:node[0] + 1, node[1]:node[1] + 1].expand_as(maps).clone()


@torch.no_grad()
def sensitivity(model: DMDiff, image: torch.Tensor, maps: torch.Tensor,
                alternatives: Mapping[str, torch.Tensor | None], zones: Mapping[str, torch.Tensor],
                alpha: float = 1.0, target: torch.Tensor | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """How much the restoration changes when SVDA is told something else about the optics.

    Restores ``image`` with its own ``maps`` and with each alternative (other maps, or None: "maps
    missing", the real-capture input) and compares, per field zone.

    Args:
        model: a DMDiff model with SVDA.
        image: ``(B, 3, H, W)`` captures in ``[0, 1]``; maps ``(B, 7, G', G')`` their optics maps.
        alternatives: ``{name: maps or None}`` to restore with instead.
        zones: ``{zone: bool (H, W)}`` masks of the frame.
        alpha: the decoding α.
        target: ``(B, 3, H, W)`` references (e.g. GT) for PSNR; None: no PSNR.

    Returns:
        ``{name: {zone: scores}}`` with, per zone, ``rms_change``: the RMS difference of the outputs in
        8-bit levels (0–255 scale) over the zone's pixels, channels and images; ``relative_change``:
        that RMS over the RMS of the restoration's own correction (output − input) there; with a
        target, ``psnr`` and ``psnr_change`` (dB; per image, then the mean over images, as
        ``dmdiff evaluate``): the alternative's PSNR and its difference to the own maps'. The entry
        ``"own"`` holds the own maps' PSNR.
    """
    if model.svda is None:
        raise ValueError("this model has no SVDA (config.svda=False): nothing reads the maps")
    reference = model.restore(image, maps, alpha=alpha).double()
    x = image.to(reference.device).double()
    masks = {z: torch.as_tensor(m, dtype=torch.bool, device=reference.device) for z, m in zones.items()}

    def zone_psnr(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mse = (y - target.to(y)).pow(2).mean(dim=1)[:, mask].mean(dim=1)            # (B,)
        return -10 * torch.log10(mse)

    out: dict[str, dict[str, dict[str, float]]] = {}
    if target is not None:
        out["own"] = {z: {"psnr": float(zone_psnr(reference, m).mean())} for z, m in masks.items()}
    for name, other in alternatives.items():
        y = model.restore(image, other, alpha=alpha).double()
        out[name] = {}
        for zone, mask in masks.items():
            change = (y - reference).pow(2).mean(dim=1)[:, mask].mean().sqrt()
            correction = (reference - x).pow(2).mean(dim=1)[:, mask].mean().sqrt()
            scores = {"rms_change": float(255 * change), "relative_change": float(change / correction)}
            if target is not None:
                psnr = zone_psnr(y, mask)
                scores.update(psnr=float(psnr.mean()), psnr_change=float((psnr - zone_psnr(reference, mask)).mean()))
            out[name][zone] = scores
    return out
