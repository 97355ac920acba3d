"""Tunable decoding along α: scoring re-decoded outputs, the cost of a re-decode, a PSNR sweep.

:func:`score_images` scores one set of outputs (e.g. every test capture re-decoded at one α, with
:meth:`DMDiff.decode <dmdiff.model.dmdiff.DMDiff.decode>`) against their scenes, for one point of the
perception–distortion plane (:func:`dmdiff.viz.plot_perception_distortion`):

* fidelity: mean PSNR (dB) and SSIM on RGB (:func:`dmdiff.metrics.psnr` / :func:`~dmdiff.metrics.ssim`);
* perception: set-level NIQE (:func:`dmdiff.perception.niqe_set`, lower = more natural; None where
  it cannot be computed — :func:`niqe_or_note` says why) and the set-level detail ratio
  (:func:`dmdiff.perception.detail_ratio_set`, 1 = the scenes' fine detail);
* LPIPS-Alex (:class:`dmdiff.metrics.LPIPSMetric`, lower = closer) **only** when the caller passes
  one, which it can build only when :func:`dmdiff.metrics.lpips_status` finds the real weights.

:func:`redecode_timing` measures what moving α costs next to a full restore.
:func:`psnr_along_alpha` is the lighter sweep of latents already restored (mean PSNR against several
references, e.g. the scene and the ideal-lens image), drawn by :func:`plot_psnr_along_alpha`.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dmdiff.device import timed
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.metrics import LPIPSMetric, psnr, ssim
from dmdiff.model.dmdiff import DMDiff, RestoreLatents, check_alpha
from dmdiff.model.pipeline import DMDiffPipeline, as_image, as_maps
from dmdiff.perception import detail_ratio_set, niqe_set


def model_of(model_or_pipeline: DMDiff | DMDiffPipeline) -> DMDiff:
    """The :class:`DMDiff` of a model or a :class:`DMDiffPipeline` (DmdiffError for anything else)."""
    model = model_or_pipeline.model if isinstance(model_or_pipeline, DMDiffPipeline) else model_or_pipeline
    if not isinstance(model, DMDiff):
        raise DmdiffError(f"expected a DMDiff model or a DMDiffPipeline, got {type(model_or_pipeline).__name__}")
    return model


def niqe_or_note(images: Sequence[np.ndarray]) -> tuple[float | None, str | None]:
    """Set-level NIQE of ``images`` (:func:`dmdiff.perception.niqe_set`) and None, or None and why it
    could not be computed (frames under 96 px, too few patches, NIQE's model file not installed)."""
    try:
        return niqe_set(images), None
    except DmdiffError as e:
        return None, f"set-level NIQE not computed: {e}"


def score_images(images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                 lpips: LPIPSMetric | None = None) -> dict[str, float | None]:
    """Fidelity and perception-side scores of a set of outputs against their scenes.

    Args:
        images: float ``(H, W, 3)`` RGB arrays in ``[0, 1]`` (sizes may differ).
        gts: their scenes, parallel to ``images``, same sizes.
        lpips: an :class:`LPIPSMetric` (built only where :func:`dmdiff.metrics.lpips_status` finds its
            real weights), or None for no LPIPS.

    Returns:
        ``{"psnr", "ssim", "niqe_set", "detail_ratio"}``: mean PSNR (dB) and SSIM over the images,
        set-level NIQE of ``images`` (None where :func:`niqe_or_note` gives a note), the set-level
        detail ratio; plus ``lpips.name`` (``"lpips_alex"``: mean LPIPS) when ``lpips`` is given.

    Raises:
        DmdiffError: no images, or not as many scenes as images (or a scene without band energy).
    """
    if len(images) == 0 or len(images) != len(gts):
        raise DmdiffError(f"score_images needs as many scenes as images (at least one), "
                          f"got {len(images)} images and {len(gts)} scenes")
    row = {"psnr": float(np.mean([psnr(x, g) for x, g in zip(images, gts)])),
           "ssim": float(np.mean([ssim(x, g) for x, g in zip(images, gts)])),
           "niqe_set": niqe_or_note(images)[0], "detail_ratio": detail_ratio_set(images, gts)}
    if lpips is not None:
        row[lpips.name] = float(np.mean([lpips(x, g) for x, g in zip(images, gts)]))
    return row


def redecode_timing(model_or_pipeline: DMDiff | DMDiffPipeline, capture, maps=None, repeats: int = 5,
                    alpha: float = 0.5) -> dict:
    """What moving α costs next to restoring: one capture's full restore vs a re-decode.

    Args:
        capture: one image (forms as :class:`DMDiffPipeline` takes); maps: its ``(7, G, G)`` maps or None.
        repeats: timed pairs, restore and re-decode interleaved so both see the same machine load.
        alpha: the α of the re-decodes.

    Returns:
        ``{"restore_s", "decode_s"}`` (medians, seconds, device synchronised), ``"ratio"``
        (decode / restore), ``"repeats"``, ``"size"`` (``[H, W]``), ``"device"``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    model = model_of(model_or_pipeline)
    lr = as_image(capture)[None]
    m = as_maps(maps, 1)[0]
    m = None if m is None else m[None]
    restore_s, decode_s = [], []
    for _ in range(repeats):
        seconds, (_, latents) = timed(lambda: model.restore(lr, m, alpha=alpha, return_latents=True), model.device)
        restore_s.append(seconds)
        decode_s.append(timed(lambda: model.decode(latents, alpha), model.device)[0])
    restore, decode = statistics.median(restore_s), statistics.median(decode_s)
    return {"restore_s": restore, "decode_s": decode, "ratio": decode / restore, "repeats": repeats,
            "size": list(lr.shape[-2:]), "device": str(model.device)}


def psnr_along_alpha(model_or_pipeline: DMDiff | DMDiffPipeline, latents: RestoreLatents,
                     references: Mapping[str, object], alphas: Sequence[float]) -> dict[float, dict[str, float]]:
    """Mean PSNR (dB) of a batch re-decoded at each α against each reference.

    Args:
        model_or_pipeline: the model that restored the batch.
        latents: its cached latents (:meth:`DMDiff.restore <dmdiff.model.dmdiff.DMDiff.restore>` with
            ``return_latents=True``) of ``B`` images.
        references: name → ``(B, 3, H, W)`` tensor (or ``(B, H, W, 3)`` array) in ``[0, 1]``, e.g.
            ``{"gt": gt, "gt_blur": gt_blur}``.
        alphas: the α values, each in ``[0, 1.2]``; each costs one VAE decode of the batch.

    Returns:
        ``{alpha (float): {name: mean PSNR over the B images, dB}}``, α in the given order.

    Raises:
        ConfigError: an α outside ``[0, 1.2]``.
    """
    model = model_of(model_or_pipeline)
    out = {}
    for alpha in map(check_alpha, alphas):
        y = model.decode(latents, alpha=alpha)
        out[alpha] = {name: float(np.mean(psnr(y, ref))) for name, ref in references.items()}
    return out


def plot_psnr_along_alpha(sweep: Mapping[float, Mapping[str, float]], capture: Mapping[str, float],
                          title: str = "tunable decoding", colours: Sequence[str] = ("tab:green", "tab:blue")):
    """Mean PSNR against α, one line per reference, each with the capture's own PSNR against that
    reference as a dotted line of its colour. Returns a matplotlib ``Figure``.

    Args:
        sweep: :func:`psnr_along_alpha`'s result, ``{alpha: {name: dB}}``.
        capture: name → the capture's mean PSNR (dB) against that reference (every name of ``sweep``).
        title: the axes' title.
        colours: one per reference, in ``sweep``'s order.

    Raises:
        ConfigError: an empty ``sweep``, or more references than ``colours``.
    """
    alphas = list(sweep)
    names = list(sweep[alphas[0]]) if alphas else []
    if not names or len(names) > len(colours):
        raise ConfigError(f"plot_psnr_along_alpha needs 1 to {len(colours)} references (one colour each), "
                          f"got {len(names)}")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, colour in zip(names, colours):
        ax.plot(alphas, [sweep[a][name] for a in alphas], "o-", color=colour, label=f"against {name}")
        ax.axhline(capture[name], color=colour, ls=":", lw=1)
    ax.set(xlabel="α (0: neutral path, 1: positive path)", ylabel="mean PSNR (dB)", title=title)
    ax.legend()
    return fig
