"""Pretraining of the tiny backbone: the smoke run of the CLI, and the quality of the shipped weights."""

import json

import pytest
import torch

from dmdiff.cli import main as cli_main
from dmdiff.data.sources import TEST_PHOTOS, TRAIN_PHOTOS
from dmdiff.data.corpus import VALIDATION_PHOTOS
from dmdiff.model.backbone import TINY_ASSETS, TINY_UNET, TINY_VAE, load_backbone
from dmdiff.train.pretrain import REPORT_NAME, CropSampler, PretrainConfig, eval_crops, psnr


def test_sampler_uses_training_photos_only():
    sampler = CropSampler(seed=0, dead_leaves_fraction=0.5, dead_leaves_images=4, dead_leaves_px=64)
    assert sorted(sampler.photos) == sorted(TRAIN_PHOTOS)
    assert not set(sampler.photos) & set(TEST_PHOTOS)
    x = sampler.batch(4, 36)
    assert x.shape == (4, 3, 36, 36) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def _pretrain(*args):
    return cli_main(["pretrain-backbone", "--smoke", *map(str, args)])


@pytest.mark.slow
def test_smoke_pretrain_writes_a_loadable_backbone(tmp_path, capsys):
    out, run = tmp_path / "tiny_backbone", tmp_path / "run"
    assert _pretrain("--out", out, "--run", run) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["stage_vae"]["steps"] == report["stage_unet"]["steps"] == 2 and report["sessions"] == 1
    assert report["data"]["heldout_eval_only"] == list(TEST_PHOTOS)
    assert not set(report["data"]["train"]) & set(TEST_PHOTOS)
    assert not list(tmp_path.glob(".*staging*")), "the staging folder was left behind"

    backbone = load_backbone("tiny", path=out)
    assert backbone.vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-4)
    with torch.no_grad():
        z = backbone.encode(torch.rand(1, 3, 16, 16))
        z0 = backbone.one_step(z, backbone.encode_prompt(""))
    assert z0.shape == z.shape == (1, 4, 8, 8) and torch.isfinite(z0).all()

    assert _pretrain("--out", out, "--run", tmp_path / "run2") == 2   # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _pretrain("--out", tmp_path / "other", "--run", run) == 2   # the run folder holds a finished run
    assert "--resume" in capsys.readouterr().err

    # --unet-only keeps the VAE and its report entry, retrains the UNet for another timestep
    vae_before = {k: v.clone() for k, v in backbone.vae.state_dict().items()}
    assert _pretrain("--out", out, "--run", tmp_path / "run3", "--unet-only", "--timestep", "100") == 0
    again = json.loads((out / REPORT_NAME).read_text())
    assert again["unet_only"] and again["timestep"] == 100 and again["stage_unet"]["steps"] == 2
    assert again["stage_vae"]["steps"] == report["stage_vae"]["steps"]
    assert again["stage_vae"]["trained_utc"] == report["created_utc"]
    retrained = load_backbone("tiny", path=out)
    assert retrained.one_step_timestep == 100
    assert all(torch.equal(v, vae_before[k]) for k, v in retrained.vae.state_dict().items())
    assert not torch.equal(retrained.unet.conv_in.weight, backbone.unet.conv_in.weight)

    capsys.readouterr()
    assert _pretrain("--out", tmp_path / "x", "--run", tmp_path / "r4", "--timestep", "1000") == 2
    assert "timestep must be an integer in [0, 999]" in capsys.readouterr().err
    assert _pretrain("--out", tmp_path / "none", "--run", tmp_path / "r5", "--unet-only") == 2
    assert "holds none" in capsys.readouterr().err


def _tensors(folder):
    return {f"{part}.{k}": v for part in ("vae", "unet")
            for k, v in getattr(load_backbone("tiny", path=folder), part).state_dict().items()}


