"""Backbone presets, the built tokenizer, the SD-Turbo folder layout and its loader (all offline)."""

import json
import os
import shutil
import socket

import pytest
import torch

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model import backbone as bbmod
from dmdiff.model.backbone import load_backbone, save_backbone
from dmdiff.model.tokenizer import MAX_VOCAB


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection / DNS look-up fail and record it; the test asserts none happened."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", pretrained=False, seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny backbone saved in SD-Turbo's folder layout."""
    return save_backbone(tiny, tmp_path_factory.mktemp("backbones") / "tiny")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _outputs(backbone):
    """UNet eps, VAE latent mean and reconstruction, and text embedding on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        emb = backbone.encode_prompt(["a sharp, high quality photo", "a blurry photo"])
        eps = backbone.unet(z, 999, encoder_hidden_states=emb).sample
        latent = backbone.vae.encode(x).latent_dist.mean
        recon = backbone.vae.decode(latent).sample
    return emb, eps, latent, recon


def test_tiny_builds_offline_with_expected_shapes(no_network):
    backbone = load_backbone("tiny", pretrained=False)
    assert backbone.source == "random-init" and backbone.preset == "tiny"
    emb = backbone.encode_prompt("a sharp photo")
    assert emb.shape == (1, 77, 32) and not emb.requires_grad
    eps = backbone.unet(torch.randn(1, 4, 16, 16), 999, encoder_hidden_states=emb).sample
    assert eps.shape == (1, 4, 16, 16)
    latent = backbone.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert latent.shape == (1, 4, 32, 32)
    assert backbone.vae.decode(latent).sample.shape == (1, 3, 64, 64)
    assert (backbone.vae_scale_factor, backbone.latent_multiple) == (2, 16)
    assert not any(p.requires_grad for p in backbone.text_encoder.parameters())
    counts = backbone.num_parameters()
    assert counts["total"] == counts["unet"] + counts["vae"] + counts["text_encoder"] < 3_000_000
    assert no_network == []


def test_alpha_bar_is_sd_turbo_schedule(tiny):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    assert tiny.alpha_bar(999).item() == pytest.approx(expected[999].item(), rel=1e-4)
    assert tiny.alpha_bar(torch.tensor([0, 999])).shape == (2,)


def test_random_init_is_deterministic_by_seed_and_keeps_global_rng(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_backbone("tiny", pretrained=False, seed=0)
    assert torch.equal(torch.rand(3), expected)   # the caller's random stream is untouched
    for name in ("unet", "vae", "text_encoder"):
        a, b = _state(getattr(tiny, name)), _state(getattr(again, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = load_backbone("tiny", pretrained=False, seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_dtype_and_device_are_applied():
    backbone = load_backbone("tiny", pretrained=False, dtype=torch.bfloat16)
    assert {p.dtype for name in ("unet", "vae", "text_encoder")
            for p in getattr(backbone, name).parameters()} == {torch.bfloat16}
    assert backbone.encode_prompt("a photo").dtype == torch.bfloat16


def test_tokenizer_pads_to_77_with_start_and_end_and_decodes_back(tiny):
    tok = tiny.tokenizer
    prompt = "a sharp high quality photo with natural colors"
    ids = tok(prompt, padding="max_length", max_length=77).input_ids
    n_words = len(prompt.split())
    assert len(ids) == 77 and tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id and ids[n_words + 1] == tok.eos_token_id
    assert set(ids[n_words + 1:]) == {tok.pad_token_id}
    assert tok.convert_ids_to_tokens(ids[1:n_words + 1]) == [w + "</w>" for w in prompt.split()]
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    assert tok.decode(tok("Xylophone, café").input_ids, skip_special_tokens=True) == "xylophone , café"
    assert len(tok) <= MAX_VOCAB == tiny.text_encoder.config.vocab_size


def test_save_then_load_through_the_sd_turbo_loader_is_identical(tiny, saved, no_network):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    files = [p.name for p in saved.rglob("*") if p.is_file()]
    assert {"vocab.json", "merges.txt", "scheduler_config.json"} <= set(files)
    assert not [f for f in files if f.endswith(bbmod.PICKLE_SUFFIXES)]

    loaded = load_backbone("sd-turbo", path=saved)
    assert loaded.preset == "sd-turbo" and loaded.source == str(saved.resolve())
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.alpha_bar(999), tiny.alpha_bar(999))
    assert no_network == []
    with pytest.raises(DmdiffError, match="overwrite"):
        save_backbone(tiny, saved)


def test_one_step_timestep_is_saved_with_the_folder_and_checked(tmp_path):
    """A folder records the timestep its UNet was trained for; folders without the file (SD-Turbo's
    own) get 999, and DMDiff takes the backbone's timestep unless its config names one."""
    from dmdiff.model.dmdiff import DMDiff, DMDiffConfig

    backbone = load_backbone("tiny", pretrained=False)
    assert backbone.one_step_timestep == 999          # random init: SD-Turbo's convention
    backbone.one_step_timestep = 250
    folder = save_backbone(backbone, tmp_path / "t250")
    assert json.loads((folder / bbmod.ONE_STEP_FILE).read_text()) == {"one_step_timestep": 250}
    loaded = load_backbone("tiny", path=folder)
    assert loaded.one_step_timestep == 250
    assert DMDiff(DMDiffConfig(), loaded).config.timestep == 250
    assert DMDiff(DMDiffConfig(timestep=999), load_backbone("tiny", path=folder)).config.timestep == 999

    (folder / bbmod.ONE_STEP_FILE).unlink()
    assert load_backbone("sd-turbo", path=folder).one_step_timestep == 999
    (folder / bbmod.ONE_STEP_FILE).write_text('{"one_step_timestep": 1000}')
    with pytest.raises(DmdiffError, match=r"one_step_timestep must be an integer in \[0, 999\]"):
        load_backbone("tiny", path=folder)
    (folder / bbmod.ONE_STEP_FILE).write_text("{not json")
    with pytest.raises(DmdiffError, match="unreadable"):
        load_backbone("tiny", path=folder)


