"""``dmdiff pretrain-backbone``: pretrain the tiny backbone once, the analogue of SD-Turbo's pretraining.

The ``tiny`` preset has no published weights. This module trains them, on a CPU in minutes, from
the bundled *training* photos (:data:`dmdiff.data.sources.TRAIN_PHOTOS`) and dead-leaves images generated
at the start of each run only; the *test* photos are used for evaluation and never for training.

Stage A, VAE as an autoencoder: random crops ``x`` (48–64 px, random scale, flips) in ``[-1, 1]``,
``x̂ = decode(sample(encode(x)))``, loss ``L1(x̂, x) + edge_weight · L1(∇x̂, ∇x) +
kl_weight · KL`` (KL per latent element, ``kl_weight`` = 1e-6 as in Stable Diffusion's VAE), AdamW
with a short warm-up and cosine decay over the wall-clock budget. Afterwards the VAE's
``scaling_factor`` is set to 1 / std of its latents on training crops (how SD's 0.18215 was
chosen), so that scaled latents have unit variance.

Stage B, UNet as a one-step denoiser at t = ``timestep`` (250; the step DMDiff then uses with
this backbone, recorded in the saved folder), VAE frozen: ``z = scaling · mode(encode(x_in))`` with
``x_in`` the clean crop or a mildly degraded one (Gaussian blur, Gaussian noise),
``ẑ0 = (z − sqrt(1 − ᾱ) · unet(z, t, text)) / sqrt(ᾱ)`` with ᾱ = ᾱ_t, loss
``MSE(ẑ0, scaling · mode(encode(x_clean)))``; after this stage the UNet starts DMDiff near a
restoring identity map. Why not SD-Turbo's t = 999: there ẑ0 = 14.6·z − 14.6·ε̂, so the tiny UNet
must reproduce 0.93·z through its group norms to within a small fraction of a per cent, and every
error in ε̂, colour shifts included, is amplified 14.6×; at t = 250 ẑ0 = 1.22·z − 0.70·ε̂ and the
input latent carries the image straight through (docs/tiny_backbone.md, "Why t = 250"). The text is the empty prompt half of the time, else a few random prompt words, so that the
map does not depend on the prompt (DMDiff's LoRA learns that dependence).

The text encoder keeps its random init (seeded, frozen): the tiny CLIP is never trained here, the
UNet learns to work with whatever embeddings it produces.

The result is saved with :func:`dmdiff.model.backbone.save_backbone` (SD-Turbo's diffusers layout,
safetensors) plus ``pretrain_report.json`` (settings, wall times, PSNRs before/after, versions),
built in a temporary folder and renamed into place. The number of steps depends on the machine's
speed (the stages are time-boxed), so two runs agree in quality, not bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

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
)
from dmdiff.data.sources import (
    TEST_PHOTOS,
    bundled_photos,
    dead_leaves,
    named_rng,
    photo_palette,
)
from dmdiff.errors import DmdiffError
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
from dmdiff.runinfo import provenance

REPORT_NAME = "pretrain_report.json"
LOGVAR_INIT = -6.0          # added to the VAE's initial log-variance output


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of :func:`pretrain_backbone`. Sizes in pixels, times in minutes."""

    vae_minutes: float = 10.0
    unet_minutes: float = 6.0
    max_steps: int | None = None        # per stage; None: only the wall-clock budget stops a stage
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


class CropSampler:
    """Random training crops of the TRAIN photos, of the corpus photos and of dead-leaves images made
    for this run.

    A crop of a bundled photo takes a square window of ``size · 2**u`` px (``u`` uniform in
    [-0.5, 1], clipped to the image), resizes it to ``size`` (bilinear, antialiased) and flips it at
    random; a crop of a corpus photo (:mod:`dmdiff.data.corpus`, kept as uint8) is taken at a scale a
    ``sensor_px`` sensor could see it at (:func:`dmdiff.data.corpus.multiscale_crop`). The
    ``dead_leaves_images`` dead-leaves images (``dead_leaves_px``² each, coloured from the training
    photos' palette) are generated once, here, from ``seed``: generating them per batch would take
    ~20 % of a CPU step.
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


def _autocast(cfg: PretrainConfig) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU for the VAE stage (AMX/AVX512-BF16 make its convs up to ~1.5×
    faster; the UNet stage, measured no faster, stays fp32), or nothing."""
    use = torch.ops.mkldnn._is_mkldnn_bf16_supported() if cfg.bf16 is None else cfg.bf16
    return torch.autocast("cpu", dtype=torch.bfloat16) if use else contextlib.nullcontext()


def _timeboxed(minutes: float, max_steps: int | None, desc: str, progress: bool) -> Iterator[tuple[int, float]]:
    """Yield ``(step, elapsed fraction of the budget)`` until the wall-clock budget or ``max_steps``
    is used up, with a tqdm bar in seconds that shows the step count."""
    budget = minutes * 60.0
    start = time.monotonic()
    step = 0
    with tqdm(total=round(budget), desc=desc, unit="s", disable=not progress, leave=False) as bar:
        while (elapsed := time.monotonic() - start) < budget and (max_steps is None or step < max_steps):
            bar.update(round(elapsed) - bar.n)
            bar.set_postfix(step=step, refresh=False)
            yield step, elapsed / budget
            step += 1


