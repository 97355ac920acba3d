"""``dmdiff pretrain-backbone``: pretrain the tiny backbone, the analogue of SD-Turbo's pretraining.

The ``tiny`` preset has no published weights. This module trains them on a CPU from photographs
and procedural images, never from a test photo:

* the bundled *training* photos (:data:`dmdiff.data.sources.TRAIN_PHOTOS`);
* with ``corpus_root``, the photo corpus of :mod:`dmdiff.data.corpus` (photographs from Debian
  packages, cropped at the scales a ``sensor_px`` sensor would see them), less its validation
  photos, which are only scored;
* dead-leaves images generated from the seed at the start of the run.

Stage A, VAE as an autoencoder: random crops ``x`` (``crop_min_px``–``crop_max_px`` px) in
``[-1, 1]``, ``x̂ = decode(sample(encode(x)))``, loss ``L1(x̂, x) + edge_weight · L1(∇x̂, ∇x) +
kl_weight · KL`` (KL per latent element, ``kl_weight`` = 1e-6 as in Stable Diffusion's VAE), AdamW
with a short warm-up and cosine decay over ``vae_steps``. Afterwards the VAE's ``scaling_factor`` is
set to 1 / std of its latents on training crops (how SD's 0.18215 was chosen), so that scaled
latents have unit variance.

Stage B, UNet as a one-step denoiser at t = ``timestep`` (250; the step DMDiff then uses with this
backbone, recorded in the saved folder), VAE frozen: ``z = scaling · mode(encode(x_in))`` with
``x_in`` the clean crop or a mildly degraded one (Gaussian blur, Gaussian noise),
``ẑ0 = (z − sqrt(1 − ᾱ) · unet(z, t, text)) / sqrt(ᾱ)``, loss ``MSE(ẑ0, scaling · mode(encode(x_clean)))``
over ``unet_steps``; afterwards the UNet starts DMDiff near a restoring identity map. Why not
SD-Turbo's t = 999: there ẑ0 = 14.6·z − 14.6·ε̂ and every error of ε̂ is amplified 14.6×
(docs/tiny_backbone.md, "Why t = 250"). The text is the empty prompt half of the time, else a few
random words, so the map does not depend on the prompt (DMDiff's LoRA learns that dependence). The
text encoder keeps its seeded random init, frozen.

**Runs are defined by their steps and resume.** The configuration (:class:`PretrainConfig`, steps
included) and the seed determine the result; with the same number of torch threads a run is
reproduced bit for bit, however it is cut into sessions. A session may be time-boxed (``minutes``):
when the box is used up it writes a checkpoint into the run folder and stops, and the next session
(``resume=True``, ``--resume``) continues from it; a checkpoint is also written every
``checkpoint_minutes``, so a killed session loses at most that much. Checkpoints are the training
checkpoints of :mod:`dmdiff.train.checkpoint` (safetensors + JSON): the VAE's and UNet's weights,
the optimizer, every generator's state and the figures so far.

The finished backbone is saved with :func:`dmdiff.model.backbone.save_backbone` (SD-Turbo's
diffusers layout, safetensors) plus ``pretrain_report.json`` (settings, steps, time, sessions, the
corpus with its licences, PSNRs before/after on held-out crops, versions), built in a temporary
folder and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from dmdiff.config import smoke_preset
from dmdiff.data.corpus import (
    CorpusPhoto,
    corpus_record,
    multiscale_crop,
    training_photos,
    validation_photos,
)
from dmdiff.data.sources import (
    TEST_PHOTOS,
    bundled_photos,
    dead_leaves,
    named_rng,
    photo_palette,
)
from dmdiff.errors import EXIT_FAULT, ConfigError, DmdiffError, RunFault
from dmdiff.imageio import read_image
from dmdiff.metrics import psnr_torch
from dmdiff.model.backbone import (
    TINY_ASSETS,
    Backbone,
    check_backbone_out,
    check_timestep,
    load_backbone,
    save_backbone,
)
from dmdiff.model.tokenizer import WORDS
from dmdiff.outputs import claim_folder
from dmdiff.runinfo import provenance
from dmdiff.train import checkpoint as ckpt_io

REPORT_NAME = "pretrain_report.json"
RUN_KIND = "pretrain-backbone"
DEFAULT_RUN = Path("runs") / "pretrain-backbone"
LOGVAR_INIT = -6.0          # added to the VAE's initial log-variance output
KEEP_CHECKPOINTS = 2
LOSS_WINDOW = 20            # a stage's final loss: the mean of its last this many steps
STAGES = ("vae", "unet")


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of :func:`pretrain_backbone`: with the seed, they determine the result. Sizes in
    pixels, learning rates per AdamW step."""

    vae_steps: int = 20000
    unet_steps: int = 8000
    seed: int = 0
    batch_size: int = 8
    crop_min_px: int = 48               # training crop sides are drawn in [crop_min_px, crop_max_px]
    crop_max_px: int = 64
    dead_leaves_fraction: float = 0.5   # share of each batch cropped from dead-leaves images
    dead_leaves_images: int = 128       # generated at the start of each run (seeded)
    dead_leaves_px: int = 128
    corpus_root: str | None = None      # where the photo packages are (dmdiff.data.corpus); None: bundled only
    sensor_px: int = 256                # corpus crops: the scales at which a sensor this size sees a scene
    vae_lr: float = 2e-3
    unet_lr: float = 2e-3
    warmup_steps: int = 20
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    timestep: int = 250                 # stage B's (and then DMDiff's) one-step timestep
    degrade_prob: float = 0.5           # stage B: share of inputs that are blurred/noisy
    max_blur_sigma_px: float = 1.5
    max_noise_std: float = 0.03         # in [0, 1] image units
    bf16: bool | None = None            # VAE stage under bfloat16 autocast; None: where the CPU has bf16 units
    eval_px: int = 128                  # evaluation crop side
    eval_crops_per_photo: int = 4

    def __post_init__(self):
        check_timestep(self.timestep)
        for name in ("vae_steps", "unet_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not 1 <= self.crop_min_px <= self.crop_max_px:
            raise ConfigError(f"crop_min_px and crop_max_px must satisfy 1 <= min <= max, got "
                              f"{self.crop_min_px} and {self.crop_max_px}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")

    def steps(self, stage: str) -> int:
        """The optimizer steps of ``stage`` (``"vae"`` or ``"unet"``)."""
        return getattr(self, f"{stage}_steps")


#: Settings a resumed run may change: where the corpus is (its photos are compared instead).
RESUMABLE_CHANGES = ("corpus_root",)


class CropSampler:
    """Random training crops of the TRAIN photos, of the corpus photos and of dead-leaves images made
    for this run.

    A crop of a bundled photo takes a square window of ``size · 2**u`` px (``u`` uniform in
    [-0.5, 1], clipped to the image), resizes it to ``size`` (bilinear, antialiased) and flips it at
    random; a crop of a corpus photo (:mod:`dmdiff.data.corpus`, kept as uint8) is taken at a scale a
    ``sensor_px`` sensor could see it at (:func:`dmdiff.data.corpus.multiscale_crop`). The
    ``dead_leaves_images`` dead-leaves images (``dead_leaves_px``² each, coloured from the training
    photos' palette) are generated once, here, from ``seed``: generating them per batch would take
    ~20 % of a CPU step. ``rng`` (seeded from ``seed``) draws every crop; its state is part of a
    pretraining checkpoint.
    """

    def __init__(self, seed: int, dead_leaves_fraction: float, dead_leaves_images: int = 128,
                 dead_leaves_px: int = 128, corpus: Sequence[CorpusPhoto] = (), sensor_px: int = 256):
        self.photos = bundled_photos("train")
        self.corpus = {p.name: np.rint(read_image(p.path) * 255).astype(np.uint8) for p in corpus}
        self.sensor_px = sensor_px
        leaked = set(self.photos) & set(TEST_PHOTOS)
        assert not leaked, f"test photos in the pretraining set: {sorted(leaked)}"
        self.names = sorted(self.photos) + sorted(self.corpus)
        self.dead_leaves_fraction = dead_leaves_fraction
        palette = photo_palette()
        self.dead_leaves = [dead_leaves(dead_leaves_px, named_rng(seed, f"pretrain/deadleaves_{k:03d}"),
                                        palette=palette) for k in range(dead_leaves_images)]
        self.rng = named_rng(seed, "pretrain/crops")

    def _crop(self, image: np.ndarray, size: int) -> torch.Tensor:
        h, w, _ = image.shape
        side = min(h, w, round(size * 2 ** self.rng.uniform(-0.5, 1.0)))
        y, x = self.rng.integers(0, h - side + 1), self.rng.integers(0, w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(image[y:y + side, x:x + side])).permute(2, 0, 1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        flips = [d for d, p in ((1, 0.5), (2, 0.5)) if self.rng.uniform() < p]
        return crop.flip(flips) if flips else crop

    def batch(self, n: int, size: int) -> torch.Tensor:
        """``(n, 3, size, size)`` float32 sRGB in [0, 1]."""
        images = []
        for _ in range(n):
            if self.rng.uniform() < self.dead_leaves_fraction:
                image = self.dead_leaves[self.rng.integers(len(self.dead_leaves))]
            else:
                name = self.names[self.rng.integers(len(self.names))]
                if name in self.corpus:
                    crop = multiscale_crop(self.corpus[name], size, self.rng, self.sensor_px)
                    images.append(torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))))
                    continue
                image = self.photos[name]
            images.append(self._crop(image, size))
        return torch.stack(images).clamp(0, 1)


