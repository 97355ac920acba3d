"""Damaged model folders and checkpoints give a DmdiffError naming the file (and key), never a
traceback, never an unpickled byte, and leave the folder as it was."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmdiff.errors import DmdiffError
from dmdiff.imageio import write_png
from dmdiff.model.backbone import load_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.pipeline import (
    ANCHOR_PSF_FILE,
    CONFIG_FILE,
    TRAINABLE_FILE,
    DMDiffPipeline,
)
from dmdiff.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent
UNET_WEIGHTS = "backbone/unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "backbone/vae/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "backbone/text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline folder with every kind of file: trainable weights, an anchor PSF, an embedded backbone."""
    model = DMDiff(DMDiffConfig(anchor_sigma_px=4.0, anchor_rl_iterations=1), load_backbone("tiny", pretrained=False))
    model.set_anchor_psf(torch.ones(3, 5, 5))
    return DMDiffPipeline.from_model(model).save_pretrained(tmp_path_factory.mktemp("good") / "pipeline")


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the good pipeline folder, in its own parent folder (for 'outside' files)."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture
def never_unpickle(monkeypatch):
    """Fail the test if anything is unpickled."""
    def refuse(*args, **kwargs):
        pytest.fail("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def digest(folder: Path) -> str:
    """A hash of the folder's names, file contents and link targets (links not followed)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def refused(folder: Path, *fragments: str) -> str:
    """Load ``folder``: assert a DmdiffError whose message holds every fragment, and an unchanged
    folder; returns the message."""
    before = digest(folder)
    with pytest.raises(DmdiffError) as err:
        DMDiffPipeline.from_pretrained(folder)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert digest(folder) == before
    return message


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(folder: Path, edit) -> None:
    """Let ``edit`` change the folder's config record in place (its return value is ignored)."""
    path = folder / CONFIG_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---- 1. truncated safetensors ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [TRAINABLE_FILE, ANCHOR_PSF_FILE, UNET_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS])
def test_truncated_safetensors(copy, name):
    truncate(copy / name)
    refused(copy, str(copy / name), "truncated")


# ---- 2. pickles renamed .safetensors -----------------------------------------------------------------


@pytest.mark.parametrize("name", [TRAINABLE_FILE, ANCHOR_PSF_FILE, VAE_WEIGHTS])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_pickle_renamed_safetensors_is_not_unpickled(copy, name, writer, never_unpickle):
    if writer == "torch.save":
        torch.save({"psf": torch.ones(3, 5, 5)}, copy / name)
    else:
        (copy / name).write_bytes(pickle.dumps({"psf": [1.0, 2.0]}))
    refused(copy, str(copy / name), "not a safetensors file", "pickle")


# ---- 3. invalid or incomplete dmdiff_config.json -------------------------------------------------------


def _config_text(text: str):
    return lambda folder: (folder / CONFIG_FILE).write_text(text)


def _config_edit(edit):
    return lambda folder: edit_config(folder, edit)


@pytest.mark.parametrize("damage, fragments", [
    (_config_text("{not json"), ["not valid JSON"]),
    (_config_text('[{"format": "dmdiff-pipeline"}]'), ["JSON object at the top level, got list"]),
    (_config_edit(lambda meta: meta.pop("config")), ["'config'", "missing"]),
    (_config_edit(lambda meta: meta["config"].update(bogus=1)), ["unknown config key 'config.bogus'"]),
    (_config_edit(lambda meta: meta["config"].update(grid_size="seven")), ["config.grid_size", "integer"]),
    (_config_edit(lambda meta: meta["config"].update(prompts=3)), ["config.prompts"]),
    (_config_edit(lambda meta: meta.pop("backbone")), ["'backbone'", "missing"]),
    (_config_edit(lambda meta: meta.update(backbone=["tiny"])), ["'backbone'", "list"]),
    (_config_edit(lambda meta: meta.pop("trainable_file")), ["trainable_file", "got None"]),
    (_config_edit(lambda meta: meta.update(trainable_file=7)), ["trainable_file", "got 7"]),
    (_config_edit(lambda meta: meta["backbone"].pop("embedded")), ["backbone.embedded", "got None"]),
], ids=["bad-json", "top-level-list", "no-config", "unknown-key", "wrong-type", "prompts-not-object",
        "no-backbone", "backbone-list", "no-trainable-file", "trainable-file-int", "no-embedded"])
def test_invalid_config_file(copy, damage, fragments):
    damage(copy)
    refused(copy, str(copy / CONFIG_FILE), *fragments)


# ---- 4. paths that leave the folder ----------------------------------------------------------------


def _outside(folder: Path, name: str) -> Path:
    """A valid copy of the folder's ``name`` next to the folder (so refusals are not 'file missing')."""
    target = folder.parent / f"outside-{Path(name).name}"
    shutil.copy(folder / name, target)
    return target


