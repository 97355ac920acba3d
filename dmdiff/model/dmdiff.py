"""DMDiff: one-step, degradation-modulated, multipath diffusion restoration (docs/method.md).

Design note
-----------
One denoising step at ``t = config.timestep`` of the backbone (default: the step its UNet was trained
for, ``backbone.one_step_timestep``: 999 for SD-Turbo, 250 for the shipped tiny backbone; see
docs/tiny_backbone.md, "Why t = 250"):

    z   = vae.encode(2·x − 1).latent_dist.mode() · scaling      (LoRA-modulated VAE encoder)
    eps = unet(z, t, text_emb[path])                            (LoRA-modulated UNet, conv_in trained)
    z0  = (z − sqrt(1 − ᾱ_t) · eps) / sqrt(ᾱ_t)                  (the DDPM x0 prediction)
    y   = (vae.decode(z0 / scaling).sample + 1) / 2            (frozen, unmodulated decoder)

The *path* (``"positive"``, ``"neutral"``, ``"negative"``) only selects the text embedding the UNet
cross-attends to; the three prompts (:class:`Prompts`) are encoded once by the frozen text encoder
and kept as buffers. The degradation modulation comes from SVDA on the input image and its optics
maps, through one :class:`~dmdiff.model.lora.ModulationMLP` per part (VAE encoder, UNet); with
``config.svda=False`` there is no SVDA, no MLPs and no degradation input: plain LoRA (the ablation).

Any ``H × W`` works: the input is padded (reflect, centred; replicate when the image is smaller than
the padding) to a multiple of ``backbone.latent_multiple`` and the output cropped back. SVDA sees
the unpadded image; in spatial mode the LoRA layers lay the modulation grid over the padded input,
which shifts grid nodes by at most half the padding (< latent_multiple / 2 px).

Tunable decoding: :meth:`DMDiff.restore` runs the neutral and positive paths in one batched UNet
call on one VAE encoding, then decodes ``z(α) = (1 − α) · z_neutral + α · z_positive``. With
``return_latents=True`` it also returns both latents (:class:`RestoreLatents`), and
:meth:`DMDiff.decode` re-decodes them for another α with the VAE decoder only.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmdiff.device import eval_mode
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.backbone import (
    PRESETS,
    Backbone,
    check_timestep,
    load_backbone,
    seeded,
)
from dmdiff.model.lora import ModulationMLP, add_modulated_lora, modulated_checkpoint, trainable_parameters
from dmdiff.model.lowpass import gaussian_lowpass
from dmdiff.model.svda import SVDA
from dmdiff.optics.deconvolution import (
    DeconvolutionInputError,
    central_psf,
    check_psf,
    check_psf_grid,
    richardson_lucy_grid_srgb,
    richardson_lucy_srgb,
    wiener_varying_large_scales,
    wiener_varying_with_fine_detail,
)

ALPHA_RANGE = (0.0, 1.2)      # fidelity (0) … perceptual (1), slight extrapolation allowed
#: The path modulation is ``PATH_MODULATION_SCALE · P`` with ``P`` the trained parameter: Adam moves
#: each parameter by about the learning rate per step whatever its gradient's scale, so without the
#: factor the paths' modulations would need ~1000 steps at lr 1e-3 to move by the identity's size.
PATH_MODULATION_SCALE = 20.0
#: Block size (px) of the Wiener colour anchor's computation (``anchor_wiener_nsr``): 3 px blocks scored
#: higher than 5 px and than full resolution on the validation split (docs/svda.md), at about a tenth of
#: full resolution's time.
ANCHOR_WIENER_SCALE_PX = 3


@dataclass
class Prompts:
    """The text of each path (our own wording, docs/method.md)."""

    positive: str = ("a sharp, detailed, high-quality photo with crisp edges, clean fine textures, "
                     "natural vivid colours and good exposure")
    neutral: str = "a plain, balanced, faithful photo with natural colours and contrast, true to the scene"
    negative: str = ("a blurry, hazy, low-contrast capture through a flat metalens, with chromatic fringes, "
                     "colour haze, soft edges and sensor noise")


@dataclass
class DMDiffConfig:
    """What a DMDiff model is made of (docs/architecture.md, "dmdiff.model").

    preset: backbone preset (``"tiny"``, ``"sd-turbo"``, ``"sd-turbo-shape"``).
    model_path: ``sd-turbo``: its folder or hub id (None: ``stabilityai/sd-turbo`` in the HF cache);
        ``tiny``: a saved tiny backbone folder (None: the shipped one, else random init).
    unet_rank, vae_rank: LoRA ranks (None: ``lora.RANKS[preset]``).
    svda: degradation-modulated LoRA through SVDA; False: plain LoRA, no degradation input.
    svda_spatial: one modulation per grid cell instead of one per image.
    svda_dim: SVDA token / embedding width (multiple of 4).
    grid_size: SVDA grid G (cells per side).
    timestep: the one denoising step's timestep t (0 … 999); None: the backbone's
        ``one_step_timestep`` (resolved when the model is built, so a saved model records it).
    anchor_sigma_px: the colour anchor of the positive and neutral paths: their output is
        ``d − G_σ(d) + G_σ(x)`` (``d`` the decoded image, ``x`` the input, ``G_σ`` a Gaussian low-pass
        of σ = ``anchor_sigma_px`` input pixels, :func:`~dmdiff.model.lowpass.gaussian_lowpass`), so
        the network supplies only what is finer than σ and the large-scale colours stay the
        capture's, in training and at inference alike. None: the decoded image as it is (the
        negative path is never anchored: its target's colours are the capture's, not its input's).
    anchor_rl_iterations: deconvolve the input before taking its low-pass: the anchor becomes
        ``G_σ(RL_n(x))``, ``RL_n`` being ``n`` Richardson–Lucy iterations with the lens's central
        PSF (:mod:`dmdiff.optics.deconvolution`; the PSF is set with :meth:`DMDiff.set_anchor_psf`
        and saved with the pipeline), so the large-scale colours are the deconvolved capture's —
        less of the lens's blur and chromatic spread — instead of the raw capture's. None: ``G_σ(x)``.
        Needs ``anchor_sigma_px``.
    anchor_wiener_nsr: deconvolve the input's large scales with the lens's whole PSF grid instead:
        the anchor becomes ``G_σ(W(x))``, ``W`` the spatially varying Wiener filter of
        :func:`~dmdiff.optics.deconvolution.wiener_varying_large_scales` (on blocks of
        :data:`ANCHOR_WIENER_SCALE_PX` px) with this regularisation weight, so each part of the
        field is deconvolved with its own PSF; the grid ``(3, G, G, K, K)`` is set with
        :meth:`DMDiff.set_anchor_psf` and saved with the pipeline — except for a model trained on a
        lens family, whose anchor takes each capture's own lens grid (set per capture by
        ``dmdiff evaluate`` from the dataset's ``lens.json`` and by ``dmdiff restore --lens``). The anchor of a training crop
        is cut from its whole frame's (:mod:`dmdiff.train.data`), as at inference, where a tiled
        photo is anchored whole. Needs ``anchor_sigma_px``; excludes ``anchor_rl_iterations``.
    input_wiener_nsr: deconvolve the network's input too: the positive and neutral paths see
        ``W(x) + x − B(x)`` instead of the capture ``x``
        (:func:`~dmdiff.optics.deconvolution.wiener_varying_with_fine_detail`, blocks of
        :data:`ANCHOR_WIENER_SCALE_PX` px, this regularisation weight, the same PSF grid as the
        anchor): its large and middle scales deconvolved with each part of the field's own PSF, its
        finest detail as captured, so the network no longer has to undo blur wider than its training
        crop. Computed on whole frames, like the anchor (training crops are cut from their frame's,
        tiles from the photo's). The negative path's input, the scene, is never changed. None: the
        capture as it is. Needs ``anchor_wiener_nsr`` (it uses the grid that anchor keeps).
    input_rl_iterations: deconvolve the network's input with this many Richardson–Lucy iterations
        with the lens's whole PSF grid instead (:func:`~dmdiff.optics.deconvolution.richardson_lucy_grid_srgb`,
        full resolution, each part of the field with its own PSF; the default of ``configs/tiny.yaml``,
        docs/method.md "The deconvolved input"). Computed on whole frames like ``input_wiener_nsr``;
        needs ``anchor_wiener_nsr`` too; excludes ``input_wiener_nsr``.
    path_modulation: give each path its own learned modulation of the UNet's LoRA in every block
        (``M = M_svda + P_path``, ``P`` zero at initialisation), besides its prompt. The prompt alone
        reaches the UNet through cross-attention only, which the tiny backbone has at its two coarsest
        levels: there the paths stayed identical after training (docs/method.md). False: the
        prompts alone tell the paths apart (pipelines saved before this option load with False).
    recommended_alpha: the α a restoration uses when none is asked for (``dmdiff restore``, the
        evaluation's "recommended α" row), chosen on the validation split by the training recipe;
        None: no recommendation (α = 1, the positive path).
    prompts: the text of each path.
    seed: random init of SVDA and the MLPs, and of random-init backbones built from this config.
    """

    preset: str = "tiny"
    model_path: str | None = None
    unet_rank: int | None = None
    vae_rank: int | None = None
    svda: bool = True
    svda_spatial: bool = False
    svda_dim: int = 128
    grid_size: int = 7
    timestep: int | None = None
    anchor_sigma_px: float | None = None
    anchor_rl_iterations: int | None = None
    anchor_wiener_nsr: float | None = None
    input_wiener_nsr: float | None = None
    input_rl_iterations: int | None = None
    path_modulation: bool = True
    recommended_alpha: float | None = None
    prompts: Prompts = field(default_factory=Prompts)
    seed: int = 0

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown backbone preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.timestep is not None:
            check_timestep(self.timestep)
        if self.svda_spatial and not self.svda:
            raise ConfigError("svda_spatial=True needs svda=True (there is no modulation without SVDA)")
        if self.svda_dim <= 0 or self.svda_dim % 4:
            raise ConfigError(f"svda_dim must be a positive multiple of 4, got {self.svda_dim}")
        if self.anchor_sigma_px is not None and (isinstance(self.anchor_sigma_px, bool)
                                                 or not isinstance(self.anchor_sigma_px, numbers.Real)
                                                 or not 0 < self.anchor_sigma_px < 1e4):
            raise ConfigError(f"anchor_sigma_px must be a positive number of pixels or None, got {self.anchor_sigma_px!r}")
        for key in ("anchor_rl_iterations", "input_rl_iterations"):     # iteration counts
            n = getattr(self, key)
            if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
                raise ConfigError(f"{key} must be an integer >= 1 or None, got {n!r}")
        for key in ("anchor_wiener_nsr", "input_wiener_nsr"):            # Wiener regularisation weights
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1e6):
                raise ConfigError(f"{key} must be a positive number or None, got {v!r}")
        for key in ("anchor_rl_iterations", "anchor_wiener_nsr"):
            if getattr(self, key) is not None and self.anchor_sigma_px is None:
                raise ConfigError(f"{key} needs a colour anchor: set anchor_sigma_px too")
        if self.anchor_rl_iterations is not None and self.anchor_wiener_nsr is not None:
            raise ConfigError("anchor_rl_iterations and anchor_wiener_nsr are two ways to deconvolve the "
                              "colour anchor: set one of them (the other null)")
        if self.input_rl_iterations is not None and self.input_wiener_nsr is not None:
            raise ConfigError("input_rl_iterations and input_wiener_nsr are two ways to deconvolve the "
                              "network's input: set one of them (the other null)")
        for key in ("input_wiener_nsr", "input_rl_iterations"):
            if getattr(self, key) is not None and self.anchor_wiener_nsr is None:
                raise ConfigError(f"{key} deconvolves the input with the PSF grid of the Wiener colour anchor: "
                                  f"set anchor_wiener_nsr (and anchor_sigma_px) too, or {key}: null")
        if self.recommended_alpha is not None:
            try:
                self.recommended_alpha = check_alpha(self.recommended_alpha)
            except ConfigError as e:
                raise ConfigError(f"recommended_alpha: {e}") from None
        if not 1 <= self.grid_size <= 64:
            raise ConfigError(f"grid_size must be in [1, 64], got {self.grid_size}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        for name in ("unet_rank", "vae_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer or None, got {getattr(self, name)}")

    @property
    def anchor_deconvolves(self) -> bool:
        """Whether the colour anchor deconvolves its input (and so needs a PSF)."""
        return self.anchor_rl_iterations is not None or self.anchor_wiener_nsr is not None

    @property
    def input_deconvolution_key(self) -> str | None:
        """The key that deconvolves the network's input with the lens's PSF grid (``input_rl_iterations``
        or ``input_wiener_nsr``); None: the network sees the capture."""
        return next((k for k in ("input_rl_iterations", "input_wiener_nsr") if getattr(self, k) is not None), None)

    @property
    def input_deconvolves(self) -> bool:
        """Whether the network's input is the capture deconvolved with the lens's PSF grid."""
        return self.input_deconvolution_key is not None

    @property
    def anchor_deconvolution(self) -> str | None:
        """How the colour anchor deconvolves, in words (None: it does not)."""
        if self.anchor_rl_iterations is not None:
            return f"{self.anchor_rl_iterations} Richardson–Lucy iterations with the lens's central PSF"
        if self.anchor_wiener_nsr is not None:
            return f"a Wiener filter with the lens's PSF grid, nsr {self.anchor_wiener_nsr:g}"
        return None


@torch.no_grad()
def network_input(x: torch.Tensor, config: DMDiffConfig, psf: torch.Tensor | None) -> torch.Tensor:
    """What the positive and neutral paths' network sees of the captures ``x`` ``(B, 3, H, W)`` → same:
    ``x`` itself, or the capture deconvolved with the PSF grid ``psf`` ``(3, G, G, K, K)``: with
    ``config.input_rl_iterations`` by Richardson–Lucy (:func:`richardson_lucy_grid_srgb`), with
    ``config.input_wiener_nsr`` at large and middle scales (:func:`wiener_varying_with_fine_detail`);
    no gradient. A function of its arguments alone, so a dataset can compute it on whole training frames."""
    if config.input_rl_iterations is not None:
        return richardson_lucy_grid_srgb(x, psf, config.input_rl_iterations)
    if config.input_wiener_nsr is None:
        return x
    return wiener_varying_with_fine_detail(x, psf, config.input_wiener_nsr, ANCHOR_WIENER_SCALE_PX)


def colour_anchor(x: torch.Tensor, config: DMDiffConfig, psf: torch.Tensor | None) -> torch.Tensor:
    """The colour anchor of ``config`` for the images ``x`` ``(B, 3, H, W)`` → same: ``G_σ(x)``,
    ``G_σ(RL_n(x))`` or ``G_σ(W(x))`` (``DMDiffConfig.anchor_sigma_px``, ``anchor_rl_iterations``,
    ``anchor_wiener_nsr``) with ``psf`` the normalised PSF (``(3, K, K)``) or grid (``(3, G, G, K, K)``)
    of :meth:`DMDiff.set_anchor_psf`; no gradient. A function of its arguments alone, so a dataset can
    anchor whole training frames with it (:mod:`dmdiff.train.data`)."""
    if config.anchor_rl_iterations is not None:
        x = richardson_lucy_srgb(x, psf, config.anchor_rl_iterations)
    elif config.anchor_wiener_nsr is not None:
        x = wiener_varying_large_scales(x, psf, config.anchor_wiener_nsr, ANCHOR_WIENER_SCALE_PX)
    return gaussian_lowpass(x, config.anchor_sigma_px)


@dataclass
class RestoreLatents:
    """The cached two-path latents of :meth:`DMDiff.restore`, for re-decoding at another α.

    z_neutral, z_positive: ``(B, 4, h, w)`` x0 predictions of the padded image (``h = H_pad / f``,
        f = ``backbone.vae_scale_factor``); one of them None when only the other path was computed
        (:func:`decoded_paths`: latents for α = 0 or 1 only).
    size: ``(H, W)`` of the input image, in pixels.
    pad: ``(left, right, top, bottom)`` padding added to it, in pixels.
    anchor: the colour anchor ``(B, 3, H, W)`` of the input (:meth:`DMDiff.input_anchor`) for a
        model with one (``DMDiffConfig.anchor_sigma_px``), else None.
    """

    z_neutral: torch.Tensor | None
    z_positive: torch.Tensor | None
    size: tuple[int, int]
    pad: tuple[int, int, int, int]
    anchor: torch.Tensor | None = None

    @property
    def any(self) -> torch.Tensor:
        """One of the paths' latents (the neutral path's when present), for their shape and device."""
        return self.z_positive if self.z_neutral is None else self.z_neutral


#: The two paths decoding mixes, in the order of their rows in the UNet batch.
DECODED_PATHS = ("neutral", "positive")


def decoded_paths(alpha: float | None) -> tuple[str, ...]:
    """The paths whose latents decoding at ``alpha`` needs: only the neutral path at α = 0, only the
    positive at α = 1, both otherwise or when ``alpha`` is None (latents kept for any α)."""
    if alpha == 0:
        return ("neutral",)
    if alpha == 1:
        return ("positive",)
    return DECODED_PATHS


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float if it is a finite number in ``ALPHA_RANGE``, else a ConfigError."""
    lo, hi = ALPHA_RANGE
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not lo <= alpha <= hi:
        raise ConfigError(f"alpha must be a number in [{lo}, {hi}] (0: fidelity, 1: perceptual, up to "
                          f"{hi}: slight extrapolation), got {alpha!r}")
    return float(alpha)