def _lr(base: float, step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 over the time budget."""
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _random_size(rng: np.random.Generator, cfg: PretrainConfig, multiple: int) -> int:
    return multiple * int(rng.integers(cfg.crop_min_px // multiple, cfg.crop_max_px // multiple + 1))


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(backbone: Backbone, sampler: CropSampler, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Stage A: train ``backbone.vae`` in place as an autoencoder (module docstring).

    Returns ``{"steps", "seconds", "final_loss"}`` (loss averaged over the last 20 steps).
    """
    vae = backbone.vae.train().requires_grad_(True)
    with torch.no_grad():   # posterior std starts at e^-3 instead of 1, so sampling noise starts small
        vae.quant_conv.bias[vae.config.latent_channels:] += LOGVAR_INIT
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = named_rng(cfg.seed, "pretrain/vae")
    losses, start = [], time.monotonic()
    for step, frac in _timeboxed(cfg.vae_minutes, cfg.max_steps, "pretrain VAE", progress):
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg.vae_lr, step, frac, cfg.warmup_steps)
        x = sampler.batch(cfg.batch_size, _random_size(rng, cfg, backbone.vae_scale_factor)) * 2 - 1
        with _autocast(cfg):
            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.sample()).sample.float()
        edge = sum(F.l1_loss(gy, gx) for gy, gx in zip(_gradients(y), _gradients(x)))
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(y, x) + cfg.edge_weight * edge + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return {"steps": len(losses), "seconds": round(time.monotonic() - start, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None}


@torch.no_grad()
def set_scaling_factor(backbone: Backbone, sampler: CropSampler, cfg: PretrainConfig) -> float:
    """Set the VAE's ``scaling_factor`` to 1 / std of its (unscaled, mode) latents on 4 batches of
    ``crop_max_px`` training crops, so that scaled latents have unit variance; returns the factor."""
    x = sampler.batch(4 * cfg.batch_size, cfg.crop_max_px)
    std = float(backbone.vae.encode(x * 2 - 1).latent_dist.mode().std())
    backbone.vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def train_unet(backbone: Backbone, sampler: CropSampler, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Stage B: train ``backbone.unet`` in place as a one-step denoiser at ``backbone.one_step_timestep``,
    VAE frozen.

    Returns ``{"steps", "seconds", "final_loss"}`` (latent MSE averaged over the last 20 steps).
    """
    unet = backbone.unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    rng = named_rng(cfg.seed, "pretrain/unet")
    losses, start = [], time.monotonic()
    for step, frac in _timeboxed(cfg.unet_minutes, cfg.max_steps, "pretrain UNet", progress):
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg.unet_lr, step, frac, cfg.warmup_steps)
        x = sampler.batch(cfg.batch_size, _random_size(rng, cfg, backbone.latent_multiple))
        with torch.no_grad():
            target = backbone.encode(x)
            z = backbone.encode(degrade_crops(x, cfg, rng))
            text = backbone.encode_prompt(random_prompts(len(x), rng))
        loss = F.mse_loss(backbone.one_step(z, text), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    return {"steps": len(losses), "seconds": round(time.monotonic() - start, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None}


@torch.no_grad()
def reconstruction_psnrs(backbone: Backbone, cfg: PretrainConfig) -> dict:
    """PSNRs (dB) on fixed ``eval_px``² crops of the train and the held-out (TEST) photos.

    ``vae_*``: ``decode(encode(x))`` vs ``x`` (mode of the posterior); ``unet_identity_*``: the
    one-step map with the empty prompt on a clean input, ``decode(ẑ0(encode(x)))`` vs ``x``;
    ``unet_identity_heldout_prompted`` the same with the prompt "a sharp, high quality photo".
    """
    out = {}
    texts = {"": backbone.encode_prompt(""), "_prompted": backbone.encode_prompt("a sharp, high quality photo")}
    for split, key in (("train", "train"), ("test", "heldout")):
        x = eval_crops(split, cfg.eval_px, cfg.eval_crops_per_photo, cfg.seed)
        z = backbone.encode(x)
        out[f"vae_{key}"] = psnr(backbone.decode(z), x)
        for suffix, text in texts.items():
            if key == "heldout" or not suffix:
                z0 = backbone.one_step(z, text.expand(len(x), -1, -1))
                out[f"unet_identity_{key}{suffix}"] = psnr(backbone.decode(z0), x)
    return {k: round(v, 2) for k, v in out.items()}


def pretrain_backbone(out: str | Path = TINY_ASSETS, cfg: PretrainConfig = PretrainConfig(), *,
                      overwrite: bool = False, unet_only: bool = False, progress: bool = True) -> dict:
    """Pretrain the tiny backbone from random init (stage A then stage B) and save it to ``out``.

    With ``unet_only`` the VAE (and text encoder) of the backbone already in ``out`` are kept and
    only stage B runs, from a random-init UNet; the report keeps the earlier VAE stage's figures
    (``stage_vae``, with the date of the run that trained it).

    ``out`` receives SD-Turbo's diffusers layout (safetensors) plus ``pretrain_report.json``; it is
    built in a temporary sibling folder and renamed into place, so readers never see a half-written
    folder. Loads back with ``load_backbone("tiny", path=out)`` (or with no path when ``out`` is the
    shipped :data:`~dmdiff.model.backbone.TINY_ASSETS`).

    Returns:
        the report (also written to the folder): settings, per-stage steps/seconds/loss, PSNRs (dB)
        of the random-init and of the pretrained backbone, the scaling factor, provenance.

    Raises:
        DmdiffError: ``out`` holds files that are not a backbone's (it is never replaced then), or
            a backbone and ``overwrite`` is False; with ``unet_only``, ``out`` holds no pretrained
            backbone.
    """
    out = Path(out)
    check_backbone_out(out, overwrite)
    start = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = load_backbone("tiny", pretrained=False, seed=cfg.seed)
        backbone.one_step_timestep = cfg.timestep
        photos = training_photos(cfg.corpus_root) if cfg.corpus_root else []
        sampler = CropSampler(cfg.seed, cfg.dead_leaves_fraction, cfg.dead_leaves_images, cfg.dead_leaves_px,
                              photos, cfg.sensor_px)
        before = reconstruction_psnrs(backbone, cfg)
        if unet_only:
            vae_stats, scaling = _reuse_vae(backbone, out)
        else:
            vae_stats = train_vae(backbone, sampler, cfg, progress)
            scaling = set_scaling_factor(backbone, sampler, cfg)
        unet_stats = train_unet(backbone, sampler, cfg, progress)
        after = reconstruction_psnrs(backbone, cfg)
    report = provenance(asdict(cfg), cfg.seed, stage_vae=vae_stats, stage_unet=unet_stats,
                        scaling_factor=round(scaling, 5), psnr_db_random_init=before, psnr_db=after,
                        total_seconds=round(time.monotonic() - start, 1), unet_only=unet_only,
                        timestep=cfg.timestep, torch_threads=torch.get_num_threads(), parameters=backbone.num_parameters(),
                        data={"train": sorted(sampler.names) + [f"{len(sampler.dead_leaves)} dead-leaves images (seeded)"],
                              "heldout_eval_only": list(TEST_PHOTOS), "corpus": corpus_record(photos)})
    save_backbone(backbone, out, overwrite=True, extra_json={REPORT_NAME: report})
    return report


def _reuse_vae(backbone: Backbone, folder: Path) -> tuple[dict, float]:
    """Put the VAE of the pretrained backbone in ``folder`` into ``backbone`` (in place); returns
    that run's VAE-stage figures (plus ``"trained_utc"``, when it ran) and its scaling factor."""
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
    return stats, float(vae.config.scaling_factor)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of this subcommand (the defaults are this module's own)."""
    defaults = PretrainConfig()
    smoke = smoke_preset("pretrain")
    parser.add_argument("--out", default=str(TINY_ASSETS), help="backbone folder to write (default: the shipped one)")
    parser.add_argument("--corpus", default=None, metavar="ROOT",
                        help="also train on the photos of the Debian packages plasma-workspace-wallpapers and "
                             "opencv-doc installed (ROOT /) or extracted (dpkg-deb -x) under ROOT "
                             "(dmdiff.data.corpus; default: the bundled photos only)")
    parser.add_argument("--vae-minutes", type=float, default=None,
                        help=f"wall-clock budget of the VAE stage (default {defaults.vae_minutes:g}, "
                             f"{smoke['vae_minutes']:g} with --smoke)")
    parser.add_argument("--unet-minutes", type=float, default=None,
                        help=f"wall-clock budget of the UNet stage (default {defaults.unet_minutes:g}, "
                             f"{smoke['unet_minutes']:g} with --smoke)")
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
    """CLI entry: ``dmdiff pretrain-backbone [--out DIR] [--vae-minutes M] [--unet-minutes M]
    [--timestep T] [--unet-only] [--seed S] [--smoke] [--overwrite]``; prints the PSNRs."""
    cfg = PretrainConfig(seed=args.seed, timestep=args.timestep, corpus_root=args.corpus)
    if args.smoke:
        cfg = replace(cfg, **smoke_preset("pretrain"))
    cfg = replace(cfg, **{k: v for k, v in (("vae_minutes", args.vae_minutes),
                                              ("unet_minutes", args.unet_minutes)) if v is not None})
    out = Path(args.out)
    report = pretrain_backbone(out, cfg, overwrite=args.overwrite or args.unet_only, unet_only=args.unet_only)
    print(f"wrote {out} in {report['total_seconds']:.0f} s "
          f"(VAE {report['stage_vae']['steps']} steps, UNet {report['stage_unet']['steps']} steps)")
    for key, value in report["psnr_db"].items():
        print(f"  {key:34s} {value:6.2f} dB   (random init {report['psnr_db_random_init'][key]:6.2f} dB)")
    return 0