def test_fp16_variant_only_folder_loads(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "fp16")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert load_backbone("sd-turbo", path=folder).unet.conv_in.weight.shape == (16, 4, 3, 3)


def test_shipped_tiny_weights_are_used_when_present(saved, monkeypatch):
    monkeypatch.setattr(bbmod, "TINY_ASSETS", saved)
    assert load_backbone("tiny").source == str(saved.resolve())
    assert load_backbone("tiny", pretrained=False).source == "random-init"


def test_missing_sd_turbo_folder_says_what_to_download(tmp_path, no_network):
    with pytest.raises(DmdiffError) as err:
        load_backbone("sd-turbo", path=str(tmp_path / "no" / "such" / "folder"))
    message = str(err.value)
    for needed in ("stabilityai/sd-turbo", "hf download", "unet/", "text_encoder/", "--model-path"):
        assert needed in message
    assert no_network == []


def test_uncached_hub_id_fails_without_touching_the_network(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DmdiffError, match="not in the local Hugging Face cache") as err:
        load_backbone("sd-turbo")
    assert "hf download stabilityai/sd-turbo" in str(err.value)
    assert no_network == []


def test_incomplete_folder_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(DmdiffError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_backbone("sd-turbo", path=tmp_path)


def test_pickle_only_weights_are_refused_unread(saved, tmp_path, monkeypatch):
    folder = shutil.copytree(saved, tmp_path / "pickled")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not to be unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(DmdiffError, match="only pickle weights.*safetensors only"):
        load_backbone("sd-turbo", path=folder)


def test_damaged_component_is_named_with_the_presets_help(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "damaged")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"unused")  # not the variant loaded
    (folder / "scheduler" / "scheduler_config.json").write_text("{broken")
    with pytest.raises(DmdiffError, match="(?s)scheduler cannot be loaded.*hf download") as err:
        load_backbone("sd-turbo", path=folder)
    assert str(folder / "scheduler") in str(err.value)
    with pytest.raises(DmdiffError, match="tiny backbone folder is written by save_backbone") as err:
        load_backbone("tiny", path=folder)
    assert "hf download" not in str(err.value)


def test_bad_preset_or_path_is_a_config_error():
    with pytest.raises(ConfigError, match="tiny, sd-turbo, sd-turbo-shape"):
        load_backbone("sd-xl")
    with pytest.raises(ConfigError, match="takes no path"):
        load_backbone("sd-turbo-shape", path="somewhere")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DMDIFF_HEAVY_TESTS") != "1", reason="~5 GB RAM; set DMDIFF_HEAVY_TESTS=1")
def test_sd_turbo_shape_has_sd_turbo_parameter_counts(no_network):
    backbone = load_backbone("sd-turbo-shape")
    assert backbone.num_parameters() == {"unet": 865_910_724, "vae": 83_653_863,
                                         "text_encoder": 340_387_840, "total": 1_289_952_427}
    assert (backbone.vae_scale_factor, backbone.latent_multiple) == (8, 64)
    assert backbone.encode_prompt("a photo").shape == (1, 77, 1024)
    assert no_network == []
