"""Settings of ``dmdiff train``: one dataclass tree, laid over by a YAML file (:mod:`dmdiff.config`).

``load_train_config("configs/tiny.yaml")`` merges strictly (unknown keys and wrong types raise
:class:`~dmdiff.errors.ConfigError` naming the key) and then checks ranges and the recipe's stage
overrides, so a bad config fails before any data or model is touched. The resolved config is
written to ``RUN/config.yaml`` and reloads to the same object.

Units: sizes in pixels, learning rates per optimizer step, ``steps`` counts optimizer steps (each
one ``grad_accum`` micro-batches of ``batch_size`` images per process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from dmdiff.config import load_config, merge
from dmdiff.data.simulate import resolve_config  # numpy, the optics: only when needed
from dmdiff.errors import ConfigError
from dmdiff.model.dmdiff import DMDiffConfig

#: Largest seed of any kind: accelerate's ``set_seed`` seeds numpy's legacy generator, which takes
#: seeds in ``[0, 2**32 - 1]`` only; the other seeds share the range so any seed can go anywhere.
MAX_SEED = 2**32 - 1
#: Most ``threads`` / ``num_workers``: more cannot be meant (and torch's thread count is a C int).
MAX_THREADS = 1024


def _check_seed(name: str, value: int) -> None:
    """ConfigError naming ``name`` unless ``0 <= value <= MAX_SEED``."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be in [0, 2**32 - 1] (numpy's seed range), got {value}")


def _check_svda_grid(name: str, size_px: int | None, model: DMDiffConfig) -> None:
    """ConfigError naming ``name`` when images of side ``size_px`` (None: not known here) are smaller
    than the model's SVDA grid, which needs at least one pixel per cell."""
    if size_px is not None and model.svda and size_px < model.grid_size:
        raise ConfigError(f"{name} = {size_px} px is smaller than the SVDA grid (model.grid_size = "
                          f"{model.grid_size}), which needs at least one pixel per cell")


class TrainWarning(UserWarning):
    """Something about the training setup the user should know (a fallback in effect)."""


#: The three paths, in the order of :class:`PathProbs` and of the integer path ids in batches.
PATHS = ("positive", "neutral", "negative")
#: Input and target image of each path (docs/method.md); a missing ``gt_blur`` falls back to ``gt``.
PATH_IO = {"positive": ("lr", "gt"), "neutral": ("lr", "gt_blur"), "negative": ("gt", "lr")}


@dataclass
class PathProbs:
    """How often each path is trained (weights; normalised to sum 1, so ``1, 0, 0`` is fine).

    positive: LR → GT (restoration, perceptual); neutral: LR → ideal-lens image (fidelity);
    negative: GT → LR (the forward degradation, docs/method.md).
    """

    positive: float = 0.7
    neutral: float = 0.2
    negative: float = 0.1

    def normalised(self) -> tuple[float, float, float]:
        """``(positive, neutral, negative)`` summing to 1, in :data:`PATHS` order."""
        values = (self.positive, self.neutral, self.negative)
        total = sum(values)
        return tuple(v / total for v in values)


