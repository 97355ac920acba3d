"""Degradation-modulated LoRA (dmdiff.model.lora) on the random-init tiny backbone."""

import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from dmdiff.model.backbone import SD_TURBO_UNET, SD_VAE, load_backbone
from dmdiff.model.lora import (
    PARTS,
    ModulationMLP,
    ModulationState,
    add_modulated_lora,
    block_id,
    token_grid,
    trainable_parameters,
)
from dmdiff.model.svda import SVDA

B = 2
LATENT_HW = (12, 20)         # non-square on purpose: token grids are inferred from the aspect ratio
IMAGE_HW = (24, 40)          # tiny VAE: ×2 downsampling


@pytest.fixture
def backbone():
    return load_backbone("tiny", pretrained=False, seed=0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(latent=torch.randn(B, 4, *LATENT_HW, generator=g),
                text=torch.randn(B, 77, 32, generator=g),
                image=torch.rand(B, 3, *IMAGE_HW, generator=g) * 2 - 1)


def _unet(bb, x):
    return bb.unet(x["latent"], 999, x["text"]).sample


def _vae_encoder(bb, x):
    return bb.vae.encode(x["image"]).latent_dist.mean


def _randomise(*modules, seed=1, std=0.1):
    """Give parameters of ``modules`` (or ``(module, name filter)`` pairs) random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, pattern in modules:
            for name, p in module.named_parameters():
                if re.search(pattern, name):
                    p.copy_(std * torch.randn(p.shape, generator=g))


def test_block_ids_and_targets_of_sd_turbo_shape():
    """SD-Turbo: UNet stages map one-to-one to ids 0–9, VAE-encoder stages to 0–5; nothing else adapted."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD_TURBO_UNET)
        vae = AutoencoderKL.from_config(SD_VAE)
    for model, part, n in ((unet, "unet", 10), (vae, "vae", 6)):
        depth = len(model.get_submodule(PARTS[part].entry).down_blocks)
        names = [name for name, _ in model.named_modules() if re.fullmatch(PARTS[part].target_modules, name)]
        assert {block_id(name, part, depth) for name in names} == set(range(n))
        assert not any("time_emb" in name or "decoder" in name or "quant" in name for name in names)
    assert len([n for n, _ in unet.named_modules() if re.fullmatch(PARTS["unet"].target_modules, n)]) == 257
    assert block_id("down_blocks.3.resnets.1.conv2", "unet", 4) == 3
    assert block_id("mid_block.attentions.0.proj_in", "unet", 4) == 4
    assert block_id("up_blocks.0.upsamplers.0.conv", "unet", 4) == 5
    assert block_id("conv_out", "unet", 4) == 9
    assert block_id("encoder.conv_in", "vae", 4) == 0
    assert block_id("encoder.conv_out", "vae", 4) == 5
    # tiny (2 down blocks): stages spread over the ids
    assert [block_id(n, "unet", 2) for n in ("down_blocks.0.x", "down_blocks.1.x", "mid_block.x",
                                              "up_blocks.0.x", "up_blocks.1.x", "conv_out")] == [0, 1, 3, 5, 6, 8]


def test_zero_modulation_equals_frozen_base_model(backbone):
    x = _inputs()
    with torch.no_grad():
        base_unet, base_vae = _unet(backbone, x), _vae_encoder(backbone, x)
    unet_lora, vae_lora = add_modulated_lora(backbone)
    _randomise((backbone.unet, r"lora_B"), (backbone.vae, r"lora_B"))          # LoRA branch really active
    with torch.no_grad():
        assert not torch.allclose(_unet(backbone, x), base_unet, atol=1e-3)    # M = None: plain LoRA
        assert not torch.allclose(_vae_encoder(backbone, x), base_vae, atol=1e-3)
        for grid in ((), (7, 7)):                                              # global and spatial zeros
            with unet_lora.state.using(torch.zeros(B, 10, 8, 8, *grid)), \
                    vae_lora.state.using(torch.zeros(B, 6, 4, 4, *grid)):
                assert torch.equal(_unet(backbone, x), base_unet)
                assert torch.equal(_vae_encoder(backbone, x), base_vae)


def _wire(backbone, spatial, seed=2):
    """SVDA → modulation MLPs → LoRA states, with the MLPs' zero-init last layers randomised."""
    unet_lora, vae_lora = add_modulated_lora(backbone)
    svda = SVDA(dim=32, heads=2, spatial=spatial)
    mlps = {"unet": ModulationMLP(10, 32, unet_lora.rank, hidden=32),
            "vae": ModulationMLP(6, 32, vae_lora.rank, hidden=32)}
    _randomise((backbone.unet, r"lora_B"), (backbone.vae, r"lora_B"), (mlps["unet"], r"w2|b2"),
               (mlps["vae"], r"w2|b2"), seed=seed)
    return unet_lora, vae_lora, svda, mlps


def _run(backbone, wiring, x, maps):
    """The one-step restoration forward with modulation from ``maps``; returns (latent, eps, output)."""
    unet_lora, vae_lora, svda, mlps = wiring
    deg = svda((x["image"] + 1) / 2, maps)
    with vae_lora.state.using(mlps["vae"](deg.embeddings["vae"])), \
            unet_lora.state.using(mlps["unet"](deg.embeddings["unet"])):
        z = _vae_encoder(backbone, x) * backbone.vae.config.scaling_factor
        eps = backbone.unet(z, 999, x["text"]).sample
    a = backbone.alpha_bar(999)
    z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return z, eps, backbone.vae.decode(z0 / backbone.vae.config.scaling_factor).sample


def _maps(fwhm_px, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(B, 7, 7, 7, generator=g) * fwhm_px
    maps[:, 6] = 0.01
    return maps


@pytest.mark.parametrize("spatial", [False, True])
def test_different_degradation_maps_give_different_outputs(backbone, spatial):
    x = _inputs()
    wiring = _wire(backbone, spatial)
    with torch.no_grad():
        z1, eps1, _ = _run(backbone, wiring, x, _maps(2.0))
        z2, eps2, _ = _run(backbone, wiring, x, _maps(12.0))
        z3, eps3, _ = _run(backbone, wiring, x, None)
    assert (z1 - z2).abs().max() > 1e-4 and (eps1 - eps2).abs().max() > 1e-4
    assert (z1 - z3).abs().max() > 1e-4 and (eps1 - eps3).abs().max() > 1e-4


def test_modulation_mlp_starts_at_identity():
    mlp = ModulationMLP(10, 16, 4)
    eye = torch.eye(4).expand(3, 10, 4, 4)
    assert torch.equal(mlp(torch.randn(3, 10, 16)), eye)
    assert torch.equal(mlp(torch.randn(3, 10, 5, 5, 16)), eye[..., None, None].expand(3, 10, 4, 4, 5, 5))


def test_gradients_reach_only_trainable_parameters(backbone):
    x = _inputs()
    x["text"] = backbone.encode_prompt(["a sharp photo", "a plain photo"])
    wiring = _wire(backbone, spatial=True)
    unet_lora, vae_lora, svda, mlps = wiring
    trainable = trainable_parameters([unet_lora, vae_lora], {"svda": svda, "unet_mlp": mlps["unet"],
                                                              "vae_mlp": mlps["vae"]})
    _, _, y = _run(backbone, wiring, x, _maps(4.0))
    ((y - x["image"]) ** 2).mean().backward()

    frozen_with_grad, trainable_ids = [], {id(p) for p in trainable.values()}
    for part in ("unet", "vae", "text_encoder"):
        for name, p in getattr(backbone, part).named_parameters():
            assert p.requires_grad == (id(p) in trainable_ids), f"{part}.{name}"
            if id(p) not in trainable_ids and p.grad is not None:
                frozen_with_grad.append(f"{part}.{name}")
    assert frozen_with_grad == []
    no_grad = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    names = set(trainable)
    assert "unet.conv_in.weight" in names
    assert any(n.startswith("unet.") and ".lora_A." in n for n in names)
    assert any(n.startswith("vae.encoder.") and ".lora_B." in n for n in names)
    assert not any(n.startswith("vae.decoder.") for n in names)


def test_lora_weights_round_trip_through_safetensors(backbone, tmp_path):
    x = _inputs()
    unet_lora, vae_lora = add_modulated_lora(backbone)
    _randomise((backbone.unet, r"lora_|conv_in"), (backbone.vae, r"lora_"), seed=3)
    m_unet, m_vae = torch.randn(B, 10, 8, 8, 7, 7), torch.randn(B, 6, 4, 4)
    with torch.no_grad(), unet_lora.state.using(m_unet), vae_lora.state.using(m_vae):
        expected = _unet(backbone, x), _vae_encoder(backbone, x)
    unet_lora.save(tmp_path / "unet.safetensors")
    vae_lora.save(tmp_path / "vae.safetensors")
    assert any(k.endswith("lora_A.weight") for k in unet_lora.state_dict())   # peft's key format

    fresh = load_backbone("tiny", pretrained=False, seed=0)
    unet2, vae2 = add_modulated_lora(fresh)
    unet2.load(tmp_path / "unet.safetensors")
    vae2.load(tmp_path / "vae.safetensors")
    with torch.no_grad(), unet2.state.using(m_unet), vae2.state.using(m_vae):
        assert torch.equal(_unet(fresh, x), expected[0])
        assert torch.equal(_vae_encoder(fresh, x), expected[1])


@pytest.mark.parametrize("grid", [(), (7, 7)])
def test_batch_repeat_matches_separate_runs(backbone, grid):
    x = _inputs()
    unet_lora, _ = add_modulated_lora(backbone)
    _randomise((backbone.unet, r"lora_B"))
    m = torch.randn(B, 10, 8, 8, *grid)
    with torch.no_grad():
        with unet_lora.state.using(m):
            single = _unet(backbone, x)
        with unet_lora.state.using(m, repeat=2):
            double = backbone.unet(x["latent"].repeat(2, 1, 1, 1), 999, x["text"].repeat(2, 1, 1)).sample
        torch.testing.assert_close(double, torch.cat([single, single]), atol=1e-5, rtol=1e-5)
        with unet_lora.state.using(m), pytest.raises(ValueError, match="repeat"):
            backbone.unet(x["latent"].repeat(2, 1, 1, 1), 999, x["text"].repeat(2, 1, 1))


def test_spatial_modulation_layouts_agree():
    """Conv maps and row-major tokens get the same per-location M; nodes get exactly their matrix."""
    r, G = 3, 4
    state = ModulationState(n_blocks=2, rank=r)
    m = torch.randn(2, 2, r, r, G, G)
    a = torch.randn(2, r, G, 2 * G)                       # non-square: h = G, w = 2G
    state.set(m)
    state.begin((3 * G, 6 * G))                           # input of the same aspect, larger
    conv = state.apply(a, 1, "conv")
    tokens = state.apply(a.flatten(2).transpose(1, 2), 1, "tokens")
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2))
    # rows: h = G nodes exactly; columns 2j + 1 lie a quarter cell right of node j (bilinear)
    node_j = (0.75 * m[1, 1, :, :, 2, 1] + 0.25 * m[1, 1, :, :, 2, 2])
    torch.testing.assert_close(conv[1, :, 2, 3], node_j @ a[1, :, 2, 3])
    # text tokens use the spatial mean; a spatially constant M equals the global one
    text = torch.randn(2, 77, r)
    torch.testing.assert_close(state.apply(text, 0, "text"), text @ m[:, 0].mean((-2, -1)).transpose(1, 2))
    state.set(m[..., :1, :1].expand(-1, -1, -1, -1, G, G))
    spatial = state.apply(a, 0, "conv")
    state.set(m[:, :, :, :, 0, 0])
    torch.testing.assert_close(spatial, state.apply(a, 0, "conv"))
    state.set(None)
    assert state.apply(a, 0, "conv") is a