class DMDiff(nn.Module):
    """The DMDiff model: a LoRA-adapted one-step backbone, SVDA and the modulation MLPs.

    Args:
        config: the model description; its ``preset`` must match ``backbone``'s.
        backbone: a loaded backbone to adapt **in place** (None: ``load_backbone(config.preset,
            config.model_path, seed=config.seed)``). It must not carry a DMDiff adapter yet.

    The backbone networks are sub-modules (``unet``, ``vae``, ``text_encoder``), so ``.to()`` moves
    everything; ``backbone`` (tokenizer, scheduler, sizes) stays reachable as an attribute. The
    model starts in eval mode. Images are ``(B, 3, H, W)`` sRGB in ``[0, 1]``, any ``H × W``;
    ``maps`` are ``(B, 7, G', G')`` optics maps (``MAP_CHANNELS``) or None.
    """

    PATHS = ("positive", "neutral", "negative")

    def __init__(self, config: DMDiffConfig = DMDiffConfig(), backbone: Backbone | None = None):
        super().__init__()
        if backbone is None:
            backbone = load_backbone(config.preset, config.model_path, seed=config.seed)
        elif backbone.preset != config.preset:
            raise ConfigError(f"config.preset is {config.preset!r} but the backbone is a {backbone.preset!r} one")
        if config.timestep is None:
            config = replace(config, timestep=backbone.one_step_timestep)
        self.config, self.backbone = config, backbone
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        self.unet_lora, self.vae_lora = add_modulated_lora(backbone, config.unet_rank, config.vae_rank)
        self.svda, self.mlp = None, None
        if config.svda:
            loras = {"vae": self.vae_lora, "unet": self.unet_lora}
            with seeded(config.seed):
                self.svda = SVDA({part: lora.state.n_blocks for part, lora in loras.items()},
                                 dim=config.svda_dim, grid_size=config.grid_size, spatial=config.svda_spatial)
                self.mlp = nn.ModuleDict({part: ModulationMLP(lora.state.n_blocks, config.svda_dim, lora.rank)
                                          for part, lora in loras.items()})
            self.to(backbone.device, self.dtype)
        rank, n_blocks = self.unet_lora.rank, self.unet_lora.state.n_blocks
        self.path_modulation = nn.Parameter(torch.zeros(len(self.PATHS), n_blocks, rank, rank, device=backbone.device,
                                                        dtype=self.dtype)) if config.path_modulation else None
        prompts = [getattr(config.prompts, path) for path in self.PATHS]
        self.register_buffer("text_embeddings", backbone.encode_prompt(prompts), persistent=False)  # (3, 77, D)
        self.register_buffer("anchor_psf", None, persistent=False)      # set_anchor_psf
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ training interface

    def forward(self, x: torch.Tensor, maps: torch.Tensor | None = None,
                path: str | Sequence[str] = "positive", anchor: torch.Tensor | None = None) -> torch.Tensor:
        """One differentiable step along ``path``: ``(B, 3, H, W)`` → ``(B, 3, H, W)``, about [0, 1] (not clamped).

        ``path`` is one path for the whole batch or a sequence of B paths, one per sample (still one
        VAE-encoder and one UNet call: each sample cross-attends to its own prompt). ``x`` is what the
        network sees: for the positive and neutral paths of a model with a deconvolved input
        (``config.input_deconvolves``), :meth:`network_input` of the capture (training cuts it from
        the whole frame's), else the capture; for the negative path the scene. ``anchor``: the
        colour anchor ``(B, 3, H, W)`` of the capture when the caller has it (a crop's, cut from its
        whole frame's); None: :meth:`input_anchor` of ``x`` (only right when ``x`` is the capture).
        """
        paths = [path] * len(x) if isinstance(path, str) else list(path)
        if len(paths) != len(x):
            raise ValueError(f"got {len(paths)} paths for a batch of {len(x)} images")
        z0, geometry = self._z0(x, maps, [self._path_index(p) for p in paths], copies=1)
        y = self._decode(z0, *geometry)
        if self.config.anchor_sigma_px is None:
            return y
        keep = torch.tensor([p != "negative" for p in paths], dtype=y.dtype, device=y.device).view(-1, 1, 1, 1)
        if not keep.any():
            return y
        anchor = self.input_anchor(x) if anchor is None else anchor.to(y)
        return y + keep * (anchor - self.input_lowpass(y))

    def latents(self, x: torch.Tensor, maps: torch.Tensor | None = None,
                paths: Sequence[str] = ("neutral", "positive")) -> dict[str, torch.Tensor]:
        """x0 latents ``(B, 4, h, w)`` of the padded image per path, from one VAE encoding and one
        UNet call on the ``len(paths) · B`` stacked latents (differentiable)."""
        return self._paths_z0(x, maps, paths)[0]

    def _paths_z0(self, x: torch.Tensor, maps: torch.Tensor | None,
                  paths: Sequence[str]) -> tuple[dict[str, torch.Tensor], tuple]:
        """:meth:`latents` and the geometry ``((H, W), pad)`` for decoding them."""
        paths = tuple(paths)
        if len(set(paths)) != len(paths):
            raise ValueError(f"paths must be distinct, got {paths}")
        index = [self._path_index(p) for p in paths for _ in range(len(x))]
        z0, geometry = self._z0(x, maps, index, copies=len(paths))
        return dict(zip(paths, z0.chunk(len(paths)))), geometry

    def enable_gradient_checkpointing(self) -> None:
        """Keep only the UNet's and the VAE's block inputs in training and recompute the blocks'
        activations in the backward pass (less memory for ~one more forward pass of compute); the
        gradients are those without it, the modulated LoRA included
        (:func:`~dmdiff.model.lora.modulated_checkpoint`)."""
        checkpointed = modulated_checkpoint([self.unet_lora.state, self.vae_lora.state])
        self.unet.enable_gradient_checkpointing(checkpointed)
        self.vae.enable_gradient_checkpointing(checkpointed)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """What training updates, named as in ``named_parameters()``: LoRA A/B of the UNet and VAE
        encoder (``unet.…lora_A.dmdiff.weight``), ``unet.conv_in.*``, ``svda.*``, ``mlp.{unet,vae}.*``,
        ``path_modulation``."""
        modules = {"svda": self.svda, "mlp": self.mlp} if self.svda is not None else {}
        params = trainable_parameters([self.unet_lora, self.vae_lora], modules)
        if self.path_modulation is not None:
            params["path_modulation"] = self.path_modulation
        return params

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as one flat ``str → Tensor`` dict (safetensors-ready, contiguous; the
        tensors share memory with the parameters, as ``nn.Module.state_dict``'s do).

        Keys: ``unet.<peft LoRA key>`` (adapter name stripped, as ``get_peft_model_state_dict``),
        ``unet.conv_in.{weight,bias}``, ``vae.<peft LoRA key>``, ``svda.*``, ``mlp.{unet,vae}.*``,
        ``path_modulation`` ``(3, n_blocks, r, r)``.
        """
        loras = (self.unet_lora, self.vae_lora)
        state = {f"{lora.part}.{k}": v for lora in loras for k, v in lora.state_dict().items()}
        if self.svda is not None:
            state.update({f"svda.{k}": v for k, v in self.svda.state_dict().items()})
            state.update({f"mlp.{k}": v for k, v in self.mlp.state_dict().items()})
        if self.path_modulation is not None:
            state["path_modulation"] = self.path_modulation
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; strict (DmdiffError on missing, unexpected or
        misshapen entries, e.g. weights of a model with other ranks or without SVDA)."""
        parts = {"unet": {}, "vae": {}, **({"svda": {}, "mlp": {}} if self.svda is not None else {})}
        unexpected = []
        paths = state_dict.get("path_modulation")
        if (paths is None) != (self.path_modulation is None):
            raise DmdiffError(f"trainable weights do not fit this model (path_modulation={self.config.path_modulation}): "
                              f"they {'lack' if paths is None else 'hold'} a path modulation")
        if paths is not None and paths.shape != self.path_modulation.shape:
            raise DmdiffError(f"trainable weights do not fit this model: path_modulation is {tuple(paths.shape)}, "
                              f"this model's {tuple(self.path_modulation.shape)}")
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if key == "path_modulation":
                continue
            if head in parts:
                parts[head][rest] = value
            else:
                unexpected.append(key)
        if unexpected:
            raise DmdiffError(f"trainable weights do not fit this model (svda={self.config.svda}): unexpected "
                              f"keys {sorted(unexpected)[:3]}{' …' if len(unexpected) > 3 else ''}")
        try:
            self.unet_lora.load_state_dict(parts["unet"])
            self.vae_lora.load_state_dict(parts["vae"])
            if self.svda is not None:
                self.svda.load_state_dict(parts["svda"])
                self.mlp.load_state_dict(parts["mlp"])
            if paths is not None:
                with torch.no_grad():
                    self.path_modulation.copy_(paths)
        except RuntimeError as err:     # torch's strict-loading / size-mismatch errors
            raise DmdiffError(f"trainable weights do not fit this model: {err}") from err

    # ------------------------------------------------------------------ inference

    def restore(self, lr: torch.Tensor, maps: torch.Tensor | None = None, alpha: float = 1.0,
                return_latents: bool = False) -> torch.Tensor | tuple[torch.Tensor, RestoreLatents]:
        """Restore captures: ``(B, 3, H, W)`` → ``(B, 3, H, W)`` in ``[0, 1]`` (clamped), no grad, eval mode.

        Args:
            lr: the captures, sRGB in ``[0, 1]``.
            maps: their optics maps ``(B, 7, G', G')`` or None.
            alpha: in ``[0, 1.2]``; decodes ``(1 − α) · z_neutral + α · z_positive``.
            return_latents: also return the :class:`RestoreLatents` for :meth:`decode`.
        """
        alpha = check_alpha(alpha)
        latents = self.restore_latents(lr, maps)
        images = self.decode(latents, alpha)
        return (images, latents) if return_latents else images

    def restore_latents(self, lr: torch.Tensor, maps: torch.Tensor | None = None,
                        anchor: torch.Tensor | None = None,
                        paths: Sequence[str] = DECODED_PATHS, seen: torch.Tensor | None = None) -> RestoreLatents:
        """The encoder + UNet half of :meth:`restore`: the paths' x0 latents (:meth:`path_latents`)
        and, for a model with a colour anchor, the anchor of ``lr``; no grad, eval mode.

        ``anchor``: :meth:`input_anchor` of ``lr`` when the caller computed it already (e.g. in a
        thread reading ahead, :meth:`DMDiffPipeline.prepare <dmdiff.model.pipeline.DMDiffPipeline.prepare>`):
        used as it is; None: computed here. Models without an anchor ignore it. ``paths``: as in
        :meth:`path_latents`. ``seen``: :meth:`network_input` of ``lr`` when the caller computed it
        already (likewise); None: computed here.
        """
        if seen is None:
            with self._inference():
                seen = self.network_input(lr.to(self.device, self.dtype))
        latents = self.path_latents(seen, maps, paths)
        if self.config.anchor_sigma_px is not None:
            with self._inference():
                latents.anchor = self.input_anchor(lr.to(self.device, self.dtype)) if anchor is None else anchor
        return latents

    def path_latents(self, lr: torch.Tensor, maps: torch.Tensor | None = None,
                     paths: Sequence[str] = DECODED_PATHS) -> RestoreLatents:
        """The x0 latents (:meth:`latents`) of ``lr`` ``(B, 3, H, W)`` — the network's input,
        :meth:`network_input` of the capture — with its ``maps``
        ``(B, 7, G', G')`` or None, without the colour anchor (``anchor`` None): one VAE encoding and
        one batched UNet call of the ``paths`` (both by default; :func:`decoded_paths` ``(α)`` for one decoding only: at α = 0
        or 1 the UNet runs half the batch, and the path computed agrees with the two-path call to
        float round-off, ~5e-7); no grad, eval mode. Tiled restoration (:mod:`dmdiff.model.tiling`)
        calls it once per tile, the anchor being the whole image's."""
        unknown = sorted(set(paths) - set(DECODED_PATHS))
        if unknown or not paths:
            raise ConfigError(f"paths must be some of {', '.join(DECODED_PATHS)}, got {list(paths)!r}")
        with self._inference():
            z, geometry = self._paths_z0(lr, maps, [p for p in DECODED_PATHS if p in paths])
        return RestoreLatents(z.get("neutral"), z.get("positive"), *geometry)

    def input_lowpass(self, x: torch.Tensor) -> torch.Tensor:
        """``G_σ(x)`` of the colour anchor, ``(B, 3, H, W)`` → same (σ = ``config.anchor_sigma_px``)."""
        return gaussian_lowpass(x, self.config.anchor_sigma_px)

    def input_anchor(self, x: torch.Tensor) -> torch.Tensor:
        """The colour anchor of the input ``x`` ``(B, 3, H, W)`` → same: ``G_σ(x)``, ``G_σ(RL_n(x))``
        with ``config.anchor_rl_iterations = n``, or ``G_σ(W(x))`` with ``config.anchor_wiener_nsr``
        (no gradient through ``RL_n`` or ``W``). ``x`` is a whole frame for the Wiener anchor (its
        PSF grid spans the frame).

        Raises:
            DmdiffError: the model deconvolves but has no PSF (:meth:`set_anchor_psf`).
        """
        self._check_psf()
        return colour_anchor(x, self.config, self.anchor_psf)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the positive and neutral paths' network sees of the captures ``x`` ``(B, 3, H, W)`` →
        same: ``x``, or with ``config.input_rl_iterations`` / ``input_wiener_nsr`` its deconvolution
        with the lens's PSF grid (:func:`network_input`; no gradient). ``x`` is a whole frame (the
        grid spans it).

        Raises:
            DmdiffError: the model deconvolves but has no PSF (:meth:`set_anchor_psf`).
        """
        if not self.config.input_deconvolves:
            return x
        self._check_psf()
        return network_input(x, self.config, self.anchor_psf)

    def _check_psf(self) -> None:
        """DmdiffError when the model deconvolves (its anchor, and its input) but has no PSF set."""
        config = self.config
        if config.anchor_deconvolves and self.anchor_psf is None:
            raise DmdiffError(f"this model's colour anchor deconvolves its input ({config.anchor_deconvolution}) "
                              "but no PSF is set: a model trained on a lens family needs the capture's lens "
                              "(dmdiff restore --lens FILE; dmdiff evaluate takes it from the dataset's lens.json); "
                              "otherwise load the model from its pipeline folder (which stores it), or call "
                              "set_anchor_psf")

    def set_anchor_psf(self, psf) -> None:
        """Set the PSF of the deconvolved colour anchor: the training lens's, or the lens of the captures
        about to be restored.

        Args:
            psf: numpy or tensor, ``K`` odd, centred at ``K // 2``, non-negative, each kernel with
                some energy: the lens's whole ``(3, G, G, K, K)`` PSF grid, of which
                ``config.anchor_rl_iterations`` uses the central PSF
                (:func:`~dmdiff.optics.deconvolution.central_psf`; or give it that ``(3, K, K)``
                PSF) and ``config.anchor_wiener_nsr`` the whole grid. Stored float32 on the model's
                device, each kernel normalised to sum 1 (:func:`~dmdiff.optics.deconvolution.check_psf`
                / ``check_psf_grid``: the baselines' checks and white-balance convention).

        Raises:
            DmdiffError: the model does not deconvolve its anchor, or ``psf`` is malformed.
        """
        config = self.config
        if not config.anchor_deconvolves:
            raise DmdiffError("set_anchor_psf: this model's anchor does not deconvolve "
                              "(anchor_rl_iterations and anchor_wiener_nsr are None)")
        array = torch.as_tensor(psf).detach().cpu().numpy()
        try:
            if config.anchor_rl_iterations is not None:
                normalised = check_psf(central_psf(array) if array.ndim == 5 else array)
            else:
                normalised = check_psf_grid(array)
        except DeconvolutionInputError as err:
            raise DmdiffError(f"the anchor PSF is unusable ({config.anchor_deconvolution}): {err}") from None
        self.anchor_psf = torch.from_numpy(normalised).to(self.device, torch.float32)

    def use_capture_lens(self, grid) -> None:
        """Anchor the next restorations with the lens of the captures they restore: :meth:`set_anchor_psf`
        with ``grid``, that lens's ``(3, G, G, K, K)`` PSF grid, for a model whose anchor deconvolves;
        nothing for other models or when ``grid`` is None (the model keeps its own lens's PSF). What
        ``dmdiff evaluate`` does per test image of a simulated dataset, and ``dmdiff restore --lens``
        per capture, as they give SVDA each capture's maps."""
        if grid is not None and self.config.anchor_deconvolves:
            self.set_anchor_psf(grid)

    def anchored(self, y: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """``y − G_σ(y) + anchor`` (``anchor = G_σ(input)``), or ``y`` when ``anchor`` is None; not clamped."""
        if anchor is None:
            return y
        detail = (y - self.input_lowpass(y)).to(torch.result_type(y, anchor))
        return detail.add_(anchor)           # in place: one whole-image array less at a time (large photos)

    def decode(self, latents: RestoreLatents, alpha: float, clamp: bool = True) -> torch.Tensor:
        """Re-decode cached latents at another ``alpha`` (VAE decoder only, then the colour anchor
        when ``latents.anchor`` is set): ``(B, 3, H, W)`` in ``[0, 1]`` (``clamp=False``: not clamped,
        for blending tiles).

        Bit-identical to ``restore(..., alpha=alpha)`` on the same device.
        """
        alpha = check_alpha(alpha)
        with self._inference():
            y = self._mix(latents, alpha)
        return y.clamp(0, 1) if clamp else y

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's own round trip, ``decode(encode(x))`` through the frozen base VAE (no UNet):
        ``(B, 3, H, W)`` in ``[0, 1]`` → the same, clamped, with this model's padding; no grad.

        The VAE encoder carries this model's LoRA; the modulation ``M = 0`` switches that branch
        off exactly (``base(x) + B(0·A(x)) = base(x)``, :mod:`dmdiff.model.lora`), and the decoder
        has none, so this is what the backbone alone can reproduce: a ceiling for every output
        decoded by this VAE.
        """
        lora = self.vae_lora
        zeros = torch.zeros(len(images), lora.state.n_blocks, lora.rank, lora.rank, device=self.device, dtype=self.dtype)
        with self._inference():
            x = images.to(self.device, self.dtype)
            padded, pad = self.pad(x)
            with lora.state.using(zeros):
                z = self.backbone.encode(padded)
            return self._decode(z, tuple(x.shape[-2:]), pad).clamp(0, 1)

    def degrade(self, gt: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """The negative path, GT → metalens-like capture: ``(B, 3, H, W)`` → ``(B, 3, H, W)`` in
        ``[0, 1]`` (clamped), no grad, eval mode. ``maps`` describe the lens to imitate."""
        with self._inference():
            z0, geometry = self._z0(gt, maps, [self._path_index("negative")] * len(gt), copies=1)
            return self._decode(z0, *geometry).clamp(0, 1)

    # ------------------------------------------------------------------ internals

    def _path_index(self, path: str) -> int:
        if path not in self.PATHS:
            raise ConfigError(f"unknown path {path!r}; choose one of {', '.join(self.PATHS)}")
        return self.PATHS.index(path)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """no_grad and eval mode for the block; every sub-module's train/eval flag restored after."""
        with eval_mode(self), torch.no_grad():
            yield

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Pad ``(B, 3, H, W)`` to multiples of ``latent_multiple``, centred; returns the image and
        the padding ``(left, right, top, bottom)``."""
        m = self.backbone.latent_multiple
        H, W = x.shape[-2:]
        ph, pw = -H % m, -W % m
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        if not any(pad):
            return x, pad
        reflect = max(pad[:2]) < W and max(pad[2:]) < H
        return F.pad(x, pad, mode="reflect" if reflect else "replicate"), pad

    def _z0(self, x: torch.Tensor, maps: torch.Tensor | None, text_index: Sequence[int],
            copies: int) -> tuple[torch.Tensor, tuple]:
        """The x0 latents of ``copies`` stacked copies of the batch, copy ``k`` of sample ``b`` (row
        ``k·B + b``) cross-attending to prompt ``text_index[k·B + b]``.

        Returns ``(copies·B, 4, h, w)`` latents and the geometry ``((H, W), pad)`` for decoding.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB tensors in [0, 1], got shape {tuple(x.shape)}")
        x = x.to(self.device, self.dtype)
        if self.svda is not None:
            degradation = self.svda(x, None if maps is None else maps.to(self.device))
            vae_m, unet_m = (self.mlp[part](degradation.embeddings[part]) for part in ("vae", "unet"))
        else:
            vae_m = unet_m = None
        padded, pad = self.pad(x)
        with self.vae_lora.state.using(vae_m):
            z = self.backbone.encode(padded)
        z = z.repeat(copies, 1, 1, 1)
        text_index = torch.as_tensor(text_index, device=self.device)
        text = self.text_embeddings[text_index]
        if self.path_modulation is not None:
            unet_m, copies = self.path_modulated(unet_m, text_index, copies), 1
        with self.unet_lora.state.using(unet_m, repeat=copies):
            z0 = self.backbone.one_step(z, text, self.config.timestep)
        return z0, (tuple(x.shape[-2:]), pad)

    def path_modulated(self, unet_m: torch.Tensor | None, path_index: torch.Tensor, copies: int) -> torch.Tensor:
        """The UNet modulation of each row of a ``copies``-stacked batch: its sample's SVDA modulation
        (``unet_m``, ``(B, n, r, r[, G, G])``, or the identity when None) plus its path's
        ``path_modulation`` ``(n, r, r)``; returns ``(copies·B, n, r, r[, G, G])``."""
        extra = PATH_MODULATION_SCALE * self.path_modulation[path_index]     # (copies·B, n, r, r)
        if unet_m is None:
            return extra + torch.eye(self.unet_lora.rank, dtype=extra.dtype, device=extra.device)
        unet_m = unet_m.repeat(copies, *([1] * (unet_m.dim() - 1)))
        return unet_m + (extra[..., None, None] if unet_m.dim() == 6 else extra)

    def _decode(self, z0: torch.Tensor, size: tuple[int, int], pad: tuple[int, int, int, int]) -> torch.Tensor:
        """Frozen VAE decoder, cropped to ``size``: ``(B, 3, H, W)``, not clamped."""
        y = self.backbone.decode(z0)
        left, _, top, _ = pad
        return y[..., top:top + size[0], left:left + size[1]]

    def _mix(self, latents: RestoreLatents, alpha: float) -> torch.Tensor:
        missing = [p for p in decoded_paths(alpha) if getattr(latents, f"z_{p}") is None]
        if missing:
            raise DmdiffError(f"these latents hold no {missing[0]} path (computed for one α only), so they "
                              f"cannot be decoded at α = {alpha:g}; compute both paths' latents to re-decode")
        if latents.z_neutral is None or latents.z_positive is None:
            z = latents.any        # α = 0 or 1: what (1 − α)·z_neutral + α·z_positive gives, bit for bit
        else:
            z = (1 - alpha) * latents.z_neutral + alpha * latents.z_positive
        return self.anchored(self._decode(z, latents.size, latents.pad), latents.anchor)

