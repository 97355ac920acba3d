"""The diffusion backbone (UNet, VAE, CLIP text encoder, tokenizer, noise schedule) and its presets.

Presets (see :func:`load_backbone`):

``tiny``            small configs, random init (or the shipped ``dmdiff/assets/tiny_backbone/``
                    when present); same classes and code paths as SD-Turbo; runs on a 2-core CPU.
``sd-turbo``        the real ``stabilityai/sd-turbo`` weights from a local folder or the hub cache.
``sd-turbo-shape``  SD-Turbo's exact architecture with random init (~1.3 B parameters, ~5 GB in
                    fp32), for speed/memory benchmarks without the weights. Its tokenizer is the
                    package's small one (ids < 1000 of the 49408 embeddings), which is fine for
                    timing but means prompts are not SD-Turbo's token ids.

Folders use the diffusers layout of SD-Turbo: ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; weights are read and written as safetensors only.
Nothing is downloaded unless the caller passes ``allow_download=True``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.tokenizer import MAX_LENGTH, build_tokenizer
from dmdiff.outputs import atomic_directory, check_replaceable, folder_files, write_json
from dmdiff.weights import PICKLE_HELP, PICKLE_SUFFIXES, check_safetensors

PRESETS = ("tiny", "sd-turbo", "sd-turbo-shape")
SD_TURBO_HUB_ID = "stabilityai/sd-turbo"
TINY_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny_backbone"
WEIGHTED = ("unet", "vae", "text_encoder")
COMPONENTS = (*WEIGHTED, "tokenizer", "scheduler")
TOKENIZER_FILES = ("vocab.json", "merges.txt")   # without them CLIPTokenizer loads an empty vocabulary
ONE_STEP_FILE = "dmdiff_backbone.json"   # {"one_step_timestep": t}: the step a folder's UNet was trained for
SD_TURBO_TIMESTEP = 999                  # SD-Turbo generates in one step from t = 999 (docs/method.md)

# SD-Turbo's noise schedule (SD 2.x training betas); DDPMScheduler reads it from SD-Turbo's
# scheduler/ folder too (that file names EulerDiscreteScheduler; the betas are what we use).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                 steps_offset=1, timestep_spacing="trailing")

TINY_UNET = dict(  # layout chosen by profile and quality: docs/tiny_backbone.md "Layout"
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(1, 2, 4, 4),  # diffusers reads this as the head count: 16 channels per head
    use_linear_projection=True,     # as SD-Turbo: proj_in/proj_out are Linear layers
    norm_num_groups=4,              # 4-16 channels per group (SD-Turbo: 10-40); see docs/tiny_backbone.md
)
TINY_VAE = dict(  # (32, 32) and 8 channels per norm group: see docs/tiny_backbone.md
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    mid_block_add_attention=False,  # ~40 % faster steps, same quality at this size (docs/tiny_backbone.md)
    sample_size=128, scaling_factor=0.18215,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 vocab_size=1000, max_position_embeddings=MAX_LENGTH, hidden_act="gelu",
                 projection_dim=32)

# SD-Turbo = SD 2.1 architecture (published diffusers configs of stabilityai/sd-turbo).
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD_TURBO_TEXT = dict(  # OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x uses layer 23)
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
    vocab_size=49408, max_position_embeddings=MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=1024,  # read only by CLIPTextModelWithProjection, not by CLIPTextModel
)
RANDOM_INIT = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT),
               "sd-turbo-shape": (SD_TURBO_UNET, SD_VAE, SD_TURBO_TEXT)}

MODEL_INDEX = {  # what diffusers' StableDiffusionPipeline.from_pretrained expects
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}

DOWNLOAD_HELP = (
    f"dmdiff never downloads weights on its own. Get SD-Turbo ({SD_TURBO_HUB_ID}, about 5 GB of fp32 "
    "safetensors: the folders unet/ vae/ text_encoder/ tokenizer/ scheduler/ and model_index.json) "
    "once, on a machine with internet access:\n"
    f"    hf download {SD_TURBO_HUB_ID} --local-dir models/sd-turbo --include 'model_index.json' "
    "--include 'unet/*' --include 'vae/*' --include 'text_encoder/*' --include 'tokenizer/*' "
    "--include 'scheduler/*' --exclude '*.fp16.*'\n"
    "then pass that folder: `--model-path models/sd-turbo` on the command line, or "
    "load_backbone('sd-turbo', path='models/sd-turbo') in Python. "
    "Alternatively load_backbone('sd-turbo', allow_download=True) fetches it into the Hugging Face cache."
)
TINY_HELP = ("A tiny backbone folder is written by save_backbone (a tiny pipeline folder embeds its own as "
             "backbone/): save the model again, or copy the folder again from where it was made.")

# What diffusers and transformers raise for a component folder they cannot load: unreadable files
# (OSError), invalid JSON or config values (ValueError), a config that is not an object (TypeError),
# missing entries (KeyError), weights that do not fit the config (RuntimeError), bad safetensors.
LIBRARY_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError)


@dataclass
class Backbone:
    """The frozen-text-encoder diffusion backbone that DMDiff adapts with LoRA.

    Modules are in eval mode; the text encoder's parameters are frozen (``requires_grad=False``),
    the UNet's and VAE's are left trainable for the adapter code to decide.
    """

    unet: UNet2DConditionModel      # latents (B, 4, h, w), timestep, text (B, 77, D) -> eps (B, 4, h, w)
    vae: AutoencoderKL              # images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/f, W/f)
    text_encoder: CLIPTextModel     # token ids (B, 77) -> hidden states (B, 77, D)
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler        # only its alphas_cumprod are used
    preset: str
    source: str                     # the folder the weights came from, or "random-init"
    one_step_timestep: int = SD_TURBO_TIMESTEP   # the t of DMDiff's one step with this UNet

    @property
    def device(self) -> torch.device:
        """Where the networks are (that of the UNet's first parameter)."""
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis: 2 ** (VAE blocks − 1); 2 for tiny, 8 for SD-Turbo."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Image sides should be multiples of this many pixels: VAE factor × UNet downsampling.

        16 for tiny (2 × 8), 64 for SD-Turbo (8 × 8).
        """
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t = Π_{s≤t} (1 − β_s) of the training noise schedule; float32 of t's shape, on the
        backbone's device. ᾱ_999 ≈ 0.0047, ᾱ_250 ≈ 0.67 for SD-Turbo's schedule."""
        index = torch.as_tensor(t, dtype=torch.long).cpu()
        return self.scheduler.alphas_cumprod[index].to(self.device)

    @torch.no_grad()
    def encode_prompt(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(N, 77, D)`` (D = 32 tiny, 1024 SD-Turbo) of N prompts, without grad.

        Prompts are padded/truncated to 77 tokens; the embedding is the encoder's last hidden state
        (what SD-Turbo's UNet cross-attends to), in the text encoder's dtype.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.text_encoder.config.max_position_embeddings).input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents of images: ``(B, 3, H, W)`` sRGB in ``[0, 1]`` → ``(B, 4, H/f, W/f)``, the
        posterior mode times the VAE's ``scaling_factor`` (f = :attr:`vae_scale_factor`; the sides
        must be multiples of f). Whatever adapters are injected into the encoder take part."""
        return self.vae.encode(images * 2 - 1).latent_dist.mode() * self.vae.config.scaling_factor

    def one_step(self, latents: torch.Tensor, text: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The one-step prediction ``ẑ0 = (z − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)`` with ``ε̂ = unet(z, t, text)``.

        Args:
            latents: ``(B, 4, h, w)`` scaled latents (:meth:`encode`).
            text: ``(B, 77, D)`` prompt embeddings (:meth:`encode_prompt`).
            timestep: ``t`` (default :attr:`one_step_timestep`).

        Returns:
            ``(B, 4, h, w)`` in the latents' dtype.
        """
        t = self.one_step_timestep if timestep is None else timestep
        eps = self.unet(latents, t, encoder_hidden_states=text).sample
        alpha_bar = self.alpha_bar(t)
        return (latents - (1 - alpha_bar).sqrt().to(latents.dtype) * eps) / alpha_bar.sqrt().to(latents.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of scaled latents: ``(B, 4, h, w)`` → ``(B, 3, h·f, w·f)`` sRGB, about ``[0, 1]``
        (not clamped)."""
        return (self.vae.decode(latents / self.vae.config.scaling_factor).sample + 1) / 2

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: ``{"unet", "vae", "text_encoder", "total"}``."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in WEIGHTED}
        return {**counts, "total": sum(counts.values())}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Backbone:
        """Move/cast the three networks in place; returns ``self``."""
        for name in WEIGHTED:   # nn.Module.to: diffusers' override warns on every dtype argument
            torch.nn.Module.to(getattr(self, name), device=device, dtype=dtype)
        return self


def load_backbone(preset: str = "tiny", path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", seed: int = 0, *, pretrained: bool = True,
                  allow_download: bool = False) -> Backbone:
    """Build or load a backbone.

    Args:
        preset: ``"tiny"``, ``"sd-turbo"`` or ``"sd-turbo-shape"`` (module docstring).
        path: ``sd-turbo``: a local folder in the diffusers layout, or a hub id (default
            ``stabilityai/sd-turbo``) looked up in the Hugging Face cache only. ``tiny``: a folder
            holding a saved tiny backbone (overrides the shipped one). Not used by ``sd-turbo-shape``.
        dtype, device: what the networks are cast/moved to (they are built or loaded on the CPU).
        seed: random init seed (random-init presets only; same seed → identical weights).
        pretrained: ``tiny`` only: load ``dmdiff/assets/tiny_backbone/`` when it exists; False
            forces random init.
        allow_download: ``sd-turbo`` with a hub id: fetch missing files from the hub.

    Raises:
        ConfigError: unknown preset, or a ``path`` the preset does not take.
        DmdiffError: weights missing (the message says what to download and how to pass it),
            pickle-only weights, an incomplete folder.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown backbone preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "sd-turbo":
        backbone = _load_folder(_resolve_sd_turbo(str(path or SD_TURBO_HUB_ID), allow_download), preset)
    elif preset == "tiny" and path is not None:
        backbone = _load_folder(Path(path), preset)
    elif preset == "tiny" and pretrained and (TINY_ASSETS / "model_index.json").is_file():
        backbone = _load_folder(TINY_ASSETS, preset)
    elif path is not None:
        raise ConfigError(f"preset {preset!r} is random-init and takes no path (got {str(path)!r})")
    else:
        backbone = random_init(preset, seed)
    return backbone.to(device, dtype)


#: The kind of folder :func:`save_backbone` builds (:mod:`dmdiff.outputs`).
BACKBONE_KIND = "backbone"
#: Files a backbone folder may hold at its top besides the component folders.
BACKBONE_TOP_FILES = ("model_index.json", ONE_STEP_FILE, "pretrain_report.json")


def backbone_parts(folder: Path) -> set[str] | None:
    """The files of a backbone folder written before manifests (it has ``model_index.json``): the
    top-level files of :data:`BACKBONE_TOP_FILES` and everything in the component folders; None
    for any other folder."""
    if not (folder / "model_index.json").is_file():
        return None
    return {f for f in folder_files(folder) if f in BACKBONE_TOP_FILES or f.split("/")[0] in COMPONENTS}


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """Inside the block, diffusers and transformers draw no progress bars of their own ("Loading
    weights", "Writing model shards"): a library call that takes well under a second needs none, and
    they fill notebooks and logs. Each library's setting is restored afterwards."""
    was = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in was:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            if enabled:
                lib.enable_progress_bar()


def check_backbone_out(folder: str | Path, overwrite: bool) -> None:
    """Raise unless a backbone may be written to ``folder``: it is missing or empty, or it is a
    backbone folder holding nothing else and ``overwrite`` is set (a folder of other files never is).

    Raises:
        DmdiffError: naming the folder and why.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    check_replaceable(folder, BACKBONE_KIND, backbone_parts)
    if any(folder.iterdir()) and not overwrite:
        raise DmdiffError(f"{folder} already holds a backbone; pass overwrite=True (--overwrite) to replace it")


def save_backbone(backbone: Backbone, folder: str | Path, overwrite: bool = False,
                  extra_json: Mapping[str, Any] | None = None) -> Path:
    """Write ``backbone`` to ``folder`` in SD-Turbo's diffusers layout (safetensors), atomically.

    The folder loads back with ``load_backbone("sd-turbo", path=folder)`` and with diffusers'
    ``StableDiffusionPipeline.from_pretrained(folder)``. The tokenizer folder holds ``vocab.json``
    and ``merges.txt`` (as SD-Turbo's) besides transformers' ``tokenizer.json``. Adapters injected
    into the networks are saved as part of them; save LoRA weights separately. ``extra_json``:
    more top-level JSON files (name → content) written into the same atomic folder (e.g. the
    pretraining report). An existing folder is replaced as :func:`check_backbone_out` allows.
    """
    folder = Path(folder)
    check_backbone_out(folder, overwrite)
    with atomic_directory(folder, BACKBONE_KIND, replace=True, legacy=backbone_parts) as tmp, library_bars_off():
        backbone.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        backbone.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        backbone.text_encoder.save_pretrained(tmp / "text_encoder")   # transformers: safetensors only
        backbone.tokenizer.save_pretrained(tmp / "tokenizer")
        backbone.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))
        backbone.scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / "model_index.json", {**MODEL_INDEX, "_diffusers_version": diffusers.__version__})
        write_json(tmp / ONE_STEP_FILE, {"one_step_timestep": int(backbone.one_step_timestep)})
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)
    return folder


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU generator seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_init(preset: str, seed: int = 0, unet: Mapping[str, Any] | None = None,
                vae: Mapping[str, Any] | None = None) -> Backbone:
    """A random-init backbone of ``preset``'s layout (``tiny`` or ``sd-turbo-shape``) on the CPU in
    fp32, each network seeded on its own; ``unet`` / ``vae``: diffusers configs that replace the
    preset's (another layout, e.g. for a speed comparison)."""
    unet_config, vae_config, text_config = RANDOM_INIT[preset]
    unet_config, vae_config = unet or unet_config, vae or vae_config
    tokenizer = build_tokenizer()
    text_config = {**text_config, "bos_token_id": tokenizer.bos_token_id,   # the built tokenizer's
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with seeded(seed):
        unet = UNet2DConditionModel.from_config(unet_config)
    with seeded(seed + 1):
        vae = AutoencoderKL.from_config(vae_config)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return _assemble(unet, vae, text_encoder, tokenizer, DDPMScheduler.from_config(SCHEDULER),
                     preset, "random-init")


def _assemble(unet, vae, text_encoder, tokenizer, scheduler, preset: str, source: str) -> Backbone:
    """Common finishing of loaded and built backbones: eval mode, frozen text encoder."""
    for module in (unet, vae, text_encoder):
        module.eval()
    text_encoder.requires_grad_(False)
    return Backbone(unet, vae, text_encoder, tokenizer, scheduler, preset, source)


def _resolve_sd_turbo(path: str, allow_download: bool) -> Path:
    """A local folder for ``path``: the folder itself, or the hub snapshot of a hub id.

    A hub id is looked up in the Hugging Face cache with ``local_files_only=True`` (no network
    access at all) unless ``allow_download``.
    """
    folder = Path(path).expanduser()
    if folder.exists():
        return folder
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise DmdiffError(f"no SD-Turbo folder at {path!r}. {DOWNLOAD_HELP}")
    from huggingface_hub import (
        snapshot_download,  # local: only for a hub id, the one path that may go online
    )
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=not allow_download,
                                      allow_patterns=["model_index.json", *(f"{c}/*" for c in COMPONENTS)],
                                      ignore_patterns=["*.fp16.*", *(f"*{s}" for s in PICKLE_SUFFIXES)]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        what = (f"downloading it from the hub failed ({err})" if allow_download else
                "as a hub id it is not in the local Hugging Face cache (nothing was downloaded)")
        raise DmdiffError(f"{path!r} is not a local folder, and {what}. {DOWNLOAD_HELP}") from err


def _folder_help(preset: str) -> str:
    """What to do about a damaged or incomplete backbone folder of ``preset``."""
    return TINY_HELP if preset == "tiny" else DOWNLOAD_HELP


def _weights_variant(subfolder: Path, preset: str) -> str | None:
    """``None`` for full-precision safetensors, ``"fp16"`` when only the fp16 variant is present.

    The weights files of that variant are checked with :func:`check_safetensors`. Raises a
    DmdiffError for pickle-only weights (never unpickled: pickle files can run code), for a folder
    without weights and for damaged weights files.
    """
    files = sorted(subfolder.iterdir())
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    full = [p for p in safetensors if not p.name.endswith(".fp16.safetensors")]
    for weights in full or safetensors:
        check_safetensors(weights)
    if safetensors:
        return None if full else "fp16"
    pickles = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise DmdiffError(f"{subfolder} holds only pickle weights ({', '.join(pickles)}); {PICKLE_HELP}")
    raise DmdiffError(f"{subfolder} holds no weights (*.safetensors). {_folder_help(preset)}")


def _load_component(loader, folder: Path, name: str, preset: str, **kwargs):
    """``loader.from_pretrained(folder, subfolder=name)`` offline, with the libraries' errors (a
    broken ``config.json``, tokenizer file or weights) turned into a DmdiffError naming the folder."""
    try:
        with library_bars_off():
            return loader.from_pretrained(folder, subfolder=name, local_files_only=True, **kwargs)
    except LIBRARY_LOAD_ERRORS as err:
        raise DmdiffError(f"{folder / name}: the backbone's {name} cannot be loaded ({type(err).__name__}: {err}). "
                          f"{_folder_help(preset)}") from err


def _load_network(loader, folder: Path, name: str, preset: str):
    """The network ``name`` (unet, vae, text_encoder) with every weight from its safetensors files;
    a DmdiffError naming the folder when some are missing (the libraries would leave them random
    or on the meta device)."""
    network, info = _load_component(loader, folder, name, preset, use_safetensors=True, output_loading_info=True,
                                     variant=_weights_variant(folder / name, preset))
    missing = sorted(info["missing_keys"])
    if missing:
        raise DmdiffError(f"{folder / name}: its weights lack {len(missing)} of the {name}'s tensors "
                          f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}). {_folder_help(preset)}")
    return network


def _load_folder(folder: Path, preset: str) -> Backbone:
    """Load a backbone from a folder in the diffusers layout, safetensors only, no network."""
    missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
    missing = missing or [f"tokenizer/{n}" for n in TOKENIZER_FILES if not (folder / "tokenizer" / n).is_file()]
    if missing:
        raise DmdiffError(f"{folder} is not a complete backbone folder: missing {', '.join(missing)}. "
                          f"{_folder_help(preset)}")
    unet, vae, text_encoder = (_load_network(loader, folder, name, preset) for loader, name
                               in zip((UNet2DConditionModel, AutoencoderKL, CLIPTextModel), WEIGHTED))
    tokenizer = _load_component(CLIPTokenizer, folder, "tokenizer", preset)
    scheduler = _load_component(DDPMScheduler, folder, "scheduler", preset)
    backbone = _assemble(unet, vae, text_encoder, tokenizer, scheduler, preset, str(folder.resolve()))
    backbone.one_step_timestep = _one_step_timestep(folder)
    return backbone


def check_timestep(t, name: str = "timestep") -> int:
    """``t`` if it is an integer timestep of the 1000-step schedule, else a ConfigError naming ``name``."""
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= SD_TURBO_TIMESTEP:
        raise ConfigError(f"{name} must be an integer in [0, {SD_TURBO_TIMESTEP}], got {t!r}")
    return t


def _one_step_timestep(folder: Path) -> int:
    """The timestep recorded in ``folder/dmdiff_backbone.json`` (written by :func:`save_backbone`);
    999 (SD-Turbo's) for folders without it, such as SD-Turbo's own."""
    path = folder / ONE_STEP_FILE
    if not path.is_file():
        return SD_TURBO_TIMESTEP
    try:
        t = json.loads(path.read_text())["one_step_timestep"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DmdiffError(f"{path} is unreadable or has no 'one_step_timestep' ({err})") from err
    return check_timestep(t, f"{path}: one_step_timestep")
