"""``DMDiffPipeline``: a diffusers pipeline around a trained :class:`~dmdiff.model.dmdiff.DMDiff`.

It takes photos as PIL images, numpy arrays or tensors, one or a list of any sizes, and returns
restored numpy images (the package's ``(H, W, 3)`` float32 ``[0, 1]`` convention), optionally with
the cached two-path latents for instant re-decoding at another α (:meth:`DMDiffPipeline.decode`).

Folder layout of ``save_pretrained`` / ``from_pretrained`` (safetensors only; docs/architecture.md,
"Pipeline folder layout")::

    FOLDER/
      dmdiff_config.json              format tag, DMDiffConfig, backbone reference, provenance
      dmdiff_trainable.safetensors    DMDiff.trainable_state_dict(): LoRA A/B, unet.conv_in, SVDA, MLPs
      anchor_psf.safetensors          models with a deconvolved colour anchor only: ``psf``, (3, K, K) for
                                      ``anchor_rl_iterations``, the grid (3, G, G, K, K) for ``anchor_wiener_nsr``;
                                      absent (``anchor_psf_file: null``) for a model trained on a lens family,
                                      whose anchor takes each capture's own lens
      backbone/                       tiny preset only: the base backbone in SD-Turbo's layout

There is no top-level ``model_index.json``: ``DiffusionPipeline.from_pretrained`` cannot build this
class from a folder anyway, and ``backbone/`` keeps its own for ``StableDiffusionPipeline``. A
pipeline folder is self-contained: the paths its config names, and its symbolic links, must stay
inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from dmdiff.config import merge, to_dict
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.backbone import Backbone, load_backbone, save_backbone
from dmdiff.model.color import color_correct as color_correct_image
from dmdiff.model.color import resolve_color_correction
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig, RestoreLatents, check_alpha, decoded_paths
from dmdiff.model.ensemble import self_ensemble as ensemble_mean
from dmdiff.model.tiling import (
    DEFAULT_OVERLAP_PX,
    check_tiling,
    tiled_decode,
    tiled_latents,
    tiled_restore,
)
from dmdiff.outputs import atomic_directory, folder_files, write_json
from dmdiff.runinfo import provenance
from dmdiff.weights import (
    PICKLE_HELP,
    PICKLE_SUFFIXES,
    load_safetensors,
    save_safetensors,
)

FORMAT = "dmdiff-pipeline"
FORMAT_VERSION = 1
CONFIG_FILE = "dmdiff_config.json"
TRAINABLE_FILE = "dmdiff_trainable.safetensors"
ANCHOR_PSF_FILE = "anchor_psf.safetensors"
BACKBONE_DIR = "backbone"
PATH_KEYS = {"trainable_file": "the trained weights", "anchor_psf_file": "the anchor PSF",
             "backbone.embedded": "the embedded backbone folder"}   # the config's paths in the folder
RESAVE = "save the model again, or copy the folder again from where it was made"
#: The kind of folder :meth:`DMDiffPipeline.save_pretrained` builds (:mod:`dmdiff.outputs`).
PIPELINE_KIND = "pipeline"


def pipeline_parts(folder: Path) -> set[str] | None:
    """The files of a pipeline folder written before manifests (its ``dmdiff_config.json`` has the
    pipeline format tag): the config, the weight files and the embedded backbone; None for any
    other folder."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    top = {CONFIG_FILE, TRAINABLE_FILE, ANCHOR_PSF_FILE}
    return {f for f in folder_files(folder) if f in top or f.startswith(BACKBONE_DIR + "/")}


class ImageInputError(DmdiffError, ValueError):
    """An input image or map has a type, shape or value range the pipeline cannot use."""


@dataclass
class DMDiffPipelineOutput(BaseOutput):
    """images: restored images, float32 ``(H, W, 3)`` in ``[0, 1]``, one per input image.
    latents: with ``return_latents=True``, one :class:`RestoreLatents` (batch of 1) per image."""

    images: list[np.ndarray]
    latents: list[RestoreLatents] | None = None


