"""The DMDiff model (dmdiff.model.dmdiff) on the random-init tiny backbone."""

import contextlib
import math

import pytest
import torch
from conftest import perturb_trainable  # noqa: E402
from safetensors.torch import load_file, save_file

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig, RestoreLatents

ODD_HW = (37, 53)


def make_model(seed=0, randomise=True, **config):
    """A tiny DMDiff; ``randomise``: trainable weights perturbed (as after training), so LoRA and
    modulation are not the identity."""
    model = DMDiff(DMDiffConfig(seed=seed, **config), load_backbone("tiny", pretrained=False, seed=0))
    return perturb_trainable(model, seed + 100) if randomise else model


@pytest.fixture(scope="module")
def model():
    return make_model()


def _images(B=2, hw=ODD_HW, seed=0):
    return torch.rand(B, 3, *hw, generator=torch.Generator().manual_seed(seed))


def _maps(B=2, G=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([1 + 10 * torch.rand(B, 6, G, G, generator=g), 0.02 * torch.rand(B, 1, G, G, generator=g)], 1)


@contextlib.contextmanager
def count_unet_calls(model):
    calls = []
    handle = model.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_restore_keeps_odd_sizes_and_range(model):
    for hw in (ODD_HW, (8, 9), (64, 31)):
        out = model.restore(_images(hw=hw), _maps())
        assert out.shape == (2, 3, *hw)
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_alpha_end_points_equal_the_single_path_forwards(model):
    x, maps = _images(), _maps()
    with torch.no_grad():
        neutral = model(x, maps, "neutral").clamp(0, 1)
        positive = model(x, maps, "positive").clamp(0, 1)
    torch.testing.assert_close(model.restore(x, maps, alpha=0.0), neutral, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.restore(x, maps, alpha=1.0), positive, atol=1e-5, rtol=0)
    assert (neutral - positive).abs().max() > 1e-3          # the two paths really differ


def test_decode_reuses_latents_without_the_unet(model):
    x, maps = _images(), _maps()
    with count_unet_calls(model) as calls:
        out, latents = model.restore(x, maps, alpha=0.4, return_latents=True)
        assert len(calls) == 1                               # both paths in one batched call
        assert isinstance(latents, RestoreLatents) and latents.size == ODD_HW
        assert latents.z_neutral.shape == latents.z_positive.shape == (2, 4, 24, 32)   # 48×64 padded (multiple of 16), /2
        assert latents.pad == (5, 6, 5, 6)
        for alpha in (0.0, 0.4, 1.0, 1.2):
            assert torch.equal(model.decode(latents, alpha), model.restore(x, maps, alpha=alpha))
        calls.clear()
        model.decode(latents, 0.7)
        assert calls == []
    assert torch.equal(out, model.decode(latents, 0.4))


def test_batched_paths_equal_separate_calls(model):
    x, maps = _images(), _maps()
    with torch.no_grad(), count_unet_calls(model) as calls:
        both = model.latents(x, maps, ("neutral", "positive"))
        assert len(calls) == 1
        for path in ("neutral", "positive"):
            alone = model.latents(x, maps, (path,))[path]
            assert both[path].shape == (2, 4, 24, 32)
            # batch size changes the GEMM blocking: float32 sums differ in the last bits (seen up to
            # 2.4e-5 on some CPUs); a path run with the wrong prompt or modulation differs far more
            torch.testing.assert_close(both[path], alone, atol=1e-4, rtol=1e-4)


def test_per_sample_paths_equal_per_path_batches(model):
    x, maps = _images(B=3), _maps(B=3)
    paths = ["negative", "positive", "negative"]
    with torch.no_grad(), count_unet_calls(model) as calls:
        mixed = model(x, maps, paths)
        assert len(calls) == 1
        for path in set(paths):
            rows = [i for i, p in enumerate(paths) if p == path]
            torch.testing.assert_close(mixed[rows], model(x[rows], maps[rows], path), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="paths"):
        model(x, maps, ["positive"])
    with pytest.raises(ConfigError, match="unknown path"):
        model(x, maps, "sharp")


def test_degrade_is_the_clamped_negative_path(model):
    x, maps = _images(), _maps()
    with torch.no_grad():
        expected = model(x, maps, "negative").clamp(0, 1)
    torch.testing.assert_close(model.degrade(x, maps), expected, atol=0, rtol=0)


@pytest.mark.parametrize("alpha", [-0.01, 1.21, math.nan, math.inf, True, "1", None])
def test_alpha_out_of_range_raises_before_any_work(model, alpha):
    x = _images(B=1, hw=(8, 8))
    with count_unet_calls(model) as calls:
        with pytest.raises(ConfigError, match=r"alpha must be a number in \[0.0, 1.2\]"):
            model.restore(x, alpha=alpha)
        latents = RestoreLatents(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), (8, 8), (0, 0, 0, 0))
        with pytest.raises(ValueError):
            model.decode(latents, alpha)
        assert calls == []


def test_maps_are_optional_and_used(model):
    x = _images()
    without = model.restore(x, None)
    assert without.shape == x.shape
    on_7 = model.restore(x, _maps(G=7))
    on_5 = model.restore(x, _maps(G=5))                      # maps on another grid are resampled
    assert (without - on_7).abs().max() > 1e-4 and (on_5 - on_7).abs().max() > 1e-5


