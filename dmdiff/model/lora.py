"""Degradation-modulated LoRA on the UNet and the VAE encoder (docs/method.md, after S3Diff).

Design note
-----------
Every adapted layer computes ``base(x) + B(M · A(x)) · scale``: peft supplies the LoRA layers
(``add_adapter`` with a ``LoraConfig``, ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``
for weights) and this module only adds a forward hook on each ``lora_A[adapter]`` sub-module that
replaces its output ``a = A(x)`` by ``M · a``. peft's forward is used as is; nothing is copied.

``M`` is an ``r × r`` matrix per sample and per *block id* (VAE: 6 ids, UNet: 10), held by a
:class:`ModulationState` that the caller sets before the forward pass:

* global mode: ``(B, n_blocks, r, r)``, one matrix per image;
* spatially varying mode: ``(B, n_blocks, r, r, G, G)``, one matrix per grid node, interpolated
  bilinearly to each layer's feature map with the grid-node convention of docs/architecture.md
  (node ``i`` at ``(i + 0.5)·h/G − 0.5``; clamped beyond the outer nodes). Conv layers see
  ``a`` as ``(B, r, h, w)``; attention-block Linear layers see ``(B, h·w, r)`` tokens in row-major
  order, whose ``(h, w)`` is inferred from the token count and the aspect ratio of the current
  input (recorded by a pre-hook on the UNet / VAE encoder). Cross-attention ``to_k`` / ``to_v``
  act on text tokens, not on pixels, and use the spatial mean of ``M``.
* ``None``: identity, i.e. plain LoRA.

Block ids (any depth): the adapted part is split into stages in data-flow order and stage ``s`` of
``S`` gets id ``floor(s · n_blocks / S)``. UNet stages: ``down_blocks.0 … down_blocks.D−1``,
``mid_block``, ``up_blocks.0 … up_blocks.D−1``, ``conv_out`` (S = 2D + 2; SD-Turbo and tiny: D = 4,
so ids 0–9 one-to-one). VAE-encoder stages: ``down_blocks.0`` (with
``conv_in``) … ``down_blocks.D−1``, ``mid_block``, ``conv_out`` (S = D + 2; SD-Turbo: ids 0–5;
tiny: 0, 1, 3, 4).

Initialisation: peft's LoRA init (``B = 0``) and :class:`ModulationMLP` returning ``M = I + Δ``
with ``Δ``'s last layer zero, so training starts from plain LoRA, which itself starts at the
frozen base model; gradients reach ``B`` at once (``M · A(x) ≠ 0``). Starting from ``M = 0``
instead would give zero gradients to A, B and the MLP alike. ``M = 0`` switches the LoRA branch
off exactly: the output equals the frozen base model's.

Not supported (they bypass or split the hooked call): merged adapters, peft's mixed-batch
``adapter_names`` forward, VAE slicing/tiling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from dmdiff.errors import DmdiffError
from dmdiff.weights import load_safetensors, save_safetensors

ADAPTER_NAME = "dmdiff"

# Default LoRA ranks per backbone preset (docs/method.md: 32 / 16 for SD-Turbo).
RANKS = {"tiny": {"unet": 8, "vae": 4},
         "sd-turbo": {"unet": 32, "vae": 16},
         "sd-turbo-shape": {"unet": 32, "vae": 16}}

_UNET_LAYERS = r"to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|conv1|conv2|conv_shortcut|conv"
_VAE_LAYERS = r"to_q|to_k|to_v|to_out\.0|conv1|conv2|conv_shortcut|conv"


@dataclass(frozen=True)
class PartSpec:
    """What is adapted in one backbone part.

    target_modules: peft regex (full match against module names of the *part's model*).
    entry: the sub-module whose input defines the image/latent size (``""`` = the model itself).
    fully_trained: sub-modules trained in full rather than through LoRA.
    """

    n_blocks: int
    target_modules: str
    entry: str
    fully_trained: tuple[str, ...]


PARTS = {
    # attention projections, feed-forward, resnet convs, down/upsampler convs, proj_in/out, conv_out
    "unet": PartSpec(10, rf"(down_blocks|mid_block|up_blocks)\..*\.({_UNET_LAYERS})|conv_out", "", ("conv_in",)),
    # the VAE encoder only (the decoder and quant_conv stay frozen)
    "vae": PartSpec(6, rf"encoder\.(conv_in|conv_out|(down_blocks|mid_block)\..*\.({_VAE_LAYERS}))", "encoder", ()),
}

# How a LoRA layer's A output is laid out: conv maps, spatial tokens, or text tokens (not spatial).
CONV, TOKENS, TEXT = "conv", "tokens", "text"


def block_id(name: str, part: str, depth: int, n_blocks: int | None = None) -> int:
    """Block id of the adapted module ``name`` (a module name inside the part's model).

    Args:
        name: e.g. ``"up_blocks.1.resnets.0.conv1"`` (UNet) or ``"encoder.mid_block.resnets.0.conv2"`` (VAE).
        part: ``"unet"`` or ``"vae"``.
        depth: number of down blocks of the UNet / VAE encoder (D in the module docstring).
        n_blocks: number of ids (default: 10 UNet, 6 VAE).
    """
    n_blocks = n_blocks or PARTS[part].n_blocks
    keys = name.split(".")
    if part == "vae":
        keys = keys[1:]                                   # drop "encoder"
        stages = {"conv_in": 0, "mid_block": depth, "conv_out": depth + 1}
        n_stages = depth + 2
    else:
        stages = {"mid_block": depth, "conv_out": 2 * depth + 1}
        n_stages = 2 * depth + 2
    if keys[0] == "down_blocks":
        stage = int(keys[1])
    elif keys[0] == "up_blocks" and part == "unet":
        stage = depth + 1 + int(keys[1])
    elif keys[0] in stages:
        stage = stages[keys[0]]
    else:
        raise ValueError(f"{name!r} belongs to no {part} stage (down_blocks, mid_block, up_blocks, conv_out)")
    return stage * n_blocks // n_stages


@lru_cache(maxsize=1024)
def token_grid(n_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` with ``h · w = n_tokens`` whose aspect ratio is closest to ``input_hw``'s.

    A transformer block at any UNet/VAE level flattens an ``h × w`` feature map of the input's
    aspect ratio (up to rounding of odd sizes), so the closest divisor pair recovers it.
    """
    target = math.log(input_hw[0] / input_hw[1])
    divisors = (h for h in range(1, n_tokens + 1) if n_tokens % h == 0)
    h = min(divisors, key=lambda h: abs(math.log(h * h / n_tokens) - target))
    return h, n_tokens // h


class ModulationState:
    """The current modulation matrices of one adapted part, read by its LoRA hooks.

    ``matrices`` is ``None`` (identity: plain LoRA), ``(B, n_blocks, r, r)`` (global) or
    ``(B, n_blocks, r, r, G, G)`` (spatially varying). Interpolated matrices are cached per
    block and feature-map size for the duration of one forward pass of the part.
    """

    def __init__(self, n_blocks: int, rank: int):
        self.n_blocks = n_blocks
        self.rank = rank
        self.matrices: torch.Tensor | None = None
        self.input_hw: tuple[int, int] | None = None   # (H, W) of the part's current input
        self._cache: dict = {}

    def set(self, matrices: torch.Tensor | None, repeat: int = 1) -> None:
        """Use ``matrices`` from now on (``None``: plain LoRA).

        ``repeat = n`` tiles the batch for a forward pass on ``torch.cat([x] * n)`` (e.g. the neutral
        and positive paths batched together): sample ``k`` of the result uses ``matrices[k % B]``.
        """
        if matrices is not None:
            expected = (self.n_blocks, self.rank, self.rank)
            if matrices.dim() not in (4, 6) or tuple(matrices.shape[1:4]) != expected:
                raise ValueError(f"modulation must be (B, {self.n_blocks}, {self.rank}, {self.rank}) or "
                                 f"(B, {self.n_blocks}, {self.rank}, {self.rank}, G, G); got {tuple(matrices.shape)}")
            matrices = matrices.repeat(repeat, *([1] * (matrices.dim() - 1)))
        self.matrices = matrices
        self._cache = {}

    @contextlib.contextmanager
    def using(self, matrices: torch.Tensor | None, repeat: int = 1) -> Iterator[None]:
        """``set(matrices, repeat)`` for the ``with`` block, then restore the previous modulation."""
        previous = self.matrices
        self.set(matrices, repeat)
        try:
            yield
        finally:
            self.set(previous)

    @contextlib.contextmanager
    def reinstated(self, matrices: torch.Tensor | None, input_hw: tuple[int, int] | None) -> Iterator[None]:
        """Modulate with ``matrices`` (as stored: already repeated) for an input of ``input_hw`` inside
        the ``with`` block, with a fresh cache; then put back what was there. For recomputing a
        checkpointed block in the backward pass (:func:`modulated_checkpoint`)."""
        saved = self.matrices, self.input_hw, self._cache
        self.matrices, self.input_hw, self._cache = matrices, input_hw, {}
        try:
            yield
        finally:
            self.matrices, self.input_hw, self._cache = saved

    def begin(self, input_hw: tuple[int, int]) -> None:
        """Called at the start of each forward pass of the part with its input's ``(H, W)``."""
        self.input_hw = input_hw
        self._cache = {}

    def apply(self, a: torch.Tensor, block: int, layout: str) -> torch.Tensor:
        """``M · a`` for the LoRA ``A`` output ``a`` of a layer in block ``block``.

        Args:
            a: ``(B, r, h, w)`` for ``layout="conv"``, ``(B, L, r)`` for ``"tokens"`` (an ``h × w``
                map flattened row-major) and ``"text"``.
        """
        if self.matrices is None:
            return a
        if a.shape[0] != self.matrices.shape[0]:
            raise ValueError(f"the modulation holds {self.matrices.shape[0]} samples but the layer sees a batch "
                             f"of {a.shape[0]}; set(matrices, repeat=n) for batches of n stacked copies")
        spatial = self.matrices.dim() == 6
        if layout == TEXT or not spatial:
            m = self._matrix(block, a, None)                            # (B, r, r)
            return torch.einsum("bij,bjhw->bihw" if layout == CONV else "bij,blj->bli", m, a)
        if layout == CONV:
            return torch.einsum("bhwij,bjhw->bihw", self._matrix(block, a, a.shape[-2:]), a)
        if self.input_hw is None:
            raise RuntimeError("spatial modulation of tokens needs the input size; run the part through "
                               "its model so the ModulatedLora pre-hook records it")
        h, w = token_grid(a.shape[1], self.input_hw)
        m = self._matrix(block, a, (h, w))                               # (B, h, w, r, r)
        return torch.einsum("bhwij,bhwj->bhwi", m, a.unflatten(1, (h, w))).flatten(1, 2)

    def _matrix(self, block: int, like: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """Block ``block``'s matrix on ``like``'s device and dtype: ``(B, r, r)`` (size None) or
        ``(B, h, w, r, r)``; cached for the current forward pass."""
        key = (block, like.device, like.dtype, None if size is None else tuple(size))
        if key not in self._cache:
            m = self.matrices[:, block].to(like.device, like.dtype)
            if size is None:
                m = m.mean(dim=(-2, -1)) if m.dim() == 5 else m
            else:
                r = m.shape[1]
                m = F.interpolate(m.flatten(1, 2), size=tuple(size), mode="bilinear", align_corners=False)
                m = m.unflatten(1, (r, r)).permute(0, 3, 4, 1, 2)
            self._cache[key] = m
        return self._cache[key]


def modulated_checkpoint(states: Sequence[ModulationState]):
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that keeps the
    modulation right: ``f(block, *args)`` runs ``block(*args)`` under non-reentrant
    :func:`torch.utils.checkpoint.checkpoint`, and the block's recomputation in the backward pass —
    after the forward pass has left :meth:`ModulationState.using` — sees the matrices (and input size)
    each of ``states`` held when the block first ran, so its LoRA outputs, and the gradients, are the
    ones of the forward pass."""

    def contexts():
        snapshot = [(s.matrices, s.input_hw) for s in states]        # taken in the forward pass

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            with contextlib.ExitStack() as stack:
                for state, (matrices, input_hw) in zip(states, snapshot):
                    stack.enter_context(state.reinstated(matrices, input_hw))
                yield

        return contextlib.nullcontext(), recompute()

    def checkpointed(block: nn.Module, *args):
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)

    return checkpointed


class ModulatedLora:
    """A peft LoRA adapter in one backbone part, with its A outputs modulated by a :class:`ModulationState`.

    On construction the adapter is added (``model.add_adapter``), the whole model is frozen except
    the adapter's ``lora_A`` / ``lora_B`` weights and the part's fully trained modules
    (``unet.conv_in``), and the hooks are registered. ``state.set(M)`` / ``state.using(M)`` choose
    the modulation.

    Args:
        model: the UNet (``UNet2DConditionModel``) or the VAE (``AutoencoderKL``); modified in place.
        part: ``"unet"`` or ``"vae"`` (VAE: encoder only).
        rank: LoRA rank r (see ``RANKS``).
        alpha: LoRA alpha (default ``rank``: scale ``alpha / rank = 1``).
        n_blocks: number of block ids (default 10 UNet, 6 VAE).
        adapter_name: the peft adapter name.
    """

    def __init__(self, model: nn.Module, part: str, rank: int, alpha: float | None = None,
                 n_blocks: int | None = None, adapter_name: str = ADAPTER_NAME):
        if part not in PARTS:
            raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
        spec = PARTS[part]
        self.model, self.part, self.rank, self.adapter_name = model, part, rank, adapter_name
        self.state = ModulationState(n_blocks or spec.n_blocks, rank)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=spec.target_modules),
                          adapter_name=adapter_name)
        entry = model.get_submodule(spec.entry)
        depth = len(entry.down_blocks)
        self.block_ids: dict[str, int] = {}      # adapted module name -> block id
        self.layouts: dict[str, str] = {}        # adapted module name -> "conv" / "tokens" / "text"
        self._handles = [entry.register_forward_pre_hook(self._record_input, with_kwargs=True)]
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
                self.block_ids[name] = block_id(name, part, depth, self.state.n_blocks)
                self.layouts[name] = _layout(model, name, layer)
                hook = _LoraHook(self.state, self.block_ids[name], self.layouts[name])
                self._handles.append(layer.lora_A[adapter_name].register_forward_hook(hook))
        model.requires_grad_(False)
        for param in self.trainable_parameters().values():
            param.requires_grad_(True)

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.state.begin(tuple(sample.shape[-2:]))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's LoRA A/B weights and the fully trained modules' parameters, by model name."""
        fully = PARTS[self.part].fully_trained
        return {name: p for name, p in self.model.named_parameters()
                if (f".{self.adapter_name}." in name and (".lora_A." in name or ".lora_B." in name))
                or name.split(".")[0] in fully}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft's LoRA state dict (adapter name stripped) plus the fully trained modules' weights."""
        lora = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        for name in PARTS[self.part].fully_trained:
            lora.update({f"{name}.{k}": v for k, v in self.model.get_submodule(name).state_dict().items()})
        return lora

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict` (through ``set_peft_model_state_dict``); strict."""
        fully = PARTS[self.part].fully_trained
        full = {k: v for k, v in state_dict.items() if k.split(".")[0] in fully}
        lora = {k: v for k, v in state_dict.items() if k not in full}
        missing = set(get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)) - set(lora)
        result = set_peft_model_state_dict(self.model, lora, adapter_name=self.adapter_name)
        if missing or result.unexpected_keys:
            raise DmdiffError(f"LoRA weights do not fit this {self.part} (rank {self.rank}): "
                              f"missing {sorted(missing)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]}")
        for name in fully:
            self.model.get_submodule(name).load_state_dict(
                {k[len(name) + 1:]: v for k, v in full.items() if k.startswith(name + ".")})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to a safetensors file (metadata: part, rank)."""
        path = Path(path)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(path, tensors, metadata={"part": self.part, "rank": str(self.rank)})

    def load(self, path: str | Path) -> None:
        """Load weights written by :meth:`save`."""
        self.load_state_dict(load_safetensors(path, device=next(self.model.parameters()).device))

    def remove_hooks(self) -> None:
        """Detach the hooks: the adapter then acts as plain LoRA."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class _LoraHook:
    """Forward hook on a ``lora_A`` module: replaces its output ``a`` by ``M · a``."""

    state: ModulationState
    block: int
    layout: str

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.state.apply(output, self.block, self.layout)


def _layout(model: nn.Module, name: str, layer: LoraLayer) -> str:
    """``"conv"`` for conv layers, ``"text"`` for cross-attention keys/values, else ``"tokens"``."""
    if isinstance(layer.get_base_layer(), nn.Conv2d):
        return CONV
    parent, _, leaf = name.rpartition(".")
    if leaf in ("to_k", "to_v") and getattr(model.get_submodule(parent), "is_cross_attention", False):
        return TEXT
    return TOKENS


class ModulationMLP(nn.Module):
    """Per-block MLPs from degradation embeddings to modulation matrices ``M = I + Δ``.

    Each block id has its own two-layer MLP ``d → hidden → r²`` (SiLU); the last layer starts at
    zero, so ``M = I`` (plain LoRA) at initialisation whatever the embedding.

    Input ``(B, n_blocks, d)`` → output ``(B, n_blocks, r, r)``; input ``(B, n_blocks, G, G, d)``
    (spatial SVDA) → output ``(B, n_blocks, r, r, G, G)``.
    """

    def __init__(self, n_blocks: int, embed_dim: int, rank: int, hidden: int = 128):
        super().__init__()
        self.rank = rank
        bound = 1 / math.sqrt(embed_dim)               # nn.Linear's default init for layer 1
        self.w1 = nn.Parameter(torch.empty(n_blocks, embed_dim, hidden).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.empty(n_blocks, hidden).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.zeros(n_blocks, hidden, rank * rank))
        self.b2 = nn.Parameter(torch.zeros(n_blocks, rank * rank))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        spatial = embedding.dim() == 5
        x = embedding.movedim(1, -2) if spatial else embedding       # (B, [G, G,] n, d)
        hidden = F.silu(torch.einsum("...nd,ndh->...nh", x, self.w1) + self.b1)
        delta = (torch.einsum("...nh,nho->...no", hidden, self.w2) + self.b2).unflatten(-1, (self.rank, self.rank))
        m = delta + torch.eye(self.rank, dtype=delta.dtype, device=delta.device)
        return m.permute(0, 3, 4, 5, 1, 2) if spatial else m          # (B, n, r, r[, G, G])


def add_modulated_lora(backbone, unet_rank: int | None = None, vae_rank: int | None = None,
                       alpha: float | None = None) -> tuple[ModulatedLora, ModulatedLora]:
    """Adapt a :class:`~dmdiff.model.backbone.Backbone` in place: ``(unet_lora, vae_lora)``.

    Ranks default to ``RANKS[backbone.preset]`` (tiny 8 / 4, SD-Turbo 32 / 16).
    """
    ranks = RANKS[backbone.preset]
    return (ModulatedLora(backbone.unet, "unet", unet_rank or ranks["unet"], alpha),
            ModulatedLora(backbone.vae, "vae", vae_rank or ranks["vae"], alpha))


def trainable_parameters(loras: Sequence[ModulatedLora],
                         modules: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Parameter]:
    """Everything DMDiff trains, by name: each part's LoRA A/B and fully trained modules
    (``"unet.conv_in.weight"``, ``"vae.encoder…lora_A.dmdiff.weight"``) and all parameters of
    ``modules`` (e.g. ``{"svda": svda, "unet_mlp": …, "vae_mlp": …}``)."""
    params = {f"{lora.part}.{k}": p for lora in loras for k, p in lora.trainable_parameters().items()}
    params.update({f"{key}.{k}": p for key, module in (modules or {}).items() for k, p in module.named_parameters()})
    return params
