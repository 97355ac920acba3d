"""Tiled restoration: any image size in bounded memory, with blended overlaps (no seams).

Design note
-----------
The UNet's attention grows quadratically with the image area and the VAE decoder's activations
linearly, so a large photo is restored tile by tile, in two blended passes:

1. **Latents.** The image is padded as :meth:`DMDiff.restore` pads it (to multiples of
   ``latent_multiple``, centred) into a canvas, and the canvas is cut into overlapping tiles of
   ``tile`` pixels (fewer along an axis that is shorter). Each tile runs the LoRA-modulated VAE
   encoder and the batched UNet call of both paths (or of the one an α of 0 or 1 needs;
   :meth:`DMDiff.path_latents`) with **its own**
   degradation input: SVDA's image statistics of the tile, and the optics maps resampled to the
   tile's window of the field (:func:`dmdiff.data.dataset.crop_maps`; the maps describe the full
   image). The x0 latents of both paths are blended into full latent canvases; the colour anchor
   (models with one) is the whole image's, computed once (or given by the caller), and so is a
   deconvolved network input (``DMDiffConfig.input_deconvolves``), which the tiles are cut from.
2. **Decoding.** ``z(α) = (1 − α)·z_neutral + α·z_positive`` is decoded in overlapping latent tiles
   of the same layout (``tile / f`` latent cells, f = ``vae_scale_factor``) blended in pixel space,
   then cropped to the image. :func:`tiled_decode` re-decodes the cached canvases at another α
   without the encoder and UNet, as :meth:`DMDiff.decode` does for one tile.

Layout along one axis of length ``L`` (in units of ``f`` pixels, so every tile starts on a latent
cell): ``n = ceil((L − O) / (T − O))`` tiles of length ``T`` whose starts are spread evenly from 0 to
``L − T`` (rounded), so neighbours overlap by at least ``O`` (``overlap``) and the image edges
coincide with tile edges; a single tile of length ``L`` when ``L ≤ T``.

Blend weights: a tile's window is the product of a row and a column profile; each profile is 1
except over the overlap with a neighbour of length ``r``, where it rises as the raised cosine
``sin²(π/2 · (i + 0.5) / r)``, ``i = 0 … r − 1`` from the tile's edge. The two ramps of a pair of
neighbours then sum to exactly 1 (``sin² + cos²``); the accumulated weights are divided out anyway,
so tiles overlapping more than one neighbour are normalised too. Weights are > 0 everywhere.
With ``overlap = 0`` and an axis length that is a multiple of the tile, tiles abut and nothing is
blended: the naive tiling, kept for comparison (tests/test_restore.py measures its seams).

An image that fits in one tile goes through :meth:`DMDiff.restore_latents` and
:meth:`DMDiff.decode` unchanged: exactly :meth:`DMDiff.restore`'s result. In multi-tile mode SVDA
sees the tile of the padded canvas (the padding is < ``latent_multiple`` pixels per axis, at the
image edges only), and GroupNorm statistics are per tile; both vary smoothly across the blend.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from dmdiff.data.dataset import crop_maps
from dmdiff.errors import ConfigError
from dmdiff.model.dmdiff import DECODED_PATHS, DMDiff, RestoreLatents, check_alpha

__all__ = ["DEFAULT_TILE_PX", "DEFAULT_OVERLAP_PX", "check_tiling", "axis_tiles", "ramp_profile",
           "tile_windows", "tiled_latents", "tiled_decode", "tiled_restore"]

#: Default tile side and overlap in pixels (docs/experiments.md, "Speed and memory": 2048² on a CPU).
DEFAULT_TILE_PX = 256
DEFAULT_OVERLAP_PX = 32

#: One tile: ``(y0, x0, h, w)`` and its profile ramps ``(top, bottom, left, right)``, in grid units.
Tile = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


def check_tiling(model: DMDiff, tile: int, overlap: int) -> tuple[int, int]:
    """``(tile, overlap)`` in pixels if the model can use them, else a ConfigError saying why.

    ``tile`` must be a multiple of ``latent_multiple`` (16 tiny, 64 SD-Turbo) and at least the SVDA
    grid (``grid_size`` px); ``overlap`` a multiple of ``vae_scale_factor`` (2 tiny, 8 SD-Turbo) in
    ``[0, tile / 2]``.
    """
    m, f = model.backbone.latent_multiple, model.backbone.vae_scale_factor
    for name, value in (("tile", tile), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}")
    if tile < max(m, model.config.grid_size) or tile % m:
        raise ConfigError(f"tile must be a multiple of {m} px (the {model.config.preset} backbone's latent multiple) "
                          f"and at least {max(m, model.config.grid_size)} px, got {tile}")
    if not 0 <= overlap <= tile // 2 or overlap % f:
        raise ConfigError(f"overlap must be a multiple of {f} px (the VAE factor) between 0 and tile/2 = "
                          f"{tile // 2} px, got {overlap}")
    return int(tile), int(overlap)


def axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis: ``(start, size, ramp_before, ramp_after)`` (module docstring, "Layout").

    All in the same units (here: latent cells). Ramps are the overlaps with the previous / next
    tile (0 at the ends).
    """
    if length <= tile:
        return [(0, length, 0, 0)]
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(k * (length - tile) / (n - 1)) for k in range(n)]
    return [(s, tile, starts[k - 1] + tile - s if k else 0, s + tile - starts[k + 1] if k + 1 < n else 0)
            for k, s in enumerate(starts)]