def eval_crops(split: str, size: int, per_photo: int, seed: int = 0) -> torch.Tensor:
    """Fixed ``size``² crops at native scale of the bundled photos of ``split`` ("train" / "test").

    Returns ``(n_photos · per_photo, 3, size, size)`` float32 sRGB in [0, 1]; positions depend only
    on ``(seed, photo name)``.
    """
    crops = []
    for name, image in bundled_photos(split).items():
        rng = named_rng(seed, f"pretrain/eval/{name}")
        h, w, _ = image.shape
        for _ in range(per_photo):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            crops.append(torch.from_numpy(np.ascontiguousarray(image[y:y + size, x:x + size])).permute(2, 0, 1))
    return torch.stack(crops)


def corpus_eval_crops(photos: Sequence[CorpusPhoto], size: int, per_photo: int, seed: int = 0,
                      sensor_px: int = 256) -> torch.Tensor:
    """Fixed ``size``² crops of corpus photos at the scales a ``sensor_px`` sensor sees them
    (:func:`~dmdiff.data.corpus.multiscale_crop`), ``(len(photos) · per_photo, 3, size, size)``
    float32 in [0, 1]; the crops depend only on ``(seed, photo name)``."""
    crops = []
    for photo in photos:
        image, rng = read_image(photo.path), named_rng(seed, f"pretrain/eval/{photo.name}")
        crops += [torch.from_numpy(multiscale_crop(image, size, rng, sensor_px).transpose(2, 0, 1).copy())
                  for _ in range(per_photo)]
    return torch.stack(crops)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) between ``(B, 3, H, W)`` images in [0, 1] (clamped)."""
    return float(psnr_torch(a.clamp(0, 1), b.clamp(0, 1)).mean())


def degrade_crops(x: torch.Tensor, cfg: PretrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Mild degradation of ``(B, 3, H, W)`` images in [0, 1]: with probability ``cfg.degrade_prob``
    each image gets a Gaussian blur (σ uniform in [0, max_blur_sigma_px]) and Gaussian noise (std
    uniform in [0, max_noise_std]); the others stay clean."""

    out = []
    for image in x:
        if rng.uniform() < cfg.degrade_prob:
            sigma = rng.uniform(0, cfg.max_blur_sigma_px)
            if sigma > 0.2:
                image = gaussian_blur(image, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
            noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
            image = (image + rng.uniform(0, cfg.max_noise_std) * noise).clamp(0, 1)
        out.append(image)
    return torch.stack(out)


def random_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts: empty with probability 1/2, else 1–8 random words of the tokenizer's word list."""
    words = WORDS.split()
    return ["" if rng.uniform() < 0.5 else " ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(n)]


def _lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at step ``total``."""
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def _random_size(rng: np.random.Generator, cfg: PretrainConfig, multiple: int) -> int:
    return multiple * int(rng.integers(cfg.crop_min_px // multiple, cfg.crop_max_px // multiple + 1))


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


# ---- the run's state, one step of each stage ------------------------------------------------------


@dataclass
class Pretraining:
    """A pretraining run between two steps: everything a checkpoint holds.

    stage: ``"vae"``, ``"unet"`` or ``"done"``; step: steps done in that stage.
    stats: per stage ``{"steps", "seconds", "losses"}`` (``losses``: the last :data:`LOSS_WINDOW`).
    before: the PSNRs of the random-init backbone (:func:`reconstruction_psnrs`).
    """

    cfg: PretrainConfig
    backbone: Backbone
    sampler: CropSampler
    photos: list[CorpusPhoto]            # the corpus photos trained on (the report lists their licences)
    validation: list[CorpusPhoto]
    bf16: bool
    unet_only: bool
    rngs: dict[str, np.random.Generator] = field(default_factory=dict)
    stage: str = "vae"
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    stats: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    sessions: int = 1
    extra_vae: dict | None = None        # --unet-only: the VAE stage of the run that trained the VAE

    def network(self, stage: str | None = None) -> torch.nn.Module:
        return getattr(self.backbone, stage or self.stage)

    @property
    def global_step(self) -> int:
        """Steps done over both stages (names the checkpoint)."""
        return sum(s["steps"] for s in self.stats.values())

    def begin_stage(self, stage: str) -> None:
        """Enter ``stage`` at its step 0 with a fresh AdamW (the VAE's mode also shrinks its initial
        posterior std, so that the sampling noise starts small)."""
        self.stage, self.step, self.optimizer = stage, 0, None
        if stage == "done":
            return
        self.stats.setdefault(stage, {"steps": 0, "seconds": 0.0, "losses": []})
        if stage == "vae":
            with torch.no_grad():
                self.backbone.vae.quant_conv.bias[self.backbone.vae.config.latent_channels:] += LOGVAR_INIT
        self.optimizer = _optimizer(self)


def _base_lr(cfg: PretrainConfig, stage: str) -> float:
    return cfg.vae_lr if stage == "vae" else cfg.unet_lr


def _optimizer(run: Pretraining) -> torch.optim.Optimizer:
    """A fresh AdamW over the current stage's network."""
    return torch.optim.AdamW(run.network().parameters(), lr=_base_lr(run.cfg, run.stage), weight_decay=0.0)


def vae_loss(run: Pretraining, x: torch.Tensor) -> torch.Tensor:
    """Stage A's loss on ``(B, 3, H, W)`` crops in [0, 1] (module docstring)."""
    vae, cfg = run.backbone.vae, run.cfg
    x = x * 2 - 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if run.bf16 else contextlib.nullcontext()
    with autocast:
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample.float()
    edge = sum(F.l1_loss(gy, gx) for gy, gx in zip(_gradients(y), _gradients(x)))
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.l1_loss(y, x) + cfg.edge_weight * edge + cfg.kl_weight * kl


def unet_loss(run: Pretraining, x: torch.Tensor) -> torch.Tensor:
    """Stage B's loss on ``(B, 3, H, W)`` crops in [0, 1]: latent MSE of the one-step prediction."""
    backbone, rng = run.backbone, run.rngs["unet"]
    with torch.no_grad():
        target = backbone.encode(x)
        z = backbone.encode(degrade_crops(x, run.cfg, rng))
        text = backbone.encode_prompt(random_prompts(len(x), rng))
    return F.mse_loss(backbone.one_step(z, text), target)


LOSSES = {"vae": vae_loss, "unet": unet_loss}


def train_step(run: Pretraining) -> float:
    """One optimizer step of the current stage; returns its loss."""
    cfg, rng = run.cfg, run.rngs[run.stage]
    for group in run.optimizer.param_groups:
        group["lr"] = _lr(_base_lr(cfg, run.stage), run.step, cfg.steps(run.stage), cfg.warmup_steps)
    multiple = run.backbone.vae_scale_factor if run.stage == "vae" else run.backbone.latent_multiple
    x = run.sampler.batch(cfg.batch_size, _random_size(rng, cfg, multiple))
    loss = LOSSES[run.stage](run, x)
    if not torch.isfinite(loss):
        raise RunFault(f"pretraining, {run.stage.upper()} stage, step {run.step}: the loss is {loss.item()}; the "
                       "checkpoints written so far are kept. Lower the learning rate and start a new run")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.network().parameters(), 1.0)
    run.optimizer.step()
    run.step += 1
    stats = run.stats[run.stage]
    stats["steps"] = run.step
    stats["losses"] = (stats["losses"] + [loss.item()])[-LOSS_WINDOW:]
    return loss.item()


@torch.no_grad()
def set_scaling_factor(backbone: Backbone, sampler: CropSampler, cfg: PretrainConfig) -> float:
    """Set the VAE's ``scaling_factor`` to 1 / std of its (unscaled, mode) latents on 4 batches of
    ``crop_max_px`` training crops, so that scaled latents have unit variance; returns the factor."""
    x = sampler.batch(4 * cfg.batch_size, cfg.crop_max_px)
    std = float(backbone.vae.encode(x * 2 - 1).latent_dist.mode().std())
    backbone.vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


@torch.no_grad()
def reconstruction_psnrs(backbone: Backbone, cfg: PretrainConfig,
                         validation: Sequence[CorpusPhoto] = ()) -> dict:
    """PSNRs (dB) on fixed ``eval_px``² crops of the train and the held-out (TEST) photos, and of the
    corpus's validation photos when given.

    ``vae_*``: ``decode(encode(x))`` vs ``x`` (mode of the posterior); ``unet_identity_*``: the
    one-step map with the empty prompt on a clean input, ``decode(ẑ0(encode(x)))`` vs ``x``;
    ``unet_identity_heldout_prompted`` the same with the prompt "a sharp, high quality photo".
    Keys of the validation photos end in ``_corpus_validation``.
    """
    out = {}
    texts = {"": backbone.encode_prompt(""), "_prompted": backbone.encode_prompt("a sharp, high quality photo")}
    sets = {"train": eval_crops("train", cfg.eval_px, cfg.eval_crops_per_photo, cfg.seed),
            "heldout": eval_crops("test", cfg.eval_px, cfg.eval_crops_per_photo, cfg.seed)}
    if validation:
        sets["corpus_validation"] = corpus_eval_crops(validation, cfg.eval_px, cfg.eval_crops_per_photo,
                                                      cfg.seed, cfg.sensor_px)
    for key, x in sets.items():
        z = backbone.encode(x)
        out[f"vae_{key}"] = psnr(backbone.decode(z), x)
        for suffix, text in texts.items():
            if key == "heldout" or not suffix:
                z0 = backbone.one_step(z, text.expand(len(x), -1, -1))
                out[f"unet_identity_{key}{suffix}"] = psnr(backbone.decode(z0), x)
    return {k: round(v, 2) for k, v in out.items()}


# ---- sessions, checkpoints ----------------------------------------------------------------------


class SessionClock:
    """The wall clock of one session: its time box (``minutes``, None: none) and the checkpoint
    interval (``checkpoint_minutes``). A session always makes at least one step."""

    def __init__(self, minutes: float | None, checkpoint_minutes: float):
        self.budget = None if minutes is None else 60.0 * minutes
        self.every = 60.0 * checkpoint_minutes
        self.start = self.last_checkpoint = time.monotonic()
        self.steps = 0

    def out_of_time(self) -> bool:
        return self.budget is not None and self.steps > 0 and time.monotonic() - self.start >= self.budget

    def stepped(self) -> None:
        self.steps += 1

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self.last_checkpoint >= self.every

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()


def _record(run: Pretraining) -> dict:
    """The JSON part of a checkpoint (``extra`` of :func:`dmdiff.train.checkpoint.write_checkpoint`)."""
    return {"kind": RUN_KIND, "config": asdict(run.cfg), "unet_only": run.unet_only, "bf16": run.bf16,
            "stage": run.stage, "stage_step": run.step, "stats": run.stats, "before": run.before,
            "sessions": run.sessions, "extra_vae": run.extra_vae,
            "scaling_factor": float(run.backbone.vae.config.scaling_factor),
            "corpus": sorted(run.sampler.corpus),
            "generators": {"crops": run.sampler.rng.bit_generator.state,
                           **{k: g.bit_generator.state for k, g in run.rngs.items()}}}


def save_checkpoint(run: Pretraining, run_dir: Path) -> Path:
    """Write ``RUN/checkpoint-<global step>`` (atomic) and keep the :data:`KEEP_CHECKPOINTS` newest."""
    step = run.global_step
    folder = ckpt_io.partial_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_io.write_rng(folder, 0)
    model = {f"{name}.{k}": v for name in STAGES for k, v in run.network(name).state_dict().items()}
    optimizer = run.optimizer.state_dict() if run.optimizer is not None else {"state": {}, "param_groups": []}
    path = ckpt_io.write_checkpoint(folder, step, model=model, optimizer=optimizer, ema=None,
                                    samples_seen=step * run.cfg.batch_size, world_size=1, extra=_record(run))
    ckpt_io.prune(run_dir, KEEP_CHECKPOINTS)
    return path


def _check_same_run(run: Pretraining, record: dict, path: Path) -> None:
    """Raise unless the checkpoint ``record`` was written by a run of the same settings."""
    now = {**asdict(run.cfg), "unet_only": run.unet_only, "corpus photos": sorted(run.sampler.corpus)}
    then = {**record.get("config", {}), "unet_only": record.get("unet_only"), "corpus photos": record.get("corpus")}
    changed = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != then.get(k)]
    if record.get("kind") != RUN_KIND or changed:
        what = ", ".join(f"{k} {then.get(k)!r} then, {now[k]!r} now" for k in changed[:4]) or "not a pretraining run"
        raise DmdiffError(f"{path} was written by a pretraining run with other settings ({what}); resume "
                          "it with the same settings, or start a new run in another --run folder")


