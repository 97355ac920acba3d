"""The methods ``dmdiff evaluate`` measures, as one registry: name, label, reference and how to run it.

Adding a row to the report is adding a :class:`Method` to :data:`REGISTRY` (or, for models found
at run time such as ablations, to :func:`methods_for`). Each method's ``run`` restores (or
reconstructs) one test image and returns its float32 ``(H, W, 3)`` output, the seconds it took
and any extra per-image figures; outputs are then clipped and rounded to 8 bits
(:func:`dmdiff.optics.sensor.quantize`) before they are measured against the method's reference
(``"gt"``, or ``"lr"`` for the learned degradation).

DMDiff's rows run through :class:`~dmdiff.model.pipeline.DMDiffPipeline`, dmdiff's one inference
path, as ``dmdiff restore`` does. Methods that share work share it through the :class:`Sample`
cache: the pipeline's one restore call gives α = 1 and, by re-decoding its cached latents
(:meth:`DMDiffPipeline.decode <dmdiff.model.pipeline.DMDiffPipeline.decode>`, the VAE decoder
only), α = 0 and the model's recommended α (``DMDiffConfig.recommended_alpha``; no row when it is
None); the colour-corrected row reuses it, and the ×8 self-ensemble takes its α = 1 output as the
unturned member, restoring only the 7 turned copies: no restoration is computed twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from dmdiff.device import timed
from dmdiff.errors import DmdiffError
from dmdiff.evaluation.baselines import richardson_lucy, richardson_lucy_sv, wiener_deconvolve
from dmdiff.model.color import color_correct
from dmdiff.model.dmdiff import DMDiff
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.train.ablations import ABLATIONS

__all__ = ["Method", "Context", "Sample", "REGISTRY", "METHODS", "BASELINES", "DEGRADE",
           "RECOMMENDED", "ABLATION_PREFIX", "LABELS", "REFERENCES", "ablation_method", "ablation_label",
           "recommended_alpha", "methods_for", "to_hwc"]

ABLATION_PREFIX = "ablation_"
#: The quality bar's baselines (:func:`dmdiff.evaluation.report.quality_bar`): the central-PSF ones.
BASELINES = ("wiener", "richardson_lucy")
#: The learned-degradation check (measured against the capture).
DEGRADE = "stage1_degrade"
#: The row of the model's recommended α (its label names the value: :func:`methods_for`).
RECOMMENDED = "dmdiff_arec"


@dataclass
class Context:
    """What the methods of one evaluation share.

    pipeline: the evaluated model's pipeline; degrader: a stage-1 model (GT → capture) or None;
    ablations: method key → ablation pipeline; psf: ``(3, K, K)`` true central PSF for the
    baselines (None: no baselines); params: the baselines' tuned parameters; correction: the colour
    correction :func:`dmdiff.model.color.resolve_color_correction` gives the model; blur: each image's
    lens's spatially varying blur for ``richardson_lucy_sv`` by image name
    (:class:`dmdiff.evaluation.baselines.LensBlurs`; None: no such row); untrained: the same model with untrained adapters
    (:func:`dmdiff.evaluation.trivial.untrained_pipeline`; None: no such row); self_ensemble: whether
    the ×8 self-ensemble row runs; lenses: each test image's lens's PSF grid by image name
    (:class:`dmdiff.data.dataset.LensGrids`) for the models' deconvolved colour anchors (None: the
    models keep the lens they were saved with).
    """

    pipeline: DMDiffPipeline
    degrader: DMDiff | None = None
    ablations: dict[str, DMDiffPipeline] = field(default_factory=dict)
    psf: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    correction: str = "none"
    blur: Any = None
    untrained: DMDiffPipeline | None = None
    self_ensemble: bool = True
    lenses: Any = None

    @property
    def model(self) -> DMDiff:
        """The evaluated :class:`~dmdiff.model.dmdiff.DMDiff` model."""
        return self.pipeline.model

    def use_capture_lens(self, name: str) -> None:
        """Point every model's colour anchor at the lens of test image ``name``
        (:meth:`DMDiff.use_capture_lens <dmdiff.model.dmdiff.DMDiff.use_capture_lens>`), as its maps
        describe that lens to SVDA."""
        grid = None if self.lenses is None else self.lenses(name)
        untrained = [] if self.untrained is None else [self.untrained]
        for pipeline in (self.pipeline, *self.ablations.values(), *untrained):
            pipeline.model.use_capture_lens(grid)


@dataclass
class Sample:
    """One test image: its ``name``, tensors ``lr``, ``gt`` ``(1, 3, H, W)`` and ``maps``
    ``(1, 7, G, G)`` or None, the capture as float32 ``(H, W, 3)`` (``capture``), and a cache for
    work methods share."""

    name: str
    lr: torch.Tensor
    gt: torch.Tensor
    maps: torch.Tensor | None
    capture: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, item: dict) -> "Sample":
        """From a :class:`~dmdiff.data.dataset.PairedFolderDataset` item."""
        return cls(item["name"], item["lr"][None], item["gt"][None],
                   item["maps"][None] if "maps" in item else None, to_hwc(item["lr"]))

    @classmethod
    def stand_in(cls, item: dict) -> "Sample":
        """A sample of ``item``'s shape for the untimed warm-up: its images rolled by half their size
        (not a test input, so the warm-up restores nothing that the measured runs restore again)."""
        def roll(image: torch.Tensor) -> torch.Tensor:
            return torch.roll(image, (image.shape[-2] // 2, image.shape[-1] // 2), dims=(-2, -1))

        return cls.of({**item, "lr": roll(item["lr"]), "gt": roll(item["gt"])})


#: ``run(context, sample) -> (output (H, W, 3) float32, seconds, extra per-image figures)``.
Runner = Callable[[Context, Sample], tuple[np.ndarray, float, dict]]


@dataclass(frozen=True)
class Method:
    """A row of the report: ``name`` (its key in ``metrics.json``), ``label`` (the table's words),
    ``reference`` (``"gt"`` or ``"lr"``), ``run`` (:data:`Runner`), ``applies`` (whether the row
    exists in this evaluation) and ``warm_up`` (whether the untimed warm-up runs it: not for rows
    without networks, nor for rows whose networks another row warms)."""

    name: str
    label: str
    reference: str
    run: Runner
    applies: Callable[[Context], bool] = lambda context: True
    warm_up: bool = True


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` tensor → float32 numpy ``(H, W, 3)``."""
    image = image[0] if image.dim() == 4 else image
    return image.detach().float().cpu().permute(1, 2, 0).numpy()


# ---- the runners -----------------------------------------------------------------------------------


def _restored(context: Context, sample: Sample) -> tuple[Any, float]:
    """The pipeline's one restore call of the sample (both paths; the α = 1 output and the cached
    latents), made once per sample."""
    if "restore" not in sample.cache:
        sample.cache["restore"] = timed(lambda: context.pipeline(sample.lr, sample.maps, 1.0, return_latents=True),
                                        context.model.device)
    seconds, output = sample.cache["restore"]
    return output, seconds


def _positive(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    output, seconds = _restored(context, sample)
    return output.images[0], seconds, {}


def recommended_alpha(context: Context) -> float | None:
    """The evaluated model's recommended α (``DMDiffConfig.recommended_alpha``), or None."""
    return context.model.config.recommended_alpha


def _redecoded(alpha_of: Callable[[Context], float]) -> Runner:
    """A row at another α: the cached latents of the one restore call, re-decoded (``redecode_s``:
    the extra seconds; the runtime is the restore call's, which gives any α)."""
    def run(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
        output, seconds = _restored(context, sample)
        redecode_s, images = timed(lambda: context.pipeline.decode(output, alpha_of(context)), context.model.device)
        return images[0], seconds, {"redecode_s": redecode_s}

    return run


def _color_corrected(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    positive, seconds, _ = _positive(context, sample)
    extra_s, image = timed(lambda: color_correct(positive, sample.capture, context.correction), torch.device("cpu"))
    return image, seconds + extra_s, {}


def _self_ensemble(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    """The ×8 self-ensemble at α = 1; its unturned member is the shared α = 1 restore (the runtime:
    that call's seconds plus the 7 turned restores')."""
    restored, restore_s = _restored(context, sample)
    seconds, output = timed(lambda: context.pipeline(sample.lr, sample.maps, 1.0, self_ensemble=True,
                                                     identity=restored.images), context.model.device)
    return output.images[0], restore_s + seconds, {}


def _baseline(deconvolve: Callable, param: str) -> Runner:
    def run(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
        seconds, image = timed(lambda: deconvolve(sample.capture, context.psf, context.params[param]),
                               torch.device("cpu"))
        return image, seconds, {}

    return run


def _varying_baseline(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    iterations = context.params["richardson_lucy_sv"]
    blur = context.blur(sample.name)
    seconds, image = timed(lambda: richardson_lucy_sv(sample.capture, blur, iterations), torch.device("cpu"))
    return image, seconds, {}


def _anchor(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    model = context.model
    with torch.no_grad():
        seconds, image = timed(lambda: model.input_anchor(sample.lr.to(model.device, model.dtype)), model.device)
    return to_hwc(image.clamp(0, 1)), seconds, {}


def _untrained(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    pipeline = context.untrained
    seconds, output = timed(lambda: pipeline(sample.lr, sample.maps, 1.0), pipeline.model.device)
    return output.images[0], seconds, {}


def _ceiling(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    seconds, image = timed(lambda: context.model.reconstruct(sample.gt), context.model.device)
    return to_hwc(image), seconds, {}


def _degrade(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
    degrader = context.degrader
    seconds, image = timed(lambda: degrader.degrade(sample.gt, sample.maps), degrader.device)
    return to_hwc(image), seconds, {}


def _ablation(method: str) -> Runner:
    def run(context: Context, sample: Sample) -> tuple[np.ndarray, float, dict]:
        pipeline = context.ablations[method]
        seconds, output = timed(lambda: pipeline(sample.lr, sample.maps, 1.0), pipeline.model.device)
        return output.images[0], seconds, {}

    return run


def _has_baselines(context: Context) -> bool:
    return context.psf is not None


def _has_anchor(context: Context) -> bool:
    return context.model.config.anchor_sigma_px is not None


#: The methods every evaluation may have, in table order (ablations follow ``dmdiff_a1_x8``:
#: :func:`methods_for`; the learned degradation comes last). ``input`` is measured, not run.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("wiener", "Wiener, true central PSF", "gt", _baseline(wiener_deconvolve, "wiener"), _has_baselines,
           warm_up=False),
    Method("richardson_lucy", "Richardson–Lucy, true central PSF", "gt",
           _baseline(richardson_lucy, "richardson_lucy"), _has_baselines, warm_up=False),
    Method("richardson_lucy_sv", "Richardson–Lucy, true PSF grid (spatially varying)", "gt", _varying_baseline,
           lambda context: context.blur is not None, warm_up=False),
    Method("color_anchor", "colour anchor alone", "gt", _anchor, _has_anchor,
           warm_up=False),
    Method("untrained", "untrained adapters (backbone + anchor), α=1", "gt", _untrained,
           lambda context: context.untrained is not None),
    Method("dmdiff_a0", "DMDiff α=0 (fidelity)", "gt", _redecoded(lambda context: 0.0)),
    Method(RECOMMENDED, "DMDiff recommended α", "gt", _redecoded(recommended_alpha),
           lambda context: recommended_alpha(context) is not None),
    Method("dmdiff_a1", "DMDiff α=1 (positive path)", "gt", _positive),
    Method("dmdiff_a1_cc", "DMDiff α=1 + restore's colour correction", "gt", _color_corrected,
           lambda context: context.correction != "none"),
    Method("dmdiff_a1_x8", "DMDiff α=1, ×8 self-ensemble", "gt", _self_ensemble,
           lambda context: context.self_ensemble, warm_up=False),
    Method("vae_ceiling", "backbone VAE recon. of GT (ceiling)", "gt", _ceiling),
    Method(DEGRADE, "stage-1 degrade(GT)", "lr", _degrade, lambda context: context.degrader is not None),
)}
#: Every method key a report may hold besides ablations, in table order (``input`` first).
METHODS = ("input", *(name for name in REGISTRY if name != DEGRADE))
LABELS = {"input": "capture (input)", **{m.name: m.label for m in REGISTRY.values()}}
REFERENCES = {"input": "gt", **{m.name: m.reference for m in REGISTRY.values()}}


def ablation_method(name: str) -> str:
    """The method key of ablation ``name`` (``ablation_<name>``); DmdiffError for names that could not
    be a folder (letters, digits, ``_`` and ``-`` only)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise DmdiffError(f"ablation name {name!r}: use letters, digits, '_' and '-' only")
    return f"{ABLATION_PREFIX}{name}"


def ablation_label(name: str, short: bool = False) -> str:
    """``"ablation: no SVDA (α=1)"`` for the table, ``"no SVDA"`` (``short``) for the grid; the name
    itself for ablations not in :data:`dmdiff.train.ablations.ABLATIONS`."""
    label = ABLATIONS[name].label if name in ABLATIONS else name
    return label if short else f"ablation: {label} (α=1)"


def anchor_label(config) -> str:
    """The colour anchor row's label: what the model's anchor is (``DMDiffConfig``)."""
    if config.anchor_rl_iterations is not None:
        return "colour anchor alone (the model's G_σ(RL_n(x)))"
    if config.anchor_wiener_nsr is not None:
        return "colour anchor alone (the model's G_σ(Wiener with the PSF grid))"
    return "colour anchor alone (the model's G_σ(x))"


def methods_for(context: Context) -> list[Method]:
    """The rows of this evaluation, in table order: the registry's that apply (the recommended-α
    row labelled with its value, e.g. ``"DMDiff α=0.6 (recommended)"``, the colour anchor's with what
    it is: ``G_σ(x)`` for a model that does not deconvolve), with one row per
    ablation model of ``context`` (keys :func:`ablation_method`) after ``dmdiff_a1_x8``."""
    ablations = [Method(key, ablation_label(key[len(ABLATION_PREFIX):]), "gt", _ablation(key))
                 for key in context.ablations]
    rows = []
    for method in REGISTRY.values():
        if method.applies(context):
            if method.name == RECOMMENDED:
                method = replace(method, label=f"DMDiff α={recommended_alpha(context):g} (recommended)")
            if method.name == "color_anchor":
                method = replace(method, label=anchor_label(context.model.config))
            rows.append(method)
        if method.name == "dmdiff_a1_x8":
            rows += ablations
    return rows