@dataclass
class LossConfig:
    """``mse · MSE(out, target) + lpips · LPIPS(out, target)`` (docs/method.md: 2 and 5, VGG trunk).

    LPIPS needs its trunk's ImageNet weights (:func:`dmdiff.metrics.lpips_status`); when they are
    absent, ``lpips_substitute`` is used instead, with a warning that LPIPS is not being used:
    ``"gradient-l1"`` (L1 between the images' horizontal and vertical finite differences, an
    edge-fidelity term) or ``"none"`` (the term is dropped). The substitute is weighted by
    ``substitute_weight`` (None: the ``lpips`` weight). Its own weight exists because the two terms
    differ in scale and kind: LPIPS distances are ~0.1–0.5 and penalise colour shifts, gradient-L1
    values are ~0.03 and blind to them, so LPIPS's weight on the substitute lets the network trade
    colour fidelity for edges. ``spectral`` weights :func:`dmdiff.train.losses.spectral_log_l1`
    (log band energies compared, phases ignored; 0: off).
    """

    mse: float = 2.0
    lpips: float = 5.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_substitute: Literal["gradient-l1", "none"] = "gradient-l1"
    substitute_weight: float | None = None
    spectral: float = 0.0

    def substitute_weight_value(self) -> float:
        """The weight the substitute term gets when LPIPS is unavailable."""
        return self.lpips if self.substitute_weight is None else self.substitute_weight

    def validate(self, prefix: str = "loss") -> "LossConfig":
        """Raise :class:`ConfigError` (naming ``prefix``: ``loss`` or ``loss_by_path.<path>``) on
        negative weights or when both main weights are 0; return self."""
        if not (self.mse >= 0 and self.lpips >= 0 and 0 < self.mse + self.lpips < math.inf):
            raise ConfigError(f"{prefix} weights must be >= 0 and not all 0 (with a finite sum), got "
                              f"mse={self.mse}, lpips={self.lpips}")
        if self.substitute_weight is not None and not self.substitute_weight >= 0:
            raise ConfigError(f"{prefix}.substitute_weight must be >= 0 or null, got {self.substitute_weight}")
        if not 0 <= self.spectral < math.inf:
            raise ConfigError(f"{prefix}.spectral must be >= 0 and finite, got {self.spectral}")
        return self


#: The keys of :class:`LossConfig` that ``loss_by_path`` may set per path (the LPIPS network and the
#: substitute's kind are shared: one loss module serves all paths).
PATH_LOSS_KEYS = ("mse", "lpips", "substitute_weight", "spectral")
#: Most discriminator channels (``adversarial.channels``): a patch critic needs far fewer.
MAX_DISC_CHANNELS = 1024


@dataclass
class AdversarialConfig:
    """An adversarial (GAN) term for the perceptual paths (docs/method.md, "The losses by path").

    One patch discriminator per listed path (:mod:`dmdiff.train.adversarial`; spectral norm on its
    convolutions, hinge loss) learns to tell the path's targets from its outputs, and the generator
    loss of that path's images gains ``weight · hinge_G``, ``hinge_G = −mean D(output)`` (a logit,
    of order 1).

    weight: the generator term's weight; 0 turns the term off (no discriminator is built, the run is
        the one without an ``adversarial`` section). The default 0.05 keeps the term a small part of
        the loss: the main loss is ~1 at the paper's weights (2 · MSE ~0.01 + 5 · LPIPS ~0.2 each),
        so the term is ~5 % of it: enough for the critic to sharpen textures, small enough that the
        full-reference terms keep the output on its target. With the gradient-L1 substitute (no
        LPIPS weights) the main loss is ~0.1, and a smaller weight (~0.005–0.01) keeps that balance.
    start_step: optimizer steps trained without the generator term (warm-up): it is added from
        optimizer step ``start_step + 1`` on, once the fidelity losses have brought the outputs near
        their targets. The discriminator trains from step 1 (it does not change the generator, so
        the first ``start_step`` steps equal a run without the term), so that its first gradients
        to the generator come from a critic that has already learnt the difference between outputs
        and targets rather than from random weights.
    lr: the discriminator's Adam learning rate (constant; betas (0.5, 0.999) as in the GAN
        literature; no weight decay: spectral norm regularises it).
    r1_weight: γ of the R1 penalty ``γ / 2 · E‖∇ₓ D(x_real)‖²`` (gradient of each real image's mean
        logit); 0 (default): none, spectral norm already bounds the critic's slope.
    channels: width of the discriminator's first convolution (doubled at each of its three
        stride-2 convolutions, capped at 8×; a 38-px receptive field).
    paths: the paths whose outputs get the term, each with its own discriminator (a path's real
        images are its targets: GT for positive, captures for negative). The neutral path cannot be
        listed: it is the fidelity end of the α blend and keeps a pure full-reference loss.

    A discriminator is built only for listed paths that are trained (``path_probs`` > 0), so a
    recipe's stage 1 (negative path only) trains none with the default ``paths``.
    """

    weight: float = 0.05
    start_step: int = 100
    lr: float = 2e-4
    r1_weight: float = 0.0
    channels: int = 32
    paths: tuple[Literal["positive", "neutral", "negative"], ...] = ("positive",)

    def validate(self, prefix: str = "adversarial.") -> "AdversarialConfig":
        """Raise :class:`ConfigError` (keys named with ``prefix``) on out-of-range values; return self."""
        for name in ("weight", "r1_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{prefix}{name} must be >= 0, got {getattr(self, name)}")
        if self.start_step < 0:
            raise ConfigError(f"{prefix}start_step must be >= 0, got {self.start_step}")
        if not self.lr > 0:
            raise ConfigError(f"{prefix}lr must be a positive number, got {self.lr}")
        if not 1 <= self.channels <= MAX_DISC_CHANNELS:
            raise ConfigError(f"{prefix}channels must be in [1, {MAX_DISC_CHANNELS}], got {self.channels}")
        if not self.paths:
            raise ConfigError(f"{prefix}paths must name at least one path (to turn the term off, set "
                              f"{prefix}weight: 0 or adversarial: null)")
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"{prefix}paths lists a path twice: {list(self.paths)}")
        if "neutral" in self.paths:
            raise ConfigError(f"{prefix}paths may not include 'neutral': the neutral path is the fidelity "
                              "end of the α blend and keeps a pure full-reference loss")
        return self