def ramp_profile(size: int, before: int, after: int, scale: int = 1) -> torch.Tensor:
    """A tile's 1-D blend profile over ``size · scale`` samples: raised-cosine ramps of ``before · scale``
    and ``after · scale`` samples at its ends, 1 between (module docstring, "Blend weights"); float64."""
    n = size * scale
    i = torch.arange(n, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64)
    for ramp, position in ((before * scale, i + 0.5), (after * scale, n - i - 0.5)):
        if ramp:
            w = w * torch.where(position < ramp, torch.sin(0.5 * math.pi * position / ramp) ** 2, 1.0)
    return w


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The 2-D tile layout of a ``height × width`` grid: row tiles × column tiles, row-major."""
    return [((y0, x0, h, w), (top, bottom, left, right))
            for y0, h, top, bottom in axis_tiles(height, tile, overlap)
            for x0, w, left, right in axis_tiles(width, tile, overlap)]


def _window(ramps: Sequence[int], h: int, w: int, scale: int, like: torch.Tensor) -> torch.Tensor:
    """The 2-D blend window ``(h·scale, w·scale)`` of a tile, on ``like``'s device and dtype."""
    top, bottom, left, right = ramps
    window = ramp_profile(h, top, bottom, scale)[:, None] * ramp_profile(w, left, right, scale)[None, :]
    return window.to(like.device, like.dtype)


def _tile_maps(maps: torch.Tensor | None, image_hw: tuple[int, int],
               window: tuple[int, int, int, int]) -> torch.Tensor | None:
    """Each image's maps ``(B, 7, G, G)`` resampled to ``window = (y0, x0, h, w)`` (image pixels)."""
    if maps is None:
        return None

    cropped = [crop_maps(m.detach().cpu().double().numpy(), image_hw, window) for m in maps]
    return torch.from_numpy(np.stack(cropped)).to(maps.device)