@pytest.mark.parametrize("key, value", [
    ("trainable_file", "../outside-dmdiff_trainable.safetensors"),
    ("trainable_file", "ABSOLUTE"),
    ("anchor_psf_file", "../outside-anchor_psf.safetensors"),
    ("anchor_psf_file", "ABSOLUTE"),
    ("backbone.embedded", "/etc"),
    ("backbone.embedded", "../.."),
], ids=["trainable-up", "trainable-absolute", "psf-up", "psf-absolute", "embedded-etc", "embedded-up"])
def test_config_paths_must_stay_inside(copy, key, value):
    name = TRAINABLE_FILE if key == "trainable_file" else ANCHOR_PSF_FILE
    target = _outside(copy, name)
    value = str(target) if value == "ABSOLUTE" else value
    if key == "backbone.embedded":
        edit_config(copy, lambda meta: meta["backbone"].update(embedded=value))
    else:
        edit_config(copy, lambda meta: meta.update({key: value}))
    message = refused(copy, str(copy / CONFIG_FILE), key, repr(value), "leads outside")
    if key == "backbone.embedded":
        assert "embedded backbone folder" in message and "SD-Turbo" not in message


@pytest.mark.parametrize("name", [TRAINABLE_FILE, ANCHOR_PSF_FILE, "backbone", "backbone/unet"])
def test_links_leading_outside_are_refused(copy, name):
    target = copy.parent / f"outside-{Path(name).name}"
    shutil.move(copy / name, target)
    os.symlink(target, copy / name)
    refused(copy, str(copy / name), "leads outside")


def test_links_inside_the_folder_are_fine(copy):
    (copy / TRAINABLE_FILE).rename(copy / "weights.safetensors")
    os.symlink("weights.safetensors", copy / TRAINABLE_FILE)
    assert DMDiffPipeline.from_pretrained(copy).model.anchor_psf is not None


# ---- 5. pickle file types refused by name -----------------------------------------------------------


@pytest.mark.parametrize("name", ["extra.pickle", "extra.pkl", "extra.joblib", "extra.dill",
                                  "model.pth.tar", "backbone/unet/diffusion_pytorch_model.bin"])
def test_pickle_file_types_are_refused_by_name(copy, name, never_unpickle):
    (copy / name).write_bytes(pickle.dumps({"w": 1}))
    refused(copy, "pickle weight files", name)


# ---- 6. a broken embedded backbone -----------------------------------------------------------------


def _keep_some_tensors(path: Path) -> None:
    tensors = load_file(str(path))
    save_file(dict(list(tensors.items())[:3]), str(path))


@pytest.mark.parametrize("damage, names, fragments", [
    (lambda f: (f / "backbone/unet/config.json").write_text("{broken"), ["backbone/unet"], ["unet cannot be loaded"]),
    (lambda f: (f / "backbone/unet/config.json").write_text('{"block_out_channels": 3}'), ["backbone/unet"],
     ["unet cannot be loaded"]),
    (lambda f: (f / "backbone/text_encoder/config.json").write_text("[]"), ["backbone/text_encoder"],
     ["text_encoder cannot be loaded"]),
    (lambda f: (f / "backbone/unet/config.json").write_text("{}"), ["backbone/unet"], ["unet cannot be loaded"]),
    (lambda f: (f / VAE_WEIGHTS).unlink(), ["backbone/vae"], ["holds no weights"]),
    (lambda f: _keep_some_tensors(f / VAE_WEIGHTS), ["backbone/vae"], ["weights lack"]),
    (lambda f: _keep_some_tensors(f / TEXT_WEIGHTS), ["backbone/text_encoder"], ["weights lack"]),
    (lambda f: (f / "backbone/tokenizer/tokenizer.json").write_text("{x"), ["backbone/tokenizer"],
     ["tokenizer cannot be loaded"]),
    (lambda f: (f / "backbone/tokenizer/merges.txt").unlink(), ["backbone"], ["missing tokenizer/merges.txt"]),
    (lambda f: (f / "backbone/scheduler/scheduler_config.json").unlink(), ["backbone/scheduler"],
     ["scheduler cannot be loaded"]),
    (lambda f: shutil.rmtree(f / "backbone/vae"), ["backbone"], ["missing vae/"]),
    (lambda f: edit_config(f, lambda meta: meta["backbone"].update(embedded="elsewhere")), ["elsewhere"],
     ["not a complete backbone folder"]),
], ids=["unet-config-json", "unet-config-value", "text-config-list", "unet-config-empty", "vae-weights-missing",
        "vae-tensors-missing", "text-tensors-missing", "tokenizer-json", "merges-missing", "scheduler-config-missing",
        "vae-folder-missing", "embedded-folder-missing"])