def load_checkpoint_into(run: Pretraining, state: ckpt_io.Checkpoint) -> None:
    """Put a checkpoint's weights, optimizer, generators and figures into ``run`` (in place)."""
    record = state.state["extra"]
    _check_same_run(run, record, state.path)
    for name in STAGES:
        prefix = f"{name}."
        run.network(name).load_state_dict({k[len(prefix):]: v for k, v in state.model.items() if k.startswith(prefix)})
    run.backbone.vae.register_to_config(scaling_factor=record["scaling_factor"])
    run.stats, run.before, run.extra_vae = record["stats"], record["before"], record["extra_vae"]
    run.bf16, run.sessions = record["bf16"], record["sessions"] + 1
    run.stage, run.step = record["stage"], record["stage_step"]
    run.optimizer = None if run.stage == "done" else _optimizer(run)
    if run.optimizer is not None:
        run.optimizer.load_state_dict(state.optimizer)
    ckpt_io.restore_rng(state.rng)
    run.sampler.rng.bit_generator.state = record["generators"]["crops"]
    for name, generator in run.rngs.items():
        generator.bit_generator.state = record["generators"][name]


def advance(run: Pretraining, clock: SessionClock, run_dir: Path, progress: bool = True) -> bool:
    """Train until the run is done (True) or the session's time box is used up (False), writing
    checkpoints on the clock's schedule."""
    while run.stage != "done":
        stage, total = run.stage, run.cfg.steps(run.stage)
        network = run.network().train().requires_grad_(True)
        stats = run.stats[stage]
        with tqdm(total=total, initial=run.step, desc=f"pretrain {stage.upper()}", unit="step",
                  disable=not progress, leave=False) as bar:
            while run.step < total:
                if clock.out_of_time():
                    network.eval().requires_grad_(False)
                    return False
                start = time.monotonic()
                loss = train_step(run)
                stats["seconds"] = round(stats["seconds"] + time.monotonic() - start, 1)
                clock.stepped()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if clock.checkpoint_due():
                    save_checkpoint(run, run_dir)
                    clock.checkpointed()
        network.eval().requires_grad_(False)
        if stage == "vae":
            set_scaling_factor(run.backbone, run.sampler, run.cfg)
        run.begin_stage(STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else "done")
    return True