@dataclass
class PreparedImage:
    """One input made ready for the model by :meth:`DMDiffPipeline.prepare`, without its networks.

    image: ``(1, 3, H, W)`` float32 in ``[0, 1]`` (on the CPU, as given); maps: ``(1, 7, G, G)`` or
    None; anchor: the model's colour anchor of the image (:meth:`DMDiff.input_anchor`, on the
    model's device) for a model with one, else None; seen: what the model's network sees of it
    (:meth:`DMDiff.network_input`, on the model's device) for a model with a deconvolved input,
    else None.
    """

    image: torch.Tensor
    maps: torch.Tensor | None
    anchor: torch.Tensor | None = None
    seen: torch.Tensor | None = None


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

    def __call__(self, images, maps=None, alpha: float = 1.0, *, tile: int | None = None,
                 overlap: int = DEFAULT_OVERLAP_PX, self_ensemble: bool = False, color_correct: str = "none",
                 return_latents: bool = False, on_tile: Callable[[int, int], None] | None = None,
                 identity: Sequence[np.ndarray] | None = None) -> DMDiffPipelineOutput:
        """Restore one image or a list of images, one by one (sizes may differ).

        The one inference path of dmdiff: ``dmdiff restore`` reads and writes files around it and
        ``dmdiff evaluate`` measures it. Each image goes through :meth:`prepare`, :meth:`latents`
        and :meth:`finish` (or the self-ensemble); ``dmdiff restore`` runs those three steps of
        different images at the same time.

        Args:
            images: an image or a list of them; each a PIL image (converted to RGB, alpha dropped),
                a numpy array ``(H, W, 3)`` or ``(H, W)`` (uint8 / 255, uint16 / 65535, or float in
                ``[0, 1]``), or a tensor ``(3, H, W)`` / ``(B, 3, H, W)`` (float in ``[0, 1]`` or
                uint8). A ``(B, 3, H, W)`` tensor (alone or in the list) counts as B images.
            maps: None, or the optics maps ``(7, G, G)`` (numpy or tensor, ``MAP_CHANNELS`` order)
                of each image: one for a single image, a list (items may be None) or a
                ``(B, 7, G, G)`` array parallel to ``images``.
            alpha: in ``[0, 1.2]``: 0 fidelity (neutral path), 1 perceptual (positive path).
            tile: restore in blended tiles of this side in pixels (bounded memory for any size,
                :mod:`dmdiff.model.tiling`; exactly the whole-image result when the image fits in
                one tile); None: the whole image in one call.
            overlap: with ``tile``, the minimum overlap of tiles in pixels, blended.
            self_ensemble: average the restorations of the 8 rotations/mirrorings of each image
                and its maps (:mod:`dmdiff.model.ensemble`; 8× the time; no latents).
            color_correct: ``"none"``, ``"auto"``, ``"meanstd"`` or ``"lowpass"`` against the input
                (:mod:`dmdiff.model.color`; ``"auto"``: none for a model with a colour anchor).
            return_latents: also return the cached latents, for :meth:`decode`.
            on_tile: with ``tile``, called as ``on_tile(done, total)`` after each tile.
            identity: with ``self_ensemble``, one restoration per image at this ``alpha`` and tile
                setting without colour correction (the ``images`` of an earlier call): reused as
                the ensemble's unturned member, so 7 restorations run instead of 8.
        """
        alpha = check_alpha(alpha)
        if return_latents and self_ensemble:
            raise DmdiffError("return_latents cannot be combined with self_ensemble (8 restorations, no one latent)")
        if identity is not None and not self_ensemble:
            raise DmdiffError("identity is the self-ensemble's unturned member: pass it with self_ensemble=True")
        correction = resolve_color_correction(color_correct, self.model)
        if tile is not None:
            tile, overlap = check_tiling(self.model, tile, overlap)
        items = as_images(images)
        map_items = as_maps(maps, len(items))
        identities = [None] * len(items) if identity is None else [self._identity(i) for i in identity]
        if len(identities) != len(items):
            raise ImageInputError(f"got {len(identities)} identity restorations for {len(items)} images")
        outputs, latents = [], []
        for image, image_maps, same in zip(self.progress_bar(items) if len(items) > 1 else items, map_items,
                                           identities):
            if self_ensemble:
                batch_maps = None if image_maps is None else image_maps[None]
                restored = ensemble_mean(lambda x, m: self._restore(x, m, alpha, tile, overlap, on_tile),
                                         image[None], batch_maps, identity=same)
                outputs.append(corrected(to_numpy(restored[0]), image, correction))
                continue
            prepared = self.prepare(image, image_maps)
            cached = self.latents(prepared, tile=tile, overlap=overlap, on_tile=on_tile)
            outputs.append(self.finish(prepared, cached, alpha, tile=tile, overlap=overlap, color_correct=correction))
            if return_latents:
                latents.append(cached)
        return DMDiffPipelineOutput(images=outputs, latents=latents if return_latents else None)

    def prepare(self, image, maps=None, anchor: bool = True) -> PreparedImage:
        """One image (any input :meth:`__call__` takes) and its maps ``(7, G, G)`` or None made ready
        for :meth:`latents`; with ``anchor`` (and a model with a colour anchor) its anchor and, for a
        model with a deconvolved input, its network input computed too. Uses no network of the model,
        so it may run in a thread beside a running restore."""
        x = as_image(image)[None]
        maps = as_maps(maps, 1)[0]
        cached, seen = None, None
        if anchor and self.model.config.anchor_sigma_px is not None:
            with torch.no_grad():
                on_device = x.to(self.model.device, self.model.dtype)
                cached = self.model.input_anchor(on_device)
                if self.model.config.input_deconvolves:
                    seen = self.model.network_input(on_device)
        return PreparedImage(x, None if maps is None else maps[None], cached, seen)

    def latents(self, prepared: PreparedImage, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP_PX,
                on_tile: Callable[[int, int], None] | None = None, alpha: float | None = None) -> RestoreLatents:
        """The encoder + UNet half of a restore (the paths' latents, whole or in ``tile``-px tiles
        as in :meth:`__call__`), reusing the prepared anchor and network input (``prepared.seen`` is
        released here: decoding does not need it). ``alpha``: None, both paths (to decode
        at any α); else the one α they will be decoded at, so that α = 0 or 1 runs one path
        (:func:`~dmdiff.model.dmdiff.decoded_paths`; the result agrees with both paths' to float
        round-off, not bit for bit)."""
        paths = decoded_paths(None if alpha is None else check_alpha(alpha))
        seen, prepared.seen = prepared.seen, None     # not needed to decode: a large photo's copy freed early
        if tile is None:
            return self.model.restore_latents(prepared.image, prepared.maps, prepared.anchor, paths, seen)
        return tiled_latents(self.model, prepared.image, prepared.maps, tile, overlap, on_tile, prepared.anchor,
                             paths, seen)

    def finish(self, prepared: PreparedImage, latents: RestoreLatents, alpha: float, *, tile: int | None = None,
               overlap: int = DEFAULT_OVERLAP_PX, color_correct: str = "none") -> np.ndarray:
        """The decoding half of a restore: ``latents`` decoded at ``alpha`` (same ``tile`` and
        ``overlap`` as :meth:`latents`), then colour-corrected against the prepared image; float32
        ``(H, W, 3)``. Uses the VAE decoder only, which carries no LoRA, so it may run in a thread
        beside :meth:`latents` of the next image."""
        restored = self.decode([latents], alpha, tile, overlap)[0]
        return corrected(restored, prepared.image[0], resolve_color_correction(color_correct, self.model))

    def _identity(self, restored: np.ndarray) -> torch.Tensor:
        """An earlier restoration (``(H, W, 3)``) as the ``(1, 3, H, W)`` member of a self-ensemble."""
        return as_image(restored)[None].to(self.model.device, self.model.dtype)

    def _restore(self, image: torch.Tensor, maps: torch.Tensor | None, alpha: float, tile: int | None,
                 overlap: int, on_tile) -> torch.Tensor:
        """One ``(1, 3, H, W)`` image, whole or tiled: the restored ``(1, 3, H, W)``."""
        if tile is None:
            return self.model.restore(image, maps, alpha=alpha)
        return tiled_restore(self.model, image, maps, alpha=alpha, tile=tile, overlap=overlap, on_tile=on_tile)

    def decode(self, latents: DMDiffPipelineOutput | Sequence[RestoreLatents], alpha: float,
               tile: int | None = None, overlap: int = DEFAULT_OVERLAP_PX) -> list[np.ndarray]:
        """Re-decode the latents of an earlier call at another ``alpha`` (VAE decoder only; ``tile``
        and ``overlap`` as in that call): float32 ``(H, W, 3)`` images, one per :class:`RestoreLatents`.
        No colour correction is applied."""
        if isinstance(latents, DMDiffPipelineOutput):
            if latents.latents is None:
                raise DmdiffError("this output holds no latents; call the pipeline with return_latents=True")
            latents = latents.latents
        alpha = check_alpha(alpha)
        decode = (lambda cached: self.model.decode(cached, alpha)) if tile is None else \
            (lambda cached: tiled_decode(self.model, cached, alpha, tile, overlap))
        return [image for cached in latents for image in map(to_numpy, decode(cached))]

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
        with atomic_directory(folder, PIPELINE_KIND, replace=True, legacy=pipeline_parts) as tmp:
            if model.config.preset == "tiny":
                save_backbone(base_backbone(model), tmp / BACKBONE_DIR)
                reference["embedded"] = BACKBONE_DIR
            tensors = {k: v.cpu() for k, v in model.trainable_state_dict().items()}
            save_safetensors(tmp / TRAINABLE_FILE, tensors, metadata={"format": FORMAT, "preset": model.config.preset})
            files = {"trainable_file": TRAINABLE_FILE}
            if model.anchor_psf is not None:
                save_safetensors(tmp / ANCHOR_PSF_FILE, {"psf": model.anchor_psf.cpu().contiguous()})
                files["anchor_psf_file"] = ANCHOR_PSF_FILE
            elif model.config.anchor_deconvolves:     # trained on a lens family: each capture's lens
                files["anchor_psf_file"] = None
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
            DmdiffError: not a pipeline folder; a damaged one (an invalid config file or key, a
                truncated or non-safetensors weights file, a broken embedded backbone: the message
                names the file and key); pickle files in it; a path in it that leads outside it;
                weights that do not fit.
        """
        folder = Path(pretrained_model_name_or_path)
        config_file = folder / CONFIG_FILE
        if not config_file.is_file():
            hint = (" It looks like a backbone folder: load it with DMDiff(DMDiffConfig(preset='sd-turbo', "
                    "model_path=...))." if (folder / "model_index.json").is_file() else "")
            raise DmdiffError(f"{folder} is not a DMDiff pipeline folder (no {CONFIG_FILE}).{hint}")
        _check_contents(folder)
        meta = _read_meta(config_file)
        with _naming(config_file):
            config = merge(DMDiffConfig(), meta["config"], prefix="config.")
        weights = _inside(folder, meta.get("trainable_file"), "trainable_file")
        per_capture = "anchor_psf_file" in meta and meta["anchor_psf_file"] is None
        psf_file = None if per_capture else _inside(folder, meta.get("anchor_psf_file", ANCHOR_PSF_FILE),
                                                    "anchor_psf_file")
        if not weights.is_file():
            raise DmdiffError(f"{folder} lacks its trained weights {weights.name}; {RESAVE}")
        anchored = config.anchor_deconvolves and not per_capture
        if anchored and not psf_file.is_file():
            raise DmdiffError(f"{folder} lacks {psf_file.name}, the PSF its colour anchor deconvolves with; {RESAVE}")
        backbone = _load_reference(folder, config, meta["backbone"], model_path, device, torch_dtype)
        model = DMDiff(config, backbone)
        state = load_safetensors(weights, model.device)
        with _naming(weights):
            model.load_trainable_state_dict(state)
        if anchored:
            psf = load_safetensors(psf_file).get("psf")
            with _naming(psf_file):
                if psf is None:
                    raise DmdiffError(f"no tensor 'psf' (the PSF of the colour anchor); {RESAVE}")
                model.set_anchor_psf(psf)
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


@contextlib.contextmanager
def _naming(path: Path):
    """Prefix the message of a DmdiffError (or ConfigError) raised in the block with ``path``."""
    try:
        yield
    except DmdiffError as err:
        raise type(err)(f"{path}: {err}") from err


def _inside(folder: Path, relative: Any, key: str | None = None) -> Path:
    """``folder / relative``, refused unless it stays inside ``folder`` (symbolic links resolved).

    Args:
        relative: a path relative to ``folder``: the value of the config file's ``key``, or (``key``
            None) a path found in the folder.
        key: a key of :data:`PATH_KEYS`, named in the error; None for a found path (then named).

    Raises:
        DmdiffError: ``relative`` is not a non-empty string (without NUL), is absolute, or leads
            outside ``folder``.
    """
    where = f"{folder / CONFIG_FILE}: {key} ({PATH_KEYS[key]})" if key else None
    if key and (not isinstance(relative, str) or not relative or "\0" in relative):
        raise DmdiffError(f"{where} must be a path relative to {folder}, got {relative!r}; {RESAVE}")
    path = folder / relative
    if not Path(relative).is_absolute() and path.resolve().is_relative_to(folder.resolve()):
        return path
    what = f"{where} = {relative!r}" if key else f"{path} (a link to {path.resolve()})"
    raise DmdiffError(f"{what} leads outside the model folder {folder}. A model folder must be self-contained: "
                      "keep its files inside it, named by paths relative to it, as save_pretrained writes them.")


def _check_contents(folder: Path) -> None:
    """Refuse pickle files anywhere in ``folder`` (by name; never opened) and links leading out of it."""
    entries = sorted(folder.rglob("*"))     # does not descend into linked folders
    pickles = [str(p.relative_to(folder)) for p in entries if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise DmdiffError(f"{folder} holds pickle weight files ({', '.join(pickles[:5])}); {PICKLE_HELP} "
                          "Remove them from the folder.")
    for link in (p for p in entries if p.is_symlink()):
        _inside(folder, link.relative_to(folder))


def _read_meta(path: Path) -> dict:
    """The record of a pipeline's ``dmdiff_config.json``: its format and the ``config`` and
    ``backbone`` objects checked (the paths are checked by :func:`_inside`)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:         # ValueError: invalid JSON or UTF-8
        raise DmdiffError(f"{path}: unreadable or not valid JSON ({err}); {RESAVE}") from err
    if not isinstance(meta, dict):
        raise DmdiffError(f"{path}: expected a JSON object at the top level, got {type(meta).__name__}; {RESAVE}")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DmdiffError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file "
                          f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
    for key in ("config", "backbone"):
        if not isinstance(meta.get(key), dict):
            state = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise DmdiffError(f"{path}: key {key!r} must be a JSON object, but it is {state}; {RESAVE}")
    meta["config"].setdefault("path_modulation", False)      # saved before the option existed
    return meta