def test_broken_embedded_backbone(copy, damage, names, fragments):
    damage(copy)
    message = refused(copy, *(str(copy / name) for name in names), *fragments)
    assert "tiny backbone folder" in message and "SD-Turbo" not in message


# ---- 7. damaged training checkpoints ---------------------------------------------------------------


def _write_checkpoint(run: Path, step: int) -> Path:
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = ckpt_io.partial_dir(run, step)
    folder.mkdir(parents=True)
    ckpt_io.write_rng(folder, 0)
    return ckpt_io.write_checkpoint(folder, step, model=dict(net.named_parameters()), optimizer=optimizer.state_dict(),
                                    ema=None, samples_seen=4 * step, world_size=1)


def _edit_state(edit):
    def damage(folder: Path) -> None:
        state = json.loads((folder / ckpt_io.STATE).read_text())
        edit(state)
        (folder / ckpt_io.STATE).write_text(json.dumps(state))
    return damage


@pytest.mark.parametrize("damage, name, fragments", [
    (_edit_state(lambda s: s.pop("files")), ckpt_io.STATE, ["'files'", "JSON object"]),
    (_edit_state(lambda s: s.pop("step")), ckpt_io.STATE, ["'step'", "non-negative integer"]),
    (_edit_state(lambda s: s.update(step="2")), ckpt_io.STATE, ["'step'", "'2'"]),
    (_edit_state(lambda s: s.update(files=["model.safetensors"])), ckpt_io.STATE, ["'files'", "JSON object"]),
    (_edit_state(lambda s: s.update(world_size=True)), ckpt_io.STATE, ["'world_size'"]),
    (_edit_state(lambda s: s["files"].pop("optimizer.json")), ckpt_io.STATE, ["lacks ['optimizer.json']"]),
    (_edit_state(lambda s: s["files"].update({"../model.safetensors": None})), ckpt_io.STATE,
     ["names no file of the folder"]),
    (lambda f: (f / ckpt_io.STATE).write_text("[1, 2]"), ckpt_io.STATE, ["not a dmdiff checkpoint"]),
    (lambda f: truncate(f / "model.safetensors"), "model.safetensors", ["truncated"]),
    (lambda f: truncate(f / "optimizer.safetensors"), "optimizer.safetensors", ["truncated"]),
    (lambda f: (f / "model.safetensors").write_bytes(pickle.dumps({"weight": 1})), "model.safetensors",
     ["not a safetensors file", "pickle"]),
    (lambda f: torch.save({"x": torch.zeros(1)}, f / "rng-0.safetensors"), "rng-0.safetensors",
     ["not a safetensors file", "pickle"]),
], ids=["no-files", "no-step", "step-string", "files-list", "world-size-bool", "lacks-optimizer-json",
        "file-outside", "state-list", "truncated-model", "truncated-optimizer", "pickled-model", "pickled-rng"])
def test_damaged_checkpoint(tmp_path, damage, name, fragments, never_unpickle):
    run = tmp_path / "run"
    _write_checkpoint(run, 1)
    damaged = _write_checkpoint(run, 2)
    assert ckpt_io.load_checkpoint(damaged).step == 2
    damage(damaged)
    before = digest(run)
    with pytest.raises(DmdiffError) as err:
        ckpt_io.load_checkpoint(damaged)
    for fragment in (str(damaged / name), *fragments):
        assert fragment in str(err.value), (fragment, str(err.value))
    with pytest.warns(ckpt_io.CheckpointWarning, match="checkpoint-2"):
        assert ckpt_io.find_checkpoint(run, "latest").step == 1
    assert digest(run) == before


# ---- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, name", [
    (lambda f: truncate(f / TRAINABLE_FILE), TRAINABLE_FILE),
    (lambda f: (f / VAE_WEIGHTS).write_bytes(pickle.dumps({"w": 1})), VAE_WEIGHTS),
    (lambda f: edit_config(f, lambda meta: meta.update(trainable_file="../x.safetensors")), CONFIG_FILE),
], ids=["truncated-weights", "pickled-backbone-weights", "path-outside"])
def test_command_line_reports_damage_without_a_traceback(copy, tmp_path, damage, name):
    damage(copy)
    image = write_png(tmp_path / "img.png", np.full((32, 32, 3), 0.5, np.float32))
    out = tmp_path / "out"
    before = digest(copy)
    run = subprocess.run([sys.executable, "-m", "dmdiff.cli", "restore", "--no-progress", "--model", str(copy),
                          "--input", str(image), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert str(copy / name) in run.stderr
    assert not out.exists() or not any(out.iterdir())
    assert digest(copy) == before