def test_token_grid_recovers_feature_map_shape():
    assert token_grid(12 * 20, (24, 40)) == (12, 20)
    assert token_grid(3 * 5, (24, 40)) == (3, 5)
    assert token_grid(64 * 64, (512, 512)) == (64, 64)
    assert token_grid(13 * 20, (100, 157)) == (13, 20)


def test_tiny_trainable_parameter_counts(backbone):
    unet_lora, vae_lora = add_modulated_lora(backbone)
    assert len(unet_lora.block_ids) == 93 and len(vae_lora.block_ids) == 11   # TINY_VAE (32, 32): no conv_shortcut
    text = {n for n, layout in unet_lora.layouts.items() if layout == "text"}
    assert text == {n for n in unet_lora.layouts if re.search(r"attn2\.to_[kv]$", n)} and len(text) == 8
    assert {unet_lora.layouts[n] for n in ("conv_out", "mid_block.attentions.0.proj_in")} == {"conv", "tokens"}
    assert set(vae_lora.layouts.values()) == {"conv"}
    assert sum(p.numel() for p in unet_lora.trainable_parameters().values()) == 227_568   # incl. conv_in
    assert sum(p.numel() for p in vae_lora.trainable_parameters().values()) == 12_940
    with pytest.raises(ValueError, match="modulation must be"):
        unet_lora.state.set(torch.zeros(B, 10, 4, 4))
