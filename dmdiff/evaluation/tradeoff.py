"""The fidelity–perception trade-off of tunable decoding: an α sweep, its plot, and the cost of a re-decode.

:func:`alpha_sweep` restores each capture **once** (both paths, :meth:`DMDiff.restore
<dmdiff.model.dmdiff.DMDiff.restore>` with ``return_latents=True``) and re-decodes its cached
latents at every α (:meth:`DMDiff.decode <dmdiff.model.dmdiff.DMDiff.decode>`, bit-identical to a
restore at that α), scoring each output against its ground truth:

* fidelity: PSNR (dB) and SSIM on RGB (:func:`dmdiff.metrics.psnr` / :func:`~dmdiff.metrics.ssim`);
* the perception side: LPIPS-Alex (:class:`dmdiff.metrics.LPIPSMetric`, lower is closer) **only**
  when :func:`dmdiff.metrics.lpips_status` finds its real weights on disk; otherwise the
  :func:`dmdiff.metrics.gradient_sharpness_ratio` (output / GT edge contrast, 1 = the GT's), which
  is a sharpness proxy and is never called LPIPS.

:func:`plot_tradeoff` draws PSNR and SSIM against that measure, one point per α (annotated), with
the capture's own point for reference. :func:`redecode_timing` measures what moving α costs next to
a full restore. :func:`psnr_along_alpha` is the lighter sweep of latents already restored (mean
PSNR against several references, e.g. the scene and the ideal-lens image), drawn by
:func:`plot_psnr_along_alpha`.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dmdiff.device import timed
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.metrics import (
    LPIPSMetric,
    gradient_sharpness_ratio,
    lpips_status,
    psnr,
    ssim,
    summarize,
)
from dmdiff.model.dmdiff import DMDiff, RestoreLatents, check_alpha
from dmdiff.model.pipeline import DMDiffPipeline, as_image, as_images, as_maps, to_numpy

#: The perception-side measures :func:`alpha_sweep` can use, and how plots and tables name them.
PERCEPTION_LABELS = {
    "lpips_alex": "LPIPS-Alex against the GT (lower: perceptually closer)",
    "grad_ratio": "gradient sharpness ratio, output / GT (1: the GT's edge contrast; a proxy, not LPIPS)",
}
#: The default α grid: 0 (neutral path) … 1 (positive path) … 1.2, step 0.2.
DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2)


def model_of(model_or_pipeline: DMDiff | DMDiffPipeline) -> DMDiff:
    """The :class:`DMDiff` of a model or a :class:`DMDiffPipeline` (DmdiffError for anything else)."""
    model = model_or_pipeline.model if isinstance(model_or_pipeline, DMDiffPipeline) else model_or_pipeline
    if not isinstance(model, DMDiff):
        raise DmdiffError(f"expected a DMDiff model or a DMDiffPipeline, got {type(model_or_pipeline).__name__}")
    return model


def perception_measure(choice: str = "auto") -> tuple[str, str]:
    """Which perception-side measure to use: ``(key, note)``.

    ``"auto"``: ``"lpips_alex"`` when :func:`dmdiff.metrics.lpips_status` finds LPIPS-Alex's real
    weights, else ``"grad_ratio"``; ``"lpips_alex"`` / ``"grad_ratio"``: that one (LPIPS still only
    with its real weights — :class:`LPIPSMetric` raises otherwise). ``note`` says why.
    """
    if choice not in ("auto", *PERCEPTION_LABELS):
        raise ConfigError(f"perception must be 'auto' or one of {', '.join(PERCEPTION_LABELS)}, got {choice!r}")
    available, reason = lpips_status("alex")
    if choice == "grad_ratio" or (choice == "auto" and not available):
        return "grad_ratio", ("LPIPS unavailable, so the gradient sharpness ratio (a proxy) is used: " + reason
                              if not available else "gradient sharpness ratio chosen explicitly")
    return "lpips_alex", reason


@dataclass
class AlphaSweep:
    """The result of :func:`alpha_sweep`.

    records: one dict per α, in the given order: ``alpha``, ``n`` (images), ``psnr`` (dB), ``ssim``
        and ``<measure>`` — means over the images — and ``psnr_std``, ``ssim_std``,
        ``<measure>_std`` (population std over the images).
    capture: the same means and stds of the captures themselves against their GTs (no ``alpha``).
    measure: the perception-side key (``"lpips_alex"`` or ``"grad_ratio"``); measure_label: its
        :data:`PERCEPTION_LABELS` entry; measure_note: why it was chosen (:func:`perception_measure`).
    """

    records: list[dict]
    capture: dict
    measure: str
    measure_label: str
    measure_note: str

    def to_dict(self) -> dict:
        """JSON-ready: the fields as a dict."""
        return asdict(self)


def _table(rows: list[dict]) -> dict:
    """Per-image metric rows → ``{"n": n, key: mean, key_std: std, …}``."""
    out = {"n": len(rows)}
    for key, s in summarize(rows).items():
        out[key], out[f"{key}_std"] = s["mean"], s["std"]
    return out


def alpha_sweep(model_or_pipeline: DMDiff | DMDiffPipeline, captures, gts, maps=None,
                alphas: Sequence[float] = DEFAULT_ALPHAS, *, perception: str = "auto") -> AlphaSweep:
    """Mean fidelity and perception-side scores of the outputs at each α over a set of captures.

    Args:
        model_or_pipeline: a :class:`DMDiff` or :class:`DMDiffPipeline`.
        captures: a list of images (any form :class:`DMDiffPipeline` takes: numpy ``(H, W, 3)``,
            tensors ``(3, H, W)``, PIL; sizes may differ) or a ``(B, 3, H, W)`` tensor.
        gts: their ground truths, parallel to ``captures``, same sizes.
        maps: None, or their optics maps (a list of ``(7, G, G)`` / None, or ``(B, 7, G, G)``).
        alphas: the α values, each in ``[0, 1.2]``.
        perception: ``"auto"``, ``"lpips_alex"`` or ``"grad_ratio"`` (:func:`perception_measure`).

    Each capture is restored once; each α costs one VAE decode per capture.

    Raises:
        ConfigError: an α outside ``[0, 1.2]``, no α, or an unknown ``perception``.
        DmdiffError / ImageInputError: mismatched counts or sizes, unusable images.
    """
    model = model_of(model_or_pipeline)
    alphas = [check_alpha(a) for a in alphas]
    if not alphas:
        raise ConfigError("alpha_sweep needs at least one alpha")
    measure, note = perception_measure(perception)
    score = LPIPSMetric("alex", device=model.device) if measure == "lpips_alex" else gradient_sharpness_ratio
    lrs, refs = as_images(captures), as_images(gts)
    if len(lrs) != len(refs):
        raise DmdiffError(f"got {len(lrs)} captures but {len(refs)} ground truths")
    image_maps = as_maps(maps, len(lrs))

    def scored(image: np.ndarray, ref: np.ndarray) -> dict:
        return {"psnr": psnr(image, ref), "ssim": ssim(image, ref), measure: float(score(image, ref))}

    rows: list[list[dict]] = [[] for _ in alphas]
    capture_rows = []
    for k, (lr, gt, m) in enumerate(zip(lrs, refs, image_maps)):
        if lr.shape != gt.shape:
            raise DmdiffError(f"image {k}: capture {tuple(lr.shape)} and ground truth {tuple(gt.shape)} differ in size")
        ref = to_numpy(gt)
        capture_rows.append(scored(to_numpy(lr), ref))
        _, latents = model.restore(lr[None], None if m is None else m[None], alpha=alphas[0], return_latents=True)
        for i, alpha in enumerate(alphas):
            rows[i].append(scored(to_numpy(model.decode(latents, alpha)[0]), ref))
    records = [{"alpha": alpha, **_table(r)} for alpha, r in zip(alphas, rows)]
    return AlphaSweep(records, _table(capture_rows), measure, PERCEPTION_LABELS[measure], note)


def plot_tradeoff(sweep: AlphaSweep, title: str | None = None, label_px: float = 14.0):
    """PSNR (left) and SSIM (right) against the perception-side measure, one point per α, the
    capture's own point as a grey star. Returns a matplotlib ``Figure``.

    Points are coloured by α (colour bar) and labelled with their α; consecutive points closer than
    ``label_px`` display pixels to the first of their run share one label ``α=a…b`` (so coinciding
    points do not pile their labels up). For the gradient sharpness ratio a dotted
    line marks 1 (the GT's edge contrast); for LPIPS lower is perceptually closer.
    """

    x = np.array([r[sweep.measure] for r in sweep.records])
    alphas = np.array([r["alpha"] for r in sweep.records])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, unit in ((axes[0], "psnr", "mean PSNR (dB)"), (axes[1], "ssim", "mean SSIM")):
        y = np.array([r[key] for r in sweep.records])
        ax.plot(x, y, "-", color="lightgray", lw=1, zorder=1)
        points = ax.scatter(x, y, c=alphas, cmap="viridis", vmin=0.0, vmax=1.2, s=30, zorder=2,
                            label="restored at α (0: neutral, 1: positive path)")
        ax.plot(sweep.capture[sweep.measure], sweep.capture[key], "*", color="gray", ms=12, label="capture")
        if sweep.measure == "grad_ratio":
            ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set(xlabel=sweep.measure_label, ylabel=unit)
        ax.xaxis.label.set_size(8)
        ax.legend(fontsize=8)
        ax.autoscale_view()
        where = ax.transData.transform(np.column_stack([x, y]))
        groups = [[0]]                     # runs of consecutive points within label_px of the run's first
        for i in range(1, len(alphas)):
            if np.hypot(*(where[i] - where[groups[-1][0]])) < label_px:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            first, last = alphas[group[0]], alphas[group[-1]]
            text = f"α={first:g}" if len(group) == 1 else f"α={first:g}…{last:g}"
            ax.annotate(text, (x[group[0]], y[group[0]]), xytext=(4, 4), textcoords="offset points", fontsize=8)
        fig.colorbar(points, ax=ax, label="α", fraction=0.05, pad=0.02)
    n = sweep.records[0]["n"]
    fig.suptitle(title or f"fidelity vs {'LPIPS' if sweep.measure == 'lpips_alex' else 'sharpness'} over α "
                          f"(means over {n} image{'s' if n != 1 else ''})")
    fig.tight_layout()
    return fig


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
