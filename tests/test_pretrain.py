"""Pretraining of the tiny backbone: the smoke run of the CLI, and the quality of the shipped weights."""

import json

import pytest
import torch

from dmdiff.cli import main as cli_main
from dmdiff.data.sources import TEST_PHOTOS, TRAIN_PHOTOS
from dmdiff.model.backbone import TINY_ASSETS, load_backbone
from dmdiff.model.pretrain import REPORT_NAME, CropSampler, eval_crops, psnr


def test_sampler_uses_training_photos_only():
    sampler = CropSampler(seed=0, dead_leaves_fraction=0.5, dead_leaves_images=4, dead_leaves_px=64)
    assert sorted(sampler.photos) == sorted(TRAIN_PHOTOS)
    assert not set(sampler.photos) & set(TEST_PHOTOS)
    x = sampler.batch(4, 36)
    assert x.shape == (4, 3, 36, 36) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1


@pytest.mark.slow
def test_smoke_pretrain_writes_a_loadable_backbone(tmp_path, capsys):
    out = tmp_path / "tiny_backbone"
    assert cli_main(["pretrain-backbone", "--smoke", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["stage_vae"]["steps"] == report["stage_unet"]["steps"] == 2
    assert report["data"]["heldout_eval_only"] == list(TEST_PHOTOS)
    assert not set(report["data"]["train"]) & set(TEST_PHOTOS)
    assert not list(tmp_path.glob(".*staging*")), "the staging folder was left behind"

    backbone = load_backbone("tiny", path=out)
    assert backbone.vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-4)
    with torch.no_grad():
        z = backbone.encode(torch.rand(1, 3, 16, 16))
        z0 = backbone.one_step(z, backbone.encode_prompt(""))
    assert z0.shape == z.shape == (1, 4, 8, 8) and torch.isfinite(z0).all()

    assert cli_main(["pretrain-backbone", "--smoke", "--out", str(out)]) == 2   # no --overwrite
    assert "--overwrite" in capsys.readouterr().err

    # --unet-only keeps the VAE and its report entry, retrains the UNet for another timestep
    vae_before = {k: v.clone() for k, v in backbone.vae.state_dict().items()}
    assert cli_main(["pretrain-backbone", "--smoke", "--out", str(out), "--unet-only", "--timestep", "100"]) == 0
    again = json.loads((out / REPORT_NAME).read_text())
    assert again["unet_only"] and again["timestep"] == 100 and again["stage_unet"]["steps"] == 2
    assert again["stage_vae"]["steps"] == report["stage_vae"]["steps"]
    assert again["stage_vae"]["trained_utc"] == report["created_utc"]
    retrained = load_backbone("tiny", path=out)
    assert retrained.one_step_timestep == 100
    assert all(torch.equal(v, vae_before[k]) for k, v in retrained.vae.state_dict().items())
    assert not torch.equal(retrained.unet.conv_in.weight, backbone.unet.conv_in.weight)

    capsys.readouterr()
    assert cli_main(["pretrain-backbone", "--smoke", "--out", str(tmp_path / "x"), "--timestep", "1000"]) == 2
    assert "timestep must be an integer in [0, 999]" in capsys.readouterr().err
    assert cli_main(["pretrain-backbone", "--smoke", "--out", str(tmp_path / "none"), "--unet-only"]) == 2
    assert "holds none" in capsys.readouterr().err


@pytest.mark.skipif(not (TINY_ASSETS / "model_index.json").is_file(), reason="no shipped tiny backbone")
def test_shipped_backbone_reconstructs_heldout_photos():
    """The shipped VAE reconstructs crops of the held-out (test) photos far better than random init,
    and the shipped UNet's one-step map (at its recorded timestep, 250) is close to the identity on them.

    The shipped weights (docs/tiny_backbone.md) measure 32.4 dB (random init 8.9 dB) reconstruction
    and 33.2 dB one-step identity at t = 250 on these crops (random init, at t = 999: 10.3 dB; the
    earlier UNet pretrained at t = 999 reached 27.8 dB)."""
    x = eval_crops("test", size=64, per_photo=1)
    shipped, random_init = load_backbone("tiny"), load_backbone("tiny", pretrained=False)
    assert shipped.source == str(TINY_ASSETS)
    scores, identity = {}, {}
    with torch.no_grad():
        for name, b in (("shipped", shipped), ("random", random_init)):
            z = b.encode(x)
            scores[name] = float(psnr(b.decode(z), x))
            text = b.encode_prompt("").expand(len(x), -1, -1)
            identity[name] = float(psnr(b.decode(b.one_step(z, text)), x))
    assert scores["shipped"] >= 30.0 and scores["shipped"] >= scores["random"] + 15, scores
    assert shipped.one_step_timestep == 250
    assert identity["shipped"] >= 30.0 and identity["shipped"] >= identity["random"] + 15, identity
