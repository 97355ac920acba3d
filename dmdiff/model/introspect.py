"""Looking inside a DMDiff model: its SVDA attention and the LoRA modulation it produces.

Used by notebook 02 to show how the modulation varies across the field and with the degradation
maps. All functions run without gradients and leave the model's train/eval mode as it was.
"""

from __future__ import annotations

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


def modulation_strength(matrices: torch.Tensor) -> torch.Tensor:
    """How far each modulation is from plain LoRA: ``‖M − I‖_F / ‖I‖_F``.

    ``(B, n, r, r)`` → ``(B, n)``; ``(B, n, r, r, G, G)`` → ``(B, n, G, G)``.
    """
    r = matrices.shape[2]
    eye = torch.eye(r, device=matrices.device, dtype=matrices.dtype)
    if matrices.dim() == 6:
        eye = eye[:, :, None, None]
    return (matrices - eye).pow(2).sum(dim=(2, 3)).sqrt() / r ** 0.5


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