def _load_reference(folder: Path, config: DMDiffConfig, reference: dict, model_path: str | None,
                    device, dtype) -> Backbone:
    """The base backbone a pipeline folder refers to (see :meth:`DMDiffPipeline.save_pretrained`)."""
    kwargs = dict(dtype=dtype, device=device)
    if config.preset == "tiny":
        return load_backbone("tiny", path=_inside(folder, reference.get("embedded"), "backbone.embedded"), **kwargs)
    if config.preset == "sd-turbo-shape":
        return load_backbone("sd-turbo-shape", seed=config.seed, **kwargs)
    if model_path is None:
        saved = reference.get("source")
        if not isinstance(saved, str):
            raise DmdiffError(f"{folder / CONFIG_FILE}: backbone.source (the SD-Turbo folder the model was saved "
                              f"with) must be a string, got {saved!r}; pass model_path (--model-path) instead")
        model_path = saved if Path(saved).is_dir() else config.model_path
    return load_backbone("sd-turbo", path=model_path, **kwargs)


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


def corrected(restored: np.ndarray, image: torch.Tensor, correction: str) -> np.ndarray:
    """``restored`` ``(H, W, 3)`` colour-corrected against the input ``image`` ``(3, H, W)`` with a
    resolved ``correction`` (:func:`dmdiff.model.color.color_correct`; ``"none"``: as it is)."""
    return restored if correction == "none" else color_correct_image(restored, to_numpy(image), correction)


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` tensor → float32 ``(H, W, 3)`` numpy array."""
    return image.permute(1, 2, 0).float().cpu().numpy()
