"""``DMDiffPipeline``: a diffusers pipeline around a trained :class:`~dmdiff.model.dmdiff.DMDiff`.

It takes photos as PIL images, numpy arrays or tensors, one or a list of any sizes, and returns
restored numpy images (the package's ``(H, W, 3)`` float32 ``[0, 1]`` convention), optionally with
the cached two-path latents for instant re-decoding at another α (:meth:`DMDiffPipeline.decode`).

Folder layout of ``save_pretrained`` / ``from_pretrained`` (safetensors only; docs/architecture.md,
"Pipeline folder layout")::

    FOLDER/
      dmdiff_config.json              format tag, DMDiffConfig, backbone reference, provenance
      dmdiff_trainable.safetensors    DMDiff.trainable_state_dict(): LoRA A/B, unet.conv_in, SVDA, MLPs
      anchor_psf.safetensors          models with a deconvolved colour anchor only: ``psf`` (3, K, K)
      backbone/                       tiny preset only: the base backbone in SD-Turbo's layout

There is no top-level ``model_index.json``: ``DiffusionPipeline.from_pretrained`` cannot build this
class from a folder anyway, and ``backbone/`` keeps its own for ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file

from dmdiff.config import merge, to_dict
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.backbone import PICKLE_SUFFIXES, Backbone, load_backbone, save_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig, RestoreLatents, check_alpha
from dmdiff.runinfo import atomic_directory, provenance, write_json

FORMAT = "dmdiff-pipeline"
FORMAT_VERSION = 1
CONFIG_FILE = "dmdiff_config.json"
TRAINABLE_FILE = "dmdiff_trainable.safetensors"
ANCHOR_PSF_FILE = "anchor_psf.safetensors"
BACKBONE_DIR = "backbone"


class ImageInputError(DmdiffError, ValueError):
    """An input image or map has a type, shape or value range the pipeline cannot use."""


@dataclass
class DMDiffPipelineOutput(BaseOutput):
    """images: restored images, float32 ``(H, W, 3)`` in ``[0, 1]``, one per input image.
    latents: with ``return_latents=True``, one :class:`RestoreLatents` (batch of 1) per image."""

    images: list[np.ndarray]
    latents: list[RestoreLatents] | None = None


class DMDiffPipeline(DiffusionPipeline):
    """Restoration pipeline: the backbone components plus the DMDiff model that adapts them.

    ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` must be the model's own
    (its backbone's); :meth:`from_model` fills them in. ``.to(device, dtype)`` works as in diffusers.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, model: DMDiff):
        super().__init__()
        backbone = model.backbone
        given = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        wrong = [name for name, module in given.items() if module is not getattr(backbone, name)]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} must be the DMDiff model's own backbone components; "
                              "use DMDiffPipeline.from_model(model)")
        self.register_modules(**given, model=model)

    @classmethod
    def from_model(cls, model: DMDiff) -> DMDiffPipeline:
        """The pipeline of a (trained) model, sharing its modules."""
        b = model.backbone
        return cls(b.unet, b.vae, b.text_encoder, b.tokenizer, b.scheduler, model)

    # ------------------------------------------------------------------ inference

    def __call__(self, images, maps=None, alpha: float = 1.0, return_latents: bool = False) -> DMDiffPipelineOutput:
        """Restore one image or a list of images, one by one (sizes may differ).

        Args:
            images: an image or a list of them; each a PIL image (converted to RGB, alpha dropped),
                a numpy array ``(H, W, 3)`` or ``(H, W)`` (uint8 / 255, uint16 / 65535, or float in
                ``[0, 1]``), or a tensor ``(3, H, W)`` / ``(B, 3, H, W)`` (float in ``[0, 1]`` or
                uint8). A ``(B, 3, H, W)`` tensor (alone or in the list) counts as B images.
            maps: None, or the optics maps ``(7, G, G)`` (numpy or tensor, ``MAP_CHANNELS`` order)
                of each image: one for a single image, a list (items may be None) or a
                ``(B, 7, G, G)`` array parallel to ``images``.
            alpha: in ``[0, 1.2]``: 0 fidelity (neutral path), 1 perceptual (positive path).
            return_latents: also return the cached latents, for :meth:`decode`.
        """
        alpha = check_alpha(alpha)
        items = as_images(images)
        map_items = as_maps(maps, len(items))
        outputs, latents = [], []
        for image, image_maps in zip(self.progress_bar(items), map_items):
            batch_maps = None if image_maps is None else image_maps[None]
            restored, cached = self.model.restore(image[None], batch_maps, alpha=alpha, return_latents=True)
            outputs.append(to_numpy(restored[0]))
            if return_latents:
                latents.append(cached)
        return DMDiffPipelineOutput(images=outputs, latents=latents if return_latents else None)

    def decode(self, latents: DMDiffPipelineOutput | Sequence[RestoreLatents], alpha: float) -> list[np.ndarray]:
        """Re-decode the latents of an earlier call at another ``alpha`` (VAE decoder only):
        float32 ``(H, W, 3)`` images, one per :class:`RestoreLatents`."""
        if isinstance(latents, DMDiffPipelineOutput):
            if latents.latents is None:
                raise DmdiffError("this output holds no latents; call the pipeline with return_latents=True")
            latents = latents.latents
        alpha = check_alpha(alpha)
        return [image for cached in latents for image in map(to_numpy, self.model.decode(cached, alpha))]

    # ------------------------------------------------------------------ folders

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        overwrite: bool = False, **kwargs: Any) -> Path:
        """Write the pipeline folder (module docstring), atomically: temp folder + rename.

        ``tiny`` embeds its base backbone under ``backbone/`` (LoRA layers removed; ``conv_in`` as
        trained); ``sd-turbo`` stores the absolute folder it was loaded from; ``sd-turbo-shape``
        stores nothing more (it is rebuilt from ``config.seed``).
        """
        if not safe_serialization:
            raise DmdiffError("dmdiff pipelines are saved as safetensors only (pickle files can run code "
                              "when loaded); leave safe_serialization=True")
        if kwargs:
            raise DmdiffError(f"save_pretrained takes no {', '.join(sorted(kwargs))} (local folders, safetensors only)")
        folder = Path(save_directory)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise DmdiffError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        model: DMDiff = self.model
        reference: dict[str, Any] = {"preset": model.config.preset, "source": model.backbone.source}
        with atomic_directory(folder, replace=True) as tmp:
            if model.config.preset == "tiny":
                save_backbone(base_backbone(model), tmp / BACKBONE_DIR)
                reference["embedded"] = BACKBONE_DIR
            tensors = {k: v.cpu() for k, v in model.trainable_state_dict().items()}
            save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"format": FORMAT, "preset": model.config.preset})
            files = {"trainable_file": TRAINABLE_FILE}
            if model.anchor_psf is not None:
                save_file({"psf": model.anchor_psf.cpu().contiguous()}, str(tmp / ANCHOR_PSF_FILE))
                files["anchor_psf_file"] = ANCHOR_PSF_FILE
            write_json(tmp / CONFIG_FILE, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "config": to_dict(model.config),
                "backbone": reference, **files, "provenance": provenance(),
            })
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, model_path: str | None = None,
                        device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32) -> DMDiffPipeline:
        """Load a folder written by :meth:`save_pretrained` (local folders only, safetensors only).

        Args:
            pretrained_model_name_or_path: the pipeline folder.
            model_path: ``sd-turbo`` only: where SD-Turbo is now (default: the folder it was saved
                from if it still exists, else the config's ``model_path`` or hub id, from the cache).
            device, torch_dtype: where and in which precision to load the networks.

        Raises:
            DmdiffError: not a pipeline folder, pickle weight files in it, weights that do not fit.
        """
        folder = Path(pretrained_model_name_or_path)
        if not (folder / CONFIG_FILE).is_file():
            hint = (" It looks like a backbone folder: load it with DMDiff(DMDiffConfig(preset='sd-turbo', "
                    "model_path=...))." if (folder / "model_index.json").is_file() else "")
            raise DmdiffError(f"{folder} is not a DMDiff pipeline folder (no {CONFIG_FILE}).{hint}")
        pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise DmdiffError(f"{folder} holds pickle weight files ({', '.join(pickles[:5])}); dmdiff loads "
                              "safetensors only, because unpickling can run arbitrary code. Remove them, or "
                              "convert them once, in a trusted environment, to .safetensors.")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise DmdiffError(f"{folder / CONFIG_FILE}: not a {FORMAT} v{FORMAT_VERSION} file "
                              f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
        config = merge(DMDiffConfig(), meta["config"])
        backbone = _load_reference(folder, config, meta["backbone"], model_path, device, torch_dtype)
        model = DMDiff(config, backbone)
        weights = folder / meta["trainable_file"]
        if not weights.is_file():
            raise DmdiffError(f"{folder} lacks its trained weights {weights.name}")
        model.load_trainable_state_dict(load_file(str(weights), device=str(model.device)))
        if config.anchor_rl_iterations is not None:
            psf_file = folder / meta.get("anchor_psf_file", ANCHOR_PSF_FILE)
            if not psf_file.is_file():
                raise DmdiffError(f"{folder} lacks {psf_file.name}, the PSF its colour anchor deconvolves with")
            model.set_anchor_psf(load_file(str(psf_file))["psf"])
        return cls.from_model(model)


def base_backbone(model: DMDiff) -> Backbone:
    """The model's backbone without LoRA layers (a view sharing weights, for saving).

    peft wraps adapted layers (``….base_layer.weight``, ``….lora_A.<adapter>.weight``); the base
    networks are rebuilt on the meta device and given the wrapped layers' base weights.
    """
    def strip(network: torch.nn.Module) -> torch.nn.Module:
        state = {key.replace(".base_layer.", "."): value for key, value in network.state_dict().items()
                 if not any(part.startswith("lora_") for part in key.split("."))}
        with torch.device("meta"):
            base = type(network).from_config(network.config)
        base.load_state_dict(state, strict=True, assign=True)
        return base.eval()

    b = model.backbone
    return Backbone(strip(b.unet), strip(b.vae), b.text_encoder, b.tokenizer, b.scheduler, b.preset, b.source,
                    b.one_step_timestep)


def _load_reference(folder: Path, config: DMDiffConfig, reference: dict, model_path: str | None,
                    device, dtype) -> Backbone:
    """The base backbone a pipeline folder refers to (see :meth:`DMDiffPipeline.save_pretrained`)."""
    kwargs = dict(dtype=dtype, device=device)
    if config.preset == "tiny":
        return load_backbone("tiny", path=folder / reference["embedded"], **kwargs)
    if config.preset == "sd-turbo-shape":
        return load_backbone("sd-turbo-shape", seed=config.seed, **kwargs)
    saved = Path(reference["source"])
    return load_backbone("sd-turbo", path=model_path or (saved if saved.is_dir() else config.model_path), **kwargs)


def as_images(images) -> list[torch.Tensor]:
    """Inputs as a list of ``(3, H, W)`` float32 tensors in ``[0, 1]`` (``(B, 3, H, W)`` tensors split)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageInputError("got an empty list of images")
    tensors = []
    for item in items:
        batch = isinstance(item, torch.Tensor) and item.dim() == 4
        tensors.extend(as_image(image) for image in (item if batch else [item]))
    return tensors


def as_image(image) -> torch.Tensor:
    """One image (PIL, numpy or tensor; see :meth:`DMDiffPipeline.__call__`) → ``(3, H, W)`` float32."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ImageInputError(f"image tensors must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        image = image.detach().cpu()
        if image.dtype == torch.uint8:
            return image.float().contiguous() / 255
        return _checked_float(image.float().contiguous())
    if hasattr(image, "convert") and hasattr(image, "mode"):            # a PIL image
        array = np.asarray(image) if image.mode.startswith("I;16") else np.asarray(image.convert("RGB"))
        return as_image(array)
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"cannot use a {type(image).__name__} as an image: pass PIL images, numpy "
                              "arrays (H, W, 3) or tensors (3, H, W)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageInputError(f"numpy images must be (H, W, 3) RGB or (H, W) grayscale, got {image.shape}")
    if image.dtype == np.uint8:
        array = image.astype(np.float32) / 255
    elif image.dtype == np.uint16:
        array = image.astype(np.float32) / 65535
    elif np.issubdtype(image.dtype, np.floating):
        array = image.astype(np.float32)
    else:
        raise ImageInputError(f"numpy images must be uint8, uint16 or float in [0, 1], got {image.dtype}")
    return _checked_float(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))


def _checked_float(image: torch.Tensor) -> torch.Tensor:
    """A float image with finite values in ``[0, 1]`` (1e-4 rounding slack, clipped)."""
    if not torch.isfinite(image).all():
        raise ImageInputError("image contains NaN or infinite values")
    lo, hi = image.min().item(), image.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ImageInputError(f"float image values span [{lo:.4g}, {hi:.4g}]; they must be sRGB values in [0, 1]")
    return image.clamp(0, 1)


def as_maps(maps, n: int) -> list[torch.Tensor | None]:
    """``n`` per-image maps ``(7, G, G)`` float32 tensors or None."""
    if maps is None:
        return [None] * n
    if isinstance(maps, (np.ndarray, torch.Tensor)) and maps.ndim == 3:
        maps = [maps]
    if len(maps) != n:
        raise ImageInputError(f"got maps for {len(maps)} images but {n} images")
    return [None if m is None else torch.as_tensor(m, dtype=torch.float32) for m in maps]


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` tensor → float32 ``(H, W, 3)`` numpy array."""
    return image.permute(1, 2, 0).float().cpu().numpy()
