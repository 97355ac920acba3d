"""SVDA: the spatially varying degradation-aware attention module (the paper's design, docs/method.md).

Design note
-----------
Inputs are two kinds of per-cell evidence on the ``G × G`` grid of docs/architecture.md:

* optics maps ``(B, 7, G', G')`` in ``MAP_CHANNELS`` order (PSF FWHM and 80 % encircled-energy
  radius per colour in pixels, sensor noise std at mid-grey) from the lens model — optional: real
  captures without a lens model pass ``None`` and get zeros plus a "maps missing" channel;
* no-reference image statistics of the captured image itself, per cell (no downloaded weights):
  brightness, contrast, gradient energy per colour (sharpness), Laplacian energy, and a noise
  estimate (median absolute deviation of Immerkær's high-pass, which cancels edges and ramps).

All are log-scaled to roughly ``[-1, 1]`` (:func:`degradation_features`), one token per cell. Any
image size works: statistics are taken over ``G × G`` cell windows, maps on another grid are
resampled to ``G × G`` (bilinear between nodes, the grid-node convention).

Tokens → linear embedding + fixed 2-D sinusoidal positional encoding of the cell centre in field
coordinates ``[-1, 1]`` → one pre-norm transformer encoder layer (self-attention over cells) →
multi-head attention from learned queries, one per block id of each backbone part (VAE 6, UNet 10),
over the tokens. The queries double as the block-id embeddings of S3Diff: the embedding of block
``k`` is ``LayerNorm(q_k + attention_k)``.

* global mode: one embedding per block ``(B, n, d)``, attention ``(B, heads, n, G·G)``;
* spatial mode (``spatial=True``): the query of block ``k`` at cell ``c`` is ``q_k + token_c``, so
  every cell gets its own embedding ``(B, n, G, G, d)`` (attention ``(B, heads, n, G·G, G·G)``,
  query cell then key cell), which :class:`~dmdiff.model.lora.ModulationMLP` turns into per-cell
  modulation ``(B, n, r, r, G, G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dmdiff.optics.camera import (
    MAP_CHANNELS,  # order of the optics maps and of maps/*.npy
)

IMAGE_STAT_CHANNELS = ("brightness", "contrast", "gradient_r", "gradient_g", "gradient_b", "laplacian", "noise")
FEATURE_CHANNELS = (*MAP_CHANNELS, "maps_missing", *(f"image_{c}" for c in IMAGE_STAT_CHANNELS))
BLOCKS = {"vae": 6, "unet": 10}       # block ids per backbone part (docs/method.md), as in dmdiff.model.lora

LUMA = (0.299, 0.587, 0.114)          # Y' of gamma-encoded R, G, B (as in PSNR-Y)
# Immerkær (1996): zero response to constants, ramps and (mostly) edges; its L2 norm is 6.
NOISE_KERNEL = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))
LAPLACIAN_KERNEL = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
MAD_TO_STD = 0.6745                   # median |N(0, 1)|


def _cells(x: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Pixels of each grid cell: ``(B, C, H, W)`` → ``(B, C, G, G, h·w)``.

    Cell ``i`` covers rows ``[floor(i·H/G), floor((i+1)·H/G))``; every cell uses the first
    ``h = floor(H/G)`` of them (same for columns), so all cells have equal pixel counts.
    """
    H, W = x.shape[-2:]
    if min(H, W) < grid_size:
        raise ValueError(f"image of {H}×{W} pixels is smaller than the {grid_size}×{grid_size} SVDA grid")
    g = torch.arange(grid_size, device=x.device)
    rows = (g * H // grid_size)[:, None] + torch.arange(H // grid_size, device=x.device)   # (G, h)
    cols = (g * W // grid_size)[:, None] + torch.arange(W // grid_size, device=x.device)   # (G, w)
    return x[:, :, rows[:, None, :, None], cols[None, :, None, :]].flatten(-2)


def _filter(x: torch.Tensor, kernel) -> torch.Tensor:
    """3×3 filter of each channel of ``(B, C, H, W)``, replicate padding, same size."""
    k = torch.tensor(kernel, dtype=x.dtype, device=x.device).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


def image_statistics(image: torch.Tensor, grid_size: int = 7) -> torch.Tensor:
    """No-reference per-cell statistics of a captured image, in ``IMAGE_STAT_CHANNELS`` order.

    Args:
        image: ``(B, 3, H, W)`` sRGB in ``[0, 1]``, any ``H, W ≥ grid_size``.

    Returns:
        ``(B, 7, G, G)``: brightness (mean luma), contrast (population std of luma), gradient energy
        ``mean(|∇I|²)`` of R, G, B (per pixel², finite differences), Laplacian energy of luma, and
        the noise std of luma ``median|Immerkær(Y)| / (0.6745 · 6)``; all in ``[0, 1]`` intensity units.
    """
    luma = torch.einsum("bchw,c->bhw", image, image.new_tensor(LUMA))[:, None]
    gx = F.pad(image[..., :, 1:] - image[..., :, :-1], (0, 1))
    gy = F.pad(image[..., 1:, :] - image[..., :-1, :], (0, 0, 0, 1))
    luma_cells = _cells(luma, grid_size)
    noise = _cells(_filter(luma, NOISE_KERNEL).abs(), grid_size).median(dim=-1).values / (MAD_TO_STD * 6)
    return torch.cat([
        luma_cells.mean(dim=-1),
        luma_cells.std(dim=-1, correction=0),          # population std: 0, not NaN, for 1-px cells
        _cells(gx ** 2 + gy ** 2, grid_size).mean(dim=-1),
        _cells(_filter(luma, LAPLACIAN_KERNEL) ** 2, grid_size).mean(dim=-1),
        noise,
    ], dim=1)


def _log_scale(q: torch.Tensor, eps: float, centre: float, scale: float) -> torch.Tensor:
    return (torch.log10(q.clamp_min(0) + eps) - centre) / scale


def degradation_features(image: torch.Tensor, maps: torch.Tensor | None = None,
                         grid_size: int = 7) -> torch.Tensor:
    """The normalised SVDA input per grid cell, ``(B, 15, G, G)`` in ``FEATURE_CHANNELS`` order.

    Args:
        image: ``(B, 3, H, W)`` sRGB in ``[0, 1]``.
        maps: ``(B, 7, G', G')`` optics maps in ``MAP_CHANNELS`` order (widths in pixels, noise std
            in ``[0, 1]`` units), any grid; ``None`` when no lens model is known.

    Normalisation (all about ``[-1, 1]`` over the plausible range): PSF widths
    ``(log10(1 + w) − 0.6) / 0.6`` (w = 1 px → −0.5, 15 px → 1); noise stds
    ``log10(σ + 1e-3) + 2``; brightness ``2·Y − 1``; contrast ``(log10(s + 1e-3) + 1.5) / 1.5``;
    gradient and Laplacian energies ``(log10(E + 1e-6) + 3) / 3``. Missing maps: zeros, and the
    ``maps_missing`` channel is 1.
    """
    B = image.shape[0]
    stats = image_statistics(image, grid_size)
    image_part = torch.cat([
        2 * stats[:, :1] - 1,
        _log_scale(stats[:, 1:2], 1e-3, -1.5, 1.5),
        _log_scale(stats[:, 2:6], 1e-6, -3.0, 3.0),
        _log_scale(stats[:, 6:], 1e-3, -2.0, 1.0),
    ], dim=1)
    if maps is None:
        map_part = image.new_zeros(B, len(MAP_CHANNELS) + 1, grid_size, grid_size)
        map_part[:, -1] = 1
    else:
        if maps.dim() != 4 or maps.shape[:2] != (B, len(MAP_CHANNELS)):
            raise ValueError(f"maps must be (B={B}, {len(MAP_CHANNELS)}, G, G) in MAP_CHANNELS order "
                             f"{MAP_CHANNELS}; got {tuple(maps.shape)}")
        maps = maps.to(image.dtype)
        map_part = torch.cat([_log_scale(maps[:, :6], 1.0, 0.6, 0.6),
                              _log_scale(maps[:, 6:], 1e-3, -2.0, 1.0),
                              maps.new_zeros(B, 1, *maps.shape[-2:])], dim=1)
        if map_part.shape[-2:] != (grid_size, grid_size):
            map_part = F.interpolate(map_part, size=(grid_size, grid_size), mode="bilinear",
                                     align_corners=False, antialias=True)
    return torch.cat([map_part, image_part], dim=1)


def positional_encoding(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal encoding of the cell centres, ``(G·G, dim)``, cells row-major.

    Cell ``(i, j)`` sits at field coordinates ``v = 2(i + 0.5)/G − 1``, ``u = 2(j + 0.5)/G − 1``
    (``[-1, 1]``, centre 0). The first half of the channels encode ``v``, the second ``u``, each as
    ``sin(ω_k ·)`` and ``cos(ω_k ·)`` with ``ω_k`` geometric from ``π/2`` (monotone over the field)
    to ``G·π/2`` (a period of two cells, below the grid's Nyquist limit).
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sinusoidal encoding, got {dim}")
    n = dim // 4
    omega = (math.pi / 2) * grid_size ** (torch.arange(n) / max(n - 1, 1))
    coord = 2 * (torch.arange(grid_size) + 0.5) / grid_size - 1
    angles = coord[:, None] * omega                                        # (G, n)
    enc = torch.cat([angles.sin(), angles.cos()], dim=1)                   # (G, 2n)
    v = enc[:, None, :].expand(grid_size, grid_size, 2 * n)
    u = enc[None, :, :].expand(grid_size, grid_size, 2 * n)
    return torch.cat([v, u], dim=-1).reshape(grid_size * grid_size, dim)


@dataclass
class SVDAOutput:
    """What :class:`SVDA` returns.

    embeddings: per part, ``(B, n_blocks, d)`` (global) or ``(B, n_blocks, G, G, d)`` (spatial).
    attention: per part, the block queries' attention weights over the cells (summing to 1 over the
        last axis): ``(B, heads, n_blocks, G·G)`` or, spatial, ``(B, heads, n_blocks, G·G, G·G)``
        (query cell, key cell); cells row-major.
    features: the normalised input ``(B, 15, G, G)`` (``FEATURE_CHANNELS``), for plots.
    """

    embeddings: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]
    features: torch.Tensor


class SVDA(nn.Module):
    """Spatially varying degradation-aware attention (module docstring).

    Args:
        blocks: block ids per backbone part, in output order (default VAE 6, UNet 10).
        dim: token/embedding width d (multiple of 4 and of ``heads``).
        heads: attention heads (encoder layer and block-query attention).
        grid_size: G, cells per side.
        spatial: per-cell embeddings (spatially varying modulation) instead of one per image.
    """

    def __init__(self, blocks: Mapping[str, int] = BLOCKS, dim: int = 128, heads: int = 4,
                 grid_size: int = 7, spatial: bool = False):
        super().__init__()
        self.blocks = dict(blocks)
        self.grid_size, self.spatial = grid_size, spatial
        self.embed = nn.Linear(len(FEATURE_CHANNELS), dim)
        self.register_buffer("position", positional_encoding(grid_size, dim), persistent=False)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.queries = nn.Parameter(0.02 * torch.randn(sum(self.blocks.values()), dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, maps: torch.Tensor | None = None) -> SVDAOutput:
        """Degradation embeddings of a batch.

        Args:
            image: ``(B, 3, H, W)`` captured image, sRGB in ``[0, 1]``, any size ≥ G pixels.
            maps: ``(B, 7, G', G')`` optics maps (``MAP_CHANNELS``) or ``None`` (see
                :func:`degradation_features`).
        """
        G = self.grid_size
        features = degradation_features(image, maps, G)
        tokens = self.encoder(self.embed(features.flatten(2).transpose(1, 2)) + self.position)  # (B, G², d)
        B, n_cells, d = tokens.shape
        queries = self.queries.expand(B, -1, -1)                                              # (B, n, d)
        if self.spatial:
            queries = (queries[:, :, None, :] + tokens[:, None, :, :]).flatten(1, 2)          # (B, n·G², d)
        out, weights = self.attention(queries, tokens, tokens, need_weights=True, average_attn_weights=False)
        emb = self.norm(queries + out)
        if self.spatial:
            emb = emb.unflatten(1, (-1, G, G))                                                 # (B, n, G, G, d)
            weights = weights.unflatten(2, (-1, n_cells))                                      # (B, h, n, G², G²)
        sizes = list(self.blocks.values())
        return SVDAOutput(embeddings=dict(zip(self.blocks, emb.split(sizes, dim=1))),
                          attention=dict(zip(self.blocks, weights.split(sizes, dim=2))),
                          features=features)