@pytest.mark.slow
def test_time_boxed_sessions_resume_bit_for_bit(tmp_path, capsys):
    """A run cut into one-step sessions (--minutes 0: each session makes one step, then checkpoints and
    stops with status 3) ends with exactly the weights of the same run made in one go."""
    assert _pretrain("--out", tmp_path / "whole", "--run", tmp_path / "run_whole") == 0
    assert _pretrain("--out", tmp_path / "cut", "--run", tmp_path / "run_cut", "--minutes", "0") == 3
    assert "--resume" in capsys.readouterr().err and (tmp_path / "run_cut" / "checkpoint-1").is_dir()
    statuses = [_pretrain("--out", tmp_path / "cut", "--run", tmp_path / "run_cut", "--minutes", "0", "--resume")
                for _ in range(3)]
    assert statuses == [3, 3, 0]        # VAE step 2 (then the UNet stage begins), UNet steps 1 and 2
    whole, cut = _tensors(tmp_path / "whole"), _tensors(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    report = json.loads((tmp_path / "cut" / REPORT_NAME).read_text())
    assert report["sessions"] == 4 and report["stage_vae"]["steps"] == report["stage_unet"]["steps"] == 2
    assert report["psnr_db"] == json.loads((tmp_path / "whole" / REPORT_NAME).read_text())["psnr_db"]

    capsys.readouterr()                 # resuming with other settings, or with nothing to resume
    assert _pretrain("--out", tmp_path / "s", "--run", tmp_path / "run_s", "--minutes", "0") == 3
    assert _pretrain("--out", tmp_path / "s", "--run", tmp_path / "run_s", "--resume", "--seed", "1") == 2
    assert "seed 0 then, 1 now" in capsys.readouterr().err
    assert _pretrain("--out", tmp_path / "t", "--run", tmp_path / "run_t", "--resume") == 2
    assert "holds no checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not (TINY_ASSETS / "model_index.json").is_file(), reason="no shipped tiny backbone")
def test_shipped_backbone_reconstructs_heldout_photos():
    """The shipped VAE reconstructs crops of the held-out (test) photos far better than random init,
    and the shipped UNet's one-step map (at its recorded timestep, 250) is close to the identity on them.

    The shipped weights (docs/tiny_backbone.md) measure 39.1 dB (random init 8.9 dB) reconstruction
    and 38.4 dB one-step identity at t = 250 on these crops (random init 9.8 dB); the first shipped
    backbone, trained on five photos only, measured 32.4 and 33.2 dB."""
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
    assert scores["shipped"] >= 37.0 and scores["shipped"] >= scores["random"] + 20, scores
    assert shipped.one_step_timestep == 250
    assert identity["shipped"] >= 36.0 and identity["shipped"] >= identity["random"] + 20, identity


@pytest.mark.skipif(not (TINY_ASSETS / REPORT_NAME).is_file(), reason="no shipped tiny backbone")
def test_shipped_backbone_is_what_the_default_command_makes():
    """The shipped folder's report: the default steps and seed (so `dmdiff pretrain-backbone --corpus`
    remakes it), the corpus with a licence for every photo, validation and test photos never trained
    on, and the layout of the package's tiny configs."""
    report = json.loads((TINY_ASSETS / REPORT_NAME).read_text())
    defaults = PretrainConfig()
    assert report["finished"] and report["config"]["corpus_root"]
    assert (report["stage_vae"]["steps"], report["stage_unet"]["steps"]) == (defaults.vae_steps, defaults.unet_steps)
    assert report["seed"] == defaults.seed and report["timestep"] == defaults.timestep
    packages = report["data"]["corpus"]["packages"]
    assert set(packages) == {"plasma-workspace-wallpapers", "opencv-doc"}
    assert all(photo["licence"] and photo["licence"] != "unknown" for photos in packages.values() for photo in photos)
    trained = set(report["data"]["train"])
    assert not trained & (set(VALIDATION_PHOTOS) | set(TEST_PHOTOS))
    assert not any(name.startswith("external_") for name in trained)
    shipped = load_backbone("tiny")
    as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    for config, layout in ((shipped.unet.config, TINY_UNET), (shipped.vae.config, TINY_VAE)):
        for key, value in layout.items():
            if key != "scaling_factor":                    # set by the pretraining from its latents
                assert as_list(config[key]) == as_list(value), key