def test_without_svda_is_plain_lora_and_ignores_maps():
    model = make_model(svda=False)
    assert model.svda is None and model.mlp is None
    assert not any(k.startswith(("svda.", "mlp.")) for k in model.trainable_state_dict())
    x = _images()
    torch.testing.assert_close(model.restore(x, _maps(seed=1)), model.restore(x, None), atol=0, rtol=0)
    assert model.restore(torch.rand(1, 3, 1, 2)).shape == (1, 3, 1, 2)   # replicate padding (pad > size)
    with pytest.raises(ConfigError, match="svda_spatial"):
        DMDiffConfig(svda=False, svda_spatial=True)


def test_spatial_svda_modulates_per_cell():
    model = make_model(svda_spatial=True)
    assert model.svda.spatial
    x, maps = _images(), _maps()
    out, latents = model.restore(x, maps, alpha=0.5, return_latents=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(model.decode(latents, 0.5), out)
    with torch.no_grad():
        m = model.mlp["unet"](model.svda(x, maps).embeddings["unet"])
    assert m.shape == (2, 10, model.unet_lora.rank, model.unet_lora.rank, 7, 7)


def test_gradients_reach_trainable_parameters_only():
    model = make_model(seed=3)
    model.train()
    trainable = model.trainable_parameters()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    names = set(trainable)
    assert "unet.conv_in.weight" in names and any(n.startswith("vae.encoder.") and "lora_B" in n for n in names)
    assert any(n.startswith("svda.") for n in names) and any(n.startswith("mlp.unet.") for n in names)
    assert not any(n.startswith(("text_encoder.", "vae.decoder.")) for n in names)
    out = model(_images(hw=(16, 20)), _maps(), "positive")
    out.square().mean().backward()
    frozen = [n for n, p in model.named_parameters() if n not in names and p.grad is not None]
    assert frozen == []
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert model.text_embeddings.grad is None and not model.text_embeddings.requires_grad


def test_inference_keeps_the_callers_train_mode_and_grad_mode():
    model = make_model(seed=4)
    model.train()
    model.restore(_images(B=1, hw=(8, 8)))
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_trainable_state_dict_round_trip_through_safetensors(tmp_path):
    source, target = make_model(seed=1), make_model(seed=2)
    x, maps = _images(), _maps()
    assert not torch.equal(source.restore(x, maps), target.restore(x, maps))
    state = source.trainable_state_dict()
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    assert {k.split(".")[0] for k in state} == {"unet", "vae", "svda", "mlp", "path_modulation"}
    assert "unet.conv_in.weight" in state and not any(".dmdiff." in k for k in state)   # peft keys
    save_file(state, str(tmp_path / "w.safetensors"))
    target.load_trainable_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(source.restore(x, maps), target.restore(x, maps))

    with pytest.raises(DmdiffError, match="unexpected"):
        make_model(svda=False, randomise=False).load_trainable_state_dict(state)
    with pytest.raises(DmdiffError, match="do not fit"):
        target.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("svda.")})
    with pytest.raises(DmdiffError):
        make_model(unet_rank=4, randomise=False).load_trainable_state_dict(state)


def test_config_validation():
    for bad in (dict(preset="sd-xl"), dict(timestep=1000), dict(svda_dim=30), dict(grid_size=0), dict(unet_rank=0)):
        with pytest.raises(ConfigError):
            DMDiffConfig(**bad)
    with pytest.raises(ConfigError, match="preset"):
        DMDiff(DMDiffConfig(preset="sd-turbo-shape"), load_backbone("tiny", pretrained=False))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_model(randomise=False).restore(torch.rand(3, 8, 8))


def test_same_seed_same_model():
    x = _images(B=1, hw=(12, 12))
    a, b = make_model(seed=5, randomise=False), make_model(seed=5, randomise=False)
    assert torch.equal(a.restore(x, _maps(B=1)), b.restore(x, _maps(B=1)))


def test_path_modulation_separates_the_paths_in_every_block():
    """With LoRA trained (perturbed) the per-path modulation makes the two paths' latents differ far
    more than the prompts alone do (on this random-init backbone; on the shipped one the prompts barely
    reach the UNet); zero path modulation is exactly the prompt-only model."""
    x = _images()
    with_paths = make_model()
    without = make_model(path_modulation=False)
    assert "path_modulation" in with_paths.trainable_parameters()
    assert "path_modulation" not in without.trainable_parameters()
    with_paths.load_trainable_state_dict({**without.trainable_state_dict(),
                                          "path_modulation": torch.zeros_like(with_paths.path_modulation)})
    a, b = with_paths.restore_latents(x), without.restore_latents(x)
    assert torch.allclose(a.z_positive, b.z_positive, atol=1e-6) and torch.allclose(a.z_neutral, b.z_neutral, atol=1e-6)
    prompt_only = (b.z_positive - b.z_neutral).abs().mean()
    with torch.no_grad():
        with_paths.path_modulation[1].add_(0.5 * torch.randn_like(with_paths.path_modulation[1]))
    c = with_paths.restore_latents(x)
    assert (c.z_positive - c.z_neutral).abs().mean() > 2 * prompt_only
    assert torch.equal(c.z_positive, a.z_positive)          # only the neutral path's modulation moved


def test_path_modulation_weights_must_match_the_model():
    with_paths, without = make_model(), make_model(path_modulation=False)
    with pytest.raises(DmdiffError, match="path modulation"):
        without.load_trainable_state_dict(with_paths.trainable_state_dict())
    with pytest.raises(DmdiffError, match="path modulation"):
        with_paths.load_trainable_state_dict(without.trainable_state_dict())