def tiled_latents(model: DMDiff, image: torch.Tensor, maps: torch.Tensor | None = None,
                  tile: int = DEFAULT_TILE_PX, overlap: int = DEFAULT_OVERLAP_PX,
                  on_tile: Callable[[int, int], None] | None = None,
                  anchor: torch.Tensor | None = None, paths: Sequence[str] = DECODED_PATHS,
                  seen: torch.Tensor | None = None) -> RestoreLatents:
    """The paths' x0 latents of ``image``, tile by tile, blended into full canvases (pass 1).

    Args:
        model: the DMDiff model (eval mode is kept; no grad).
        image: ``(B, 3, H, W)`` sRGB in ``[0, 1]``, any size ≥ the SVDA grid.
        maps: ``(B, 7, G, G)`` optics maps of the full images (``MAP_CHANNELS``), or None.
        tile, overlap: tile side and minimum overlap in pixels (:func:`check_tiling`).
        on_tile: called as ``on_tile(done, total)`` after each tile (progress display).
        anchor: :meth:`DMDiff.input_anchor` of ``image`` when the caller has it (None: computed
            here, once for the whole image; models without an anchor ignore it).
        paths: the paths to compute (:meth:`DMDiff.path_latents`): both, or
            :func:`~dmdiff.model.dmdiff.decoded_paths` of the one α they will be decoded at.
        seen: :meth:`DMDiff.network_input` of ``image`` when the caller has it (None: computed here,
            once for the whole image, then tiled).

    Returns:
        :class:`RestoreLatents` of the padded image, as :meth:`DMDiff.restore_latents` returns it
        (bit-identical to it when the padded image fits in one tile).
    """
    tile, overlap = check_tiling(model, tile, overlap)
    f = model.backbone.vae_scale_factor
    with torch.no_grad():
        canvas, pad = model.pad(image.to(model.device, model.dtype))
    size = tuple(image.shape[-2:])
    tiles = tile_windows(canvas.shape[-2] // f, canvas.shape[-1] // f, tile // f, overlap // f)
    if len(tiles) == 1:
        latents = model.restore_latents(image, maps, anchor, paths, seen)
        if on_tile:
            on_tile(1, 1)
        return latents
    if model.config.input_deconvolves:     # the network's input, computed whole, then tiled
        with torch.no_grad():
            if seen is None:
                seen = model.network_input(image.to(model.device, model.dtype))
            canvas = model.pad(seen.to(model.device, model.dtype))[0]
    left, _, top, _ = pad
    canvases: dict[str, torch.Tensor] = {}
    weight = None
    for done, ((y0, x0, h, w), ramps) in enumerate(tiles, start=1):
        window_px = (y0 * f - top, x0 * f - left, h * f, w * f)          # in image pixels
        part = canvas[..., y0 * f:(y0 + h) * f, x0 * f:(x0 + w) * f]
        z = model.path_latents(part, _tile_maps(maps, size, window_px), paths)
        computed = {p: v for p in DECODED_PATHS if (v := getattr(z, f"z_{p}")) is not None}
        if weight is None:
            shape = (*z.any.shape[:2], canvas.shape[-2] // f, canvas.shape[-1] // f)
            canvases = {p: v.new_zeros(shape) for p, v in computed.items()}
            weight = z.any.new_zeros(shape[-2:])
        blend = _window(ramps, h, w, 1, z.any)
        for p, v in computed.items():
            canvases[p][..., y0:y0 + h, x0:x0 + w] += blend * v
        weight[y0:y0 + h, x0:x0 + w] += blend
        if on_tile:
            on_tile(done, len(tiles))
    if model.config.anchor_sigma_px is None:
        anchor = None
    elif anchor is None:
        with torch.no_grad():
            anchor = model.input_anchor(image.to(model.device, model.dtype))
    blended = {p: canvases[p] / weight if p in canvases else None for p in DECODED_PATHS}
    return RestoreLatents(blended["neutral"], blended["positive"], size, pad, anchor)


def tiled_decode(model: DMDiff, latents: RestoreLatents, alpha: float, tile: int = DEFAULT_TILE_PX,
                 overlap: int = DEFAULT_OVERLAP_PX) -> torch.Tensor:
    """Decode cached (tiled or not) latents at ``alpha`` in blended latent tiles (pass 2).

    Returns ``(B, 3, H, W)`` in ``[0, 1]``; exactly :meth:`DMDiff.decode` when the latents fit in
    one tile of ``tile / f`` cells.
    """
    alpha = check_alpha(alpha)
    tile, overlap = check_tiling(model, tile, overlap)
    f = model.backbone.vae_scale_factor
    h_lat, w_lat = latents.any.shape[-2:]
    tiles = tile_windows(h_lat, w_lat, tile // f, overlap // f)
    if len(tiles) == 1:
        return model.decode(latents, alpha)
    image = weight = None
    for (y0, x0, h, w), ramps in tiles:
        window = (..., slice(y0, y0 + h), slice(x0, x0 + w))
        part = RestoreLatents(*(None if z is None else z[window] for z in (latents.z_neutral, latents.z_positive)),
                              (h * f, w * f), (0, 0, 0, 0))
        decoded = model.decode(part, alpha, clamp=False)                  # (B, 3, h·f, w·f)
        if image is None:
            image = decoded.new_zeros(*decoded.shape[:2], h_lat * f, w_lat * f)
            weight = decoded.new_zeros(h_lat * f, w_lat * f)
        blend = _window(ramps, h, w, f, decoded)
        image[..., y0 * f:(y0 + h) * f, x0 * f:(x0 + w) * f] += blend * decoded
        weight[y0 * f:(y0 + h) * f, x0 * f:(x0 + w) * f] += blend
    left, _, top, _ = latents.pad
    H, W = latents.size
    with torch.no_grad():
        image = image.div_(weight)[..., top:top + H, left:left + W]       # in place: a large photo's peak memory
        return model.anchored(image, latents.anchor).clamp_(0, 1)         # (a tensor made here either way)


def tiled_restore(model: DMDiff, image: torch.Tensor, maps: torch.Tensor | None = None, alpha: float = 1.0,
                  tile: int = DEFAULT_TILE_PX, overlap: int = DEFAULT_OVERLAP_PX, return_latents: bool = False,
                  on_tile: Callable[[int, int], None] | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, RestoreLatents]:
    """:meth:`DMDiff.restore` for any image size: :func:`tiled_latents` then :func:`tiled_decode`.

    ``(B, 3, H, W)`` → ``(B, 3, H, W)`` in ``[0, 1]``; with ``return_latents`` also the blended
    latents, which :func:`tiled_decode` re-decodes at another α (same tile settings).
    """
    alpha = check_alpha(alpha)
    latents = tiled_latents(model, image, maps, tile, overlap, on_tile)
    restored = tiled_decode(model, latents, alpha, tile, overlap)
    return (restored, latents) if return_latents else restored