# ---- the whole run ----------------------------------------------------------------------------------


def _bf16_default(cfg: PretrainConfig) -> bool:
    """Whether the VAE stage runs under bfloat16 autocast: ``cfg.bf16``, or (None) where the CPU has
    bf16 units (AMX/AVX512-BF16 make its convs up to ~1.5× faster; the UNet stage, measured no
    faster, stays fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if cfg.bf16 is None else cfg.bf16


def start_run(cfg: PretrainConfig, out: Path, unet_only: bool, score: bool = True) -> Pretraining:
    """A new run at its first step: random-init backbone (seed), the crop sampler over the bundled
    photos, the corpus (less its validation photos) and dead leaves, and (``score``) the random-init
    PSNRs; with ``unet_only`` the VAE of the backbone in ``out`` and its report's VAE figures."""
    backbone = load_backbone("tiny", pretrained=False, seed=cfg.seed)
    backbone.one_step_timestep = cfg.timestep
    photos = training_photos(cfg.corpus_root) if cfg.corpus_root else []
    validation = validation_photos(cfg.corpus_root) if cfg.corpus_root else []
    sampler = CropSampler(cfg.seed, cfg.dead_leaves_fraction, cfg.dead_leaves_images, cfg.dead_leaves_px,
                          photos, cfg.sensor_px)
    run = Pretraining(cfg, backbone, sampler, photos, validation, _bf16_default(cfg), unet_only,
                      rngs={stage: named_rng(cfg.seed, f"pretrain/{stage}") for stage in STAGES})
    if score:
        run.before = reconstruction_psnrs(backbone, cfg, validation)
    if unet_only:
        run.extra_vae = _reuse_vae(backbone, out)
        run.begin_stage("unet")
    else:
        run.begin_stage("vae")
    return run


