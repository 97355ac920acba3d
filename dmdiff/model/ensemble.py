"""Geometric self-ensemble: restore the 8 orientations of an image and average the results.

The eight orientations are the symmetries of the square (the dihedral group D4): rotations by
0°, 90°, 180° and 270°, each with and without a horizontal mirror. :func:`self_ensemble` turns the
capture *and its degradation maps* into each orientation, restores it, turns the result back and
averages the eight. A one-step network is not exactly equivariant to these turns, so its errors
partly average out; the price is 8 restorations per image.

This is only sound when a turned capture is still a capture the lens could have taken, with the
turned maps describing it. That holds for a lens whose PSF field is symmetric about the optical
axis under the square's symmetries — a rotationally symmetric lens such as the simulated metalens
(:mod:`dmdiff.optics`), whose PSF depends on the distance from the centre and turns with the
field position. For a real camera with a decentred or tilted lens, check before relying on it.

Shapes: images ``(B, C, H, W)``, maps ``(B, 7, G, G)`` (or None); a 90° turn swaps ``H`` and ``W``,
so the restoration callable must accept any size (:func:`dmdiff.model.tiling.tiled_restore` does).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ORIENTATIONS", "orient", "unorient", "self_ensemble"]

#: Number of orientations averaged (the symmetries of the square).
ORIENTATIONS = 8


def _check(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < ORIENTATIONS:
        raise ValueError(f"orientation must be an integer in [0, {ORIENTATIONS}), got {k!r}")
    return k


def orient(x: torch.Tensor, k: int) -> torch.Tensor:
    """Orientation ``k`` (0…7) of ``x`` ``(..., H, W)``: mirror left–right when ``k ≥ 4``, then turn
    by ``(k mod 4)·90°`` counter-clockwise. ``k = 0`` is ``x`` itself."""
    k = _check(k)
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def unorient(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`orient`: ``unorient(orient(x, k), k) == x``."""
    k = _check(k)
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def self_ensemble(restore: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], image: torch.Tensor,
                  maps: torch.Tensor | None = None, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``unorient(restore(orient(image, k), orient(maps, k)), k)`` over the 8 orientations.

    Args:
        restore: ``(image, maps) → restored``, e.g. ``lambda x, m: model.restore(x, m, alpha=1.0)``;
            its output has the input's shape ``(B, 3, H', W')``.
        image: ``(B, 3, H, W)`` capture.
        maps: ``(B, 7, G, G)`` degradation maps of ``image``, turned with it; None: no maps.
        identity: ``restore(image, maps)`` when the caller has it already (orientation 0): used as
            that member instead of restoring the image again (``dmdiff evaluate`` reuses its α = 1
            restore), so 7 restorations run instead of 8.

    Returns:
        ``(B, 3, H, W)``, the average (in ``[0, 1]`` when each restoration is).
    """
    total = None
    for k in range(ORIENTATIONS):
        if k == 0 and identity is not None:
            out = identity
        else:
            out = unorient(restore(orient(image, k), None if maps is None else orient(maps, k)), k)
        total = out if total is None else total + out
    return total / ORIENTATIONS
