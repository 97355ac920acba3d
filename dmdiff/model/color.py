"""Colour correction of a restored image against its input: what ``dmdiff restore --color-correct``
and the pipeline's ``color_correct`` do.

``"none"`` leaves the model's output as it is; ``"meanstd"`` matches each channel's mean and
standard deviation to the input's (a global colour-cast fix); ``"lowpass"`` replaces the output's
low-frequency part (Gaussian, σ = :data:`LOWPASS_SIGMA_PX`) by the input's, per channel, keeping
the restored detail and the input's large-scale colours. Both also bring back some of the
capture's haze: use them when the model shifts colours. ``"auto"`` (:func:`resolve_color_correction`)
is ``"none"`` for a model with a colour anchor (``DMDiffConfig.anchor_sigma_px``: it keeps the
large-scale colours of the input — deconvolved first with ``anchor_rl_iterations`` — itself, in
training and inference) and ``"lowpass"`` for one without.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from dmdiff.errors import ConfigError

__all__ = ["CORRECTIONS", "COLOR_CORRECTIONS", "DEFAULT_COLOR_CORRECTION", "LOWPASS_SIGMA_PX",
           "resolve_color_correction", "color_correct"]

#: What :func:`color_correct` does; ``"auto"`` is resolved to one of them per model.
CORRECTIONS = ("none", "meanstd", "lowpass")
COLOR_CORRECTIONS = ("auto", *CORRECTIONS)
#: The default colour correction: a tiny model trained without the colour anchor shifts colours by
#: an amount that depends on what each tile holds, which shows as soft colour steps between tiles
#: on large photos; ``lowpass`` keeps the restored detail and takes the large-scale colours from
#: the input (on the held-out test split it also adds PSNR: docs/experiments.md). A
#: model with the anchor does this itself, so ``auto`` leaves its output as it is.
DEFAULT_COLOR_CORRECTION = "auto"
#: Gaussian σ (px) that separates "colour" from "detail" in the ``lowpass`` correction.
LOWPASS_SIGMA_PX = 12.0


def resolve_color_correction(method: str, model) -> str:
    """``method`` with ``"auto"`` replaced by what it means for ``model`` (a :class:`DMDiff`):
    ``"none"`` when it has a colour anchor (``config.anchor_sigma_px``), else ``"lowpass"``.

    Raises:
        ConfigError: ``method`` is not one of :data:`COLOR_CORRECTIONS`.
    """
    if method not in COLOR_CORRECTIONS:
        raise ConfigError(f"color correction must be one of {', '.join(COLOR_CORRECTIONS)}, got {method!r}")
    if method != "auto":
        return method
    return "none" if model.config.anchor_sigma_px is not None else "lowpass"


def color_correct(restored: np.ndarray, reference: np.ndarray, method: str,
                  sigma_px: float = LOWPASS_SIGMA_PX) -> np.ndarray:
    """Correct the colours of ``restored`` against ``reference`` (both float ``(H, W, 3)`` in ``[0, 1]``).

    ``"none"``: unchanged; ``"meanstd"``: per channel ``(o − mean_o) / std_o · std_r + mean_r``;
    ``"lowpass"``: per channel ``o − G_σ(o) + G_σ(r)`` with a Gaussian ``G_σ`` of ``sigma_px``
    (reflected edges). Returns float32 ``(H, W, 3)`` clipped to ``[0, 1]``.
    """
    if method not in CORRECTIONS:
        hint = " (resolve 'auto' for a model with resolve_color_correction)" if method == "auto" else ""
        raise ConfigError(f"color correction must be one of {', '.join(CORRECTIONS)}, got {method!r}{hint}")
    out = np.asarray(restored, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if method == "meanstd":
        mean_o, std_o = out.mean(axis=(0, 1)), out.std(axis=(0, 1))
        mean_r, std_r = ref.mean(axis=(0, 1)), ref.std(axis=(0, 1))
        gain = np.where(std_o > 1e-6, std_r / np.maximum(std_o, 1e-6), 1.0)
        out = (out - mean_o) * gain + mean_r
    elif method == "lowpass":
        def low(a: np.ndarray) -> np.ndarray:
            return gaussian_filter(a, sigma=(sigma_px, sigma_px, 0), mode="reflect")

        out = out - low(out) + low(ref)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