def pretrain_backbone(out: str | Path = TINY_ASSETS, cfg: PretrainConfig = PretrainConfig(), *,
                      run_dir: str | Path = DEFAULT_RUN, resume: bool = False, minutes: float | None = None,
                      checkpoint_minutes: float = 10.0, overwrite: bool = False, unet_only: bool = False,
                      progress: bool = True) -> dict:
    """Pretrain the tiny backbone (stage A then stage B, module docstring) and save it to ``out``.

    Args:
        out: the backbone folder to write when the run is done (SD-Turbo's diffusers layout plus
            ``pretrain_report.json``, built in a temporary sibling and renamed into place; loads with
            ``load_backbone("tiny", path=out)``).
        cfg: the run's settings.
        run_dir: the run folder, for checkpoints (a new or empty folder, or this kind's).
        resume: continue from the newest good checkpoint in ``run_dir`` (same settings required).
        minutes: this session's time box (None: until done); when it is used up a checkpoint is
            written and the run stops unfinished.
        checkpoint_minutes: how often a checkpoint is written during a session.
        unet_only: keep the VAE (and its report entry) of the backbone already in ``out`` and run
            stage B only, from a random-init UNet.

    Returns:
        the report: ``finished`` False (with ``stage``, ``step``, ``steps``, ``checkpoint``) when the
        time box stopped the session; else everything also written to the folder: settings,
        per-stage steps/seconds/loss, sessions, the corpus with licences, PSNRs (dB) of the
        random-init and of the pretrained backbone, the scaling factor, provenance.

    Raises:
        DmdiffError: ``out`` holds files that are not a backbone's (it is never replaced then), or a
            backbone and ``overwrite`` is False; ``run_dir`` holds a checkpoint and ``resume`` is
            False, or none and ``resume`` is True, or one of other settings; with ``unet_only``,
            ``out`` holds no pretrained backbone.
    """
    out, run_dir = Path(out), Path(run_dir)
    check_backbone_out(out, overwrite)
    run_dir = claim_folder(run_dir, RUN_KIND)
    ckpt_io.clean_partial(run_dir)
    existing = ckpt_io.list_checkpoints(run_dir)
    if existing and not resume:
        raise DmdiffError(f"{run_dir} holds an earlier pretraining's checkpoint ({existing[-1][1].name}); pass "
                          "--resume (resume=True) to continue it, or choose another --run folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        run = start_run(cfg, out, unet_only, score=not resume)
        if resume:
            state = ckpt_io.find_checkpoint(run_dir, "latest")
            if state is None:
                raise DmdiffError(f"--resume: {run_dir} holds no checkpoint to continue; run without --resume")
            load_checkpoint_into(run, state)
        clock = SessionClock(minutes, checkpoint_minutes)
        finished = advance(run, clock, run_dir, progress)
        checkpoint = save_checkpoint(run, run_dir)
        if not finished:
            return {"finished": False, "stage": run.stage, "step": run.step, "steps": cfg.steps(run.stage),
                    "checkpoint": str(checkpoint), "sessions": run.sessions}
        after = reconstruction_psnrs(run.backbone, cfg, run.validation)
    report = _report(run, after)
    save_backbone(run.backbone, out, overwrite=True, extra_json={REPORT_NAME: report})
    return report


def _stage_summary(stats: dict) -> dict:
    losses = stats.get("losses", [])
    return {"steps": stats["steps"], "seconds": stats["seconds"],
            "final_loss": float(np.mean(losses)) if losses else None}


def _report(run: Pretraining, after: dict) -> dict:
    """The ``pretrain_report.json`` of a finished run."""
    cfg = run.cfg
    vae = run.extra_vae if run.unet_only else _stage_summary(run.stats["vae"])
    unet = _stage_summary(run.stats["unet"])
    trained_seconds = sum(s["seconds"] for s in run.stats.values())
    return provenance(asdict(cfg), cfg.seed, finished=True, stage_vae=vae, stage_unet=unet,
                      sessions=run.sessions, training_seconds=round(trained_seconds, 1),
                      crops_seen=run.global_step * cfg.batch_size, bf16=run.bf16,
                      scaling_factor=round(float(run.backbone.vae.config.scaling_factor), 5),
                      psnr_db_random_init=run.before, psnr_db=after, unet_only=run.unet_only,
                      timestep=cfg.timestep, torch_threads=torch.get_num_threads(),
                      parameters=run.backbone.num_parameters(),
                      data={"train": sorted(run.sampler.names) + [f"{len(run.sampler.dead_leaves)} dead-leaves images (seeded)"],
                            "heldout_eval_only": list(TEST_PHOTOS) + [p.name for p in run.validation],
                            "corpus": corpus_record(run.photos),
                            "corpus_validation": corpus_record(run.validation)["packages"]})


def _reuse_vae(backbone: Backbone, folder: Path) -> dict:
    """Put the VAE of the pretrained backbone in ``folder`` into ``backbone`` (in place); returns
    that run's VAE-stage figures (plus ``"trained_utc"``)."""
    report_path = folder / REPORT_NAME
    if not (folder / "model_index.json").is_file() or not report_path.is_file():
        raise DmdiffError(f"--unet-only keeps the VAE of a pretrained backbone, but {folder} holds none "
                          f"(no model_index.json / {REPORT_NAME}); run without --unet-only first")
    previous = json.loads(report_path.read_text())
    vae = load_backbone("tiny", path=folder).vae
    backbone.vae.load_state_dict(vae.state_dict())
    backbone.vae.register_to_config(scaling_factor=vae.config.scaling_factor)
    stats = dict(previous["stage_vae"])
    stats.setdefault("trained_utc", previous.get("created_utc"))
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    defaults = PretrainConfig()
    smoke = smoke_preset("pretrain")
    parser.add_argument("--out", default=str(TINY_ASSETS), help="backbone folder to write (default: the shipped one)")
    parser.add_argument("--run", default=str(DEFAULT_RUN), metavar="DIR",
                        help="run folder for the checkpoints (default %(default)s)")
    parser.add_argument("--corpus", default=None, metavar="ROOT",
                        help="also train on the photos of the Debian packages plasma-workspace-wallpapers and "
                             "opencv-doc installed (ROOT /) or extracted (dpkg-deb -x) under ROOT "
                             "(dmdiff.data.corpus; default: the bundled photos only)")
    parser.add_argument("--vae-steps", type=int, default=None,
                        help=f"steps of the VAE stage (default {defaults.vae_steps}, {smoke['vae_steps']} with --smoke)")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help=f"steps of the UNet stage (default {defaults.unet_steps}, {smoke['unet_steps']} with --smoke)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time box of this session: when it is used up, write a checkpoint and stop "
                             "(exit status 3); rerun with --resume to continue (default: run to the end)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0,
                        help="write a checkpoint this often (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run from its newest checkpoint")
    parser.add_argument("--timestep", type=int, default=defaults.timestep, metavar="T",
                        help="the UNet's one-step timestep, 0-999 (default %(default)s; SD-Turbo's is 999; "
                             "docs/tiny_backbone.md)")
    parser.add_argument("--unet-only", action="store_true",
                        help="keep the VAE of the backbone in --out and retrain only the UNet (from random init)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny crops, for quick checks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing backbone in --out (only a backbone folder that holds nothing else)")


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``dmdiff pretrain-backbone [--out DIR] [--run DIR] [--corpus ROOT] [--vae-steps N]
    [--unet-steps N] [--minutes M] [--resume] [--timestep T] [--unet-only] [--seed S] [--smoke]
    [--overwrite]``; prints the PSNRs, or where an unfinished run stopped (status 3)."""
    if args.minutes is not None and args.minutes < 0 or args.checkpoint_minutes <= 0:
        raise DmdiffError("--minutes must be >= 0 and --checkpoint-minutes > 0")
    cfg = PretrainConfig(seed=args.seed, timestep=args.timestep, corpus_root=args.corpus)
    if args.smoke:
        cfg = replace(cfg, **smoke_preset("pretrain"))
    cfg = replace(cfg, **{k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps))
                          if v is not None})
    out = Path(args.out)
    report = pretrain_backbone(out, cfg, run_dir=args.run, resume=args.resume, minutes=args.minutes,
                               checkpoint_minutes=args.checkpoint_minutes,
                               overwrite=args.overwrite or args.unet_only, unet_only=args.unet_only)
    if not report["finished"]:
        print(f"time box used up: {report['stage'].upper()} stage at step {report['step']} of {report['steps']} "
              f"(session {report['sessions']}); checkpoint {report['checkpoint']}. Run the same command with "
              "--resume to continue.", file=sys.stderr)
        return EXIT_FAULT
    print(f"wrote {out} after {report['training_seconds']:.0f} s of training in {report['sessions']} session(s) "
          f"(VAE {report['stage_vae']['steps']} steps, UNet {report['stage_unet']['steps']} steps)")
    for key, value in report["psnr_db"].items():
        print(f"  {key:40s} {value:6.2f} dB   (random init {report['psnr_db_random_init'][key]:6.2f} dB)")
    return 0