@dataclass
class PseudoConfig:
    """The pseudo-pair step of the two-stage recipe (``dmdiff pseudo``).

    count: clean images to degrade with the stage-1 model.
    dead_leaves_fraction: share of them that are dead-leaves images; the rest are random crops of
        the bundled *training* photos (never the test photos), with names and seeds distinct from
        the dataset's.
    noise_strength: scale of the sensor-noise augmentation (``pseudo_noise_augment``; 0: none).
    size_px: side of the pseudo images (None: the dataset's sensor size).
    batch_size: images per ``DMDiff.degrade`` call.
    seed: seed of the clean images and the noise.
    """

    count: int = 64
    dead_leaves_fraction: float = 0.5
    noise_strength: float = 1.0
    size_px: int | None = None
    batch_size: int = 8
    seed: int = 1

    def validate(self, prefix: str = "") -> "PseudoConfig":
        """Raise :class:`ConfigError` (keys named with ``prefix``) on out-of-range values; return self."""
        for name in ("count", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dead_leaves_fraction <= 1:
            raise ConfigError(f"{prefix}dead_leaves_fraction must lie in [0, 1], got {self.dead_leaves_fraction}")
        if self.noise_strength < 0:
            raise ConfigError(f"{prefix}noise_strength must be >= 0, got {self.noise_strength}")
        if self.size_px is not None and self.size_px < 8:
            raise ConfigError(f"{prefix}size_px must be >= 8 or null, got {self.size_px}")
        _check_seed(f"{prefix}seed", self.seed)
        return self


#: What each recipe stage changes before its own overrides: stage 1 trains the negative path only.
STAGE_BASE = {"stage1": {"path_probs": {"positive": 0.0, "neutral": 0.0, "negative": 1.0}}, "stage2": {}}


@dataclass
class RecipeConfig:
    """The two-stage pseudo-data recipe (``dmdiff train --recipe``; docs/method.md).

    stage1, stage2: overrides laid over the rest of this config for each stage (same keys as the
        top level, checked as strictly; nested keys merge). Stage 1 first sets ``path_probs`` to
        the negative path only (:data:`STAGE_BASE`), stage 2 keeps the top-level ``path_probs``
        (0.7 / 0.2 / 0.1 by default); stage 2 trains on ``data`` + ``extra_data`` + the pseudo
        pairs.
    stage2_init: ``"base"`` (stage 2 starts from the untrained adapters, as a separate model) or
        ``"stage1"`` (from stage 1's weights; optimizer state fresh).
    pseudo: the pseudo-pair step.
    simulate: when set and ``data`` does not exist yet, the recipe first simulates the dataset
        there with these :class:`~dmdiff.data.simulate.SimulationConfig` settings (e.g. ``{}``
        for the defaults); None: the dataset must exist.
    simulate_seed: seed of that simulation.
    alpha_tolerance_db: after stage 2, the recommended α is the largest α in ``[0, 1]`` whose mean
        PSNR on the validation split is within this many dB of the best α's
        (:mod:`dmdiff.train.alpha`).

    :meth:`TrainConfig.validate` checks ``simulate`` as ``dmdiff simulate`` would, so a bad
    simulation setting fails before stage 1 rather than when the recipe reaches it.
    """

    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    stage2_init: Literal["base", "stage1"] = "base"
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    simulate: dict[str, Any] | None = None
    simulate_seed: int = 0
    alpha_tolerance_db: float = 0.25


@dataclass
class TrainConfig:
    """Everything one training run depends on (besides the data and the code).

    data: dataset folder (``dmdiff simulate`` layout; ``gt_train/`` + ``lr_train/`` at least).
    extra_data: more dataset folders whose train split joins ``data``'s (e.g. pseudo pairs).
    crop_px: side of the random square training crops (same window for LR, GT, gt_blur; maps
        resampled to it). Required (null is rejected although ``PairedFolderDataset`` accepts
        ``crop_px=None``): a batch stacks images of one size, and the images of real captures or
        of several datasets differ in size (and whole images rarely fit a batch in memory).
    flips: random horizontal flips of the crops.
    exposure_range: ``[lo, hi]``: scale every training pair (input, target, ideal-lens image) by one
        random gain drawn log-uniformly from this range, in linear light (then clipped to [0, 1]),
        so brightness is not something the model can memorise from the training images (the optics
        are linear in light; the noise level then no longer matches the maps exactly). None: off.
    batch_size: images per micro-batch per process.
    grad_accum: micro-batches per optimizer step.
    steps: optimizer steps in total.
    lr, weight_decay, adam_betas: AdamW settings; ``warmup_steps``: linear warm-up of the lr.
    lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` (decay to 0 at ``steps``).
    grad_clip: max global gradient norm (None: no clipping).
    ema_decay: keep an exponential moving average of the trained weights with this decay (e.g.
        0.999); it is what validation sees and what ``RUN/pipeline/`` holds. None: no EMA.
    mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast around the model's
        forward pass; the weights and the optimizer stay float32; fp16 needs CUDA).
    gradient_checkpointing: recompute the UNet's and the VAE's block activations in the backward
        pass instead of keeping them (:meth:`~dmdiff.model.dmdiff.DMDiff.enable_gradient_checkpointing`):
        less memory for ~one more forward pass of compute, the same gradients (docs/scaling.md).
    path_probs: how often each path is trained.
    path_sampling: ``"batch"``: one path per micro-batch (the paper); ``"sample"``: one per image.
    loss: loss weights (of every path, unless ``loss_by_path`` says otherwise).
    loss_by_path: per-path overrides of ``loss``'s weights (``mse``, ``lpips``,
        ``substitute_weight``), laid over ``loss``, e.g. ``{neutral: {lpips: 0}}`` for a neutral path
        trained on MSE alone. Empty (default): every path uses ``loss``. With ``path_sampling:
        sample``, a micro-batch mixing paths weights each image by its own path.
    adversarial: the adversarial term of the perceptual paths (:class:`AdversarialConfig`); None
        (default) or ``weight: 0``: none. ``adversarial: {}`` turns it on with the defaults.
    checkpoint_every: steps between checkpoints (the last step always gets one).
    keep_last: checkpoints kept (older ones are deleted once a newer one is complete).
    validate_every: steps between validations (0: only at the end; with ``val_images = 0``: never).
    val_images: test-split pairs of ``data`` used for validation (evenly spaced over the sorted names).
    val_crop_px: centre crop of the validation images (None: whole images).
    log_every: steps between loss lines in ``metrics.jsonl``.
    num_workers: DataLoader worker processes (0: load in the training process).
    threads: torch intra-op threads when training on the CPU (None: torch's default). The tiny
        networks are fastest with 1 on a shared machine: more threads oversubscribe the cores.
    init_weights: a run folder or ``*.safetensors`` file whose trained weights start this run
        (fine-tuning; the optimizer starts fresh). None: the adapters' own initialisation.
    seed: seeds the model initialisation, the data order, the crops/flips and the path choice.
    model: the DMDiff model (backbone preset, LoRA ranks, SVDA, prompts).
    recipe: the two-stage recipe (used by ``--recipe`` only).
    """

    data: str = "data/generated/tiny"
    extra_data: tuple[str, ...] = ()
    crop_px: int = 64
    flips: bool = True
    exposure_range: tuple[float, float] | None = None
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 300
    lr: float = 2e-5
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    path_probs: PathProbs = field(default_factory=PathProbs)
    path_sampling: Literal["batch", "sample"] = "batch"
    loss: LossConfig = field(default_factory=LossConfig)
    loss_by_path: dict[str, dict[str, Any]] = field(default_factory=dict)
    adversarial: AdversarialConfig | None = None
    checkpoint_every: int = 100
    keep_last: int = 2
    validate_every: int = 100
    val_images: int = 4
    val_crop_px: int | None = 128
    log_every: int = 10
    num_workers: int = 0
    threads: int | None = None
    init_weights: str | None = None
    seed: int = 0
    model: DMDiffConfig = field(default_factory=DMDiffConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` on out-of-range values or bad recipe stage overrides; return self."""
        self.validate_fields()
        self._validate_recipe()
        return self

    def validate_fields(self) -> None:
        """The range checks of :meth:`validate`, without the recipe (NaN and infinities never get
        this far: :func:`dmdiff.config.merge` rejects them)."""
        positive = ["crop_px", "batch_size", "grad_accum", "steps", "checkpoint_every", "keep_last", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "validate_every", "val_images", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_seed("seed", self.seed)
        _check_seed("model.seed", self.model.seed)
        if self.num_workers > MAX_THREADS:
            raise ConfigError(f"num_workers must be <= {MAX_THREADS}, got {self.num_workers}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must lie in (0, 1) or be null, got {self.ema_decay}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be in [1, {MAX_THREADS}] or null, got {self.threads}")
        if self.exposure_range is not None:
            lo, hi = self.exposure_range
            if not (0 < lo <= hi and math.isfinite(hi / lo)):  # the gain is lo · (hi / lo) ** u
                raise ConfigError(f"exposure_range must be [lo, hi] with 0 < lo <= hi (hi / lo a finite "
                                  f"number), or null, got {list(self.exposure_range)}")
            if self.model.anchor_wiener_nsr is not None:
                raise ConfigError("exposure_range cannot be combined with model.anchor_wiener_nsr: that colour "
                                  "anchor is computed once per whole training frame, before any re-exposure; "
                                  "set one of them to null")
        if self.val_crop_px is not None and self.val_crop_px < 1:
            raise ConfigError(f"val_crop_px must be >= 1 or null, got {self.val_crop_px}")
        for name in ("crop_px", "val_crop_px"):
            _check_svda_grid(name, getattr(self, name), self.model)
        probs = (self.path_probs.positive, self.path_probs.neutral, self.path_probs.negative)
        if not (all(p >= 0 for p in probs) and 0 < sum(probs) < math.inf):
            raise ConfigError(f"path_probs must be non-negative with a positive (finite) sum, got "
                              f"positive={probs[0]}, neutral={probs[1]}, negative={probs[2]}")
        self.loss.validate()
        self.path_losses()
        if self.adversarial is not None:
            self.adversarial.validate()

    def path_losses(self) -> dict[str, LossConfig]:
        """Each path's loss settings (``loss`` with its ``loss_by_path`` overrides), in :data:`PATHS`
        order, checked.

        Raises:
            ConfigError: an unknown path, a key other than :data:`PATH_LOSS_KEYS`, or a bad value
                (named ``loss_by_path.<path>.<key>``).
        """
        unknown = sorted(set(self.loss_by_path) - set(PATHS), key=repr)
        if unknown:
            raise ConfigError(f"loss_by_path: unknown path {unknown[0]!r}; the paths are {', '.join(PATHS)}")
        out = {}
        for path in PATHS:
            overrides = self.loss_by_path.get(path, {})
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"loss_by_path.{path}: expected a mapping of loss weights, got "
                                  f"{type(overrides).__name__}")
            shared = sorted(set(overrides) - set(PATH_LOSS_KEYS))
            if shared:
                raise ConfigError(f"loss_by_path.{path}.{shared[0]}: only the weights ({', '.join(PATH_LOSS_KEYS)}) "
                                  "may differ by path; the LPIPS network and the substitute are shared")
            out[path] = merge(self.loss, overrides, prefix=f"loss_by_path.{path}.").validate(f"loss_by_path.{path}")
        return out

    def adversarial_paths(self) -> tuple[str, ...]:
        """The paths trained with an adversarial term: ``adversarial.paths`` that are trained
        (``path_probs`` > 0), when ``adversarial`` is set with a positive weight; else ``()``."""
        if self.adversarial is None or self.adversarial.weight == 0:
            return ()
        probs = dict(zip(PATHS, self.path_probs.normalised()))
        return tuple(p for p in self.adversarial.paths if probs[p] > 0)

    def _validate_recipe(self) -> None:
        self.recipe.pseudo.validate("recipe.pseudo.")
        _check_seed("recipe.simulate_seed", self.recipe.simulate_seed)
        if not 0 <= self.recipe.alpha_tolerance_db < 100:
            raise ConfigError(f"recipe.alpha_tolerance_db must be in [0, 100) dB, got {self.recipe.alpha_tolerance_db}")
        if self.recipe.simulate is not None:
            try:
                resolve_config(self.recipe.simulate)
            except ConfigError as e:
                raise ConfigError(f"recipe.simulate: {e}") from None
        stages = {}
        for stage in ("stage1", "stage2"):
            if "recipe" in getattr(self.recipe, stage):
                raise ConfigError(f"recipe.{stage} may not override 'recipe'")
            stages[stage] = stage_config(self, stage)
        # the pseudo pairs are made by the stage-1 model
        _check_svda_grid("recipe.pseudo.size_px", self.recipe.pseudo.size_px, stages["stage1"].model)


def stage_config(cfg: TrainConfig, stage: str) -> TrainConfig:
    """``cfg`` with :data:`STAGE_BASE` and then ``cfg.recipe.<stage>`` (``"stage1"`` / ``"stage2"``)
    laid over it, checked.

    Raises:
        ConfigError: an override names an unknown key or has the wrong type / range; the message
            names the stage.
    """
    try:
        out = merge(merge(cfg, STAGE_BASE[stage]), getattr(cfg.recipe, stage))
        out.validate_fields()
    except ConfigError as e:
        raise ConfigError(f"recipe.{stage}: {e}") from None
    return out


def check_device_support(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` when this machine cannot train with ``cfg`` as it is: fp16 mixed
    precision needs a CUDA GPU (accelerate refuses fp16 on a CPU).

    Call it with the config that is trained (for a recipe, each stage's :func:`stage_config`); the
    checks of :meth:`TrainConfig.validate` hold on every machine, these depend on this one.
    """
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU and none is available here; use bf16 "
                          "or no on a CPU")


def load_train_config(source: str | Path | Mapping | None = None, **overrides: Any) -> TrainConfig:
    """:class:`TrainConfig` from defaults + a YAML file or mapping + keyword overrides, validated.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type or out-of-range value.
    """
    if source is not None and not isinstance(source, Mapping):
        source = Path(source)
    return load_config(TrainConfig, source, **overrides).validate()
