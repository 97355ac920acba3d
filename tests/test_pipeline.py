"""DMDiffPipeline: input conversions, tunable decoding, and the safetensors-only folder round trip."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_trainable  # noqa: E402
from PIL import Image

from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.model.backbone import load_backbone, save_backbone
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.pipeline import (
    CONFIG_FILE,
    TRAINABLE_FILE,
    DMDiffPipeline,
    DMDiffPipelineOutput,
    ImageInputError,
)
from dmdiff.outputs import MANIFEST

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe():
    pipeline = DMDiffPipeline.from_model(perturb_trainable(DMDiff(DMDiffConfig(), load_backbone("tiny", pretrained=False))))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _photo(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def test_components_are_the_models_own(pipe):
    assert set(pipe.components) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model"}
    assert pipe.unet is pipe.model.unet and pipe.device.type == "cpu" and pipe.dtype == torch.float32
    other = load_backbone("tiny", pretrained=False, seed=1)
    with pytest.raises(ConfigError, match="from_model"):
        DMDiffPipeline(other.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.model)


def test_accepts_pil_numpy_and_tensors_of_any_size(pipe):
    u8 = (_photo(21, 30) * 255).round().astype(np.uint8)
    from_u8 = pipe(u8).images[0]
    assert from_u8.shape == (21, 30, 3) and from_u8.dtype == np.float32
    assert 0 <= from_u8.min() and from_u8.max() <= 1
    same = [pipe(Image.fromarray(u8)).images[0],                                  # PIL
            pipe(u8.astype(np.float32) / 255).images[0],                          # float numpy
            pipe(u8.astype(np.uint16) * 257).images[0],                           # 16-bit numpy
            pipe(torch.from_numpy(u8).permute(2, 0, 1)).images[0],                # uint8 tensor
            pipe(torch.from_numpy(u8).permute(2, 0, 1).float() / 255).images[0]]  # float tensor
    for image in same:
        np.testing.assert_array_equal(image, from_u8)
    out = pipe([_photo(17, 23), _photo(40, 12), torch.rand(2, 3, 9, 11)], alpha=0.5)
    assert [im.shape for im in out.images] == [(17, 23, 3), (40, 12, 3), (9, 11, 3), (9, 11, 3)]
    assert out.latents is None
    gray = pipe(_photo(10, 10)[..., 0]).images[0]
    assert gray.shape == (10, 10, 3)


def test_bad_inputs_say_what_is_wrong(pipe):
    cases = [(np.zeros((8, 8, 4), np.uint8), "(H, W, 3)"), (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
             (np.full((8, 8, 3), np.nan, np.float32), "NaN"), (np.zeros((8, 8, 3), np.int32), "uint8"),
             (torch.rand(1, 8, 8), r"\(3, H, W\)"), ("photo.png", "cannot use a str"), ([], "empty")]
    for image, message in cases:
        with pytest.raises(ImageInputError, match=message):
            pipe(image)
    with pytest.raises(ImageInputError, match="maps for 2 images"):
        pipe(_photo(8, 8), maps=[None, None])
    with pytest.raises(ConfigError, match="alpha"):
        pipe(_photo(8, 8), alpha=1.5)


def test_maps_and_tunable_decoding(pipe):
    photos = [_photo(19, 25, seed=1), _photo(14, 30, seed=2)]
    maps = [np.full((7, 7, 7), 3.0, np.float32), None]
    out = pipe(photos, maps=maps, alpha=1.0, return_latents=True)
    assert isinstance(out, DMDiffPipelineOutput) and len(out.latents) == 2
    for alpha in (0.0, 0.6, 1.2):
        decoded = pipe.decode(out, alpha)
        for image, expected in zip(decoded, pipe(photos, maps=maps, alpha=alpha).images):
            np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(pipe.decode(out.latents, 1.0)[0], out.images[0])
    assert not np.array_equal(pipe(photos[0]).images[0], out.images[0])          # the maps were used
    with pytest.raises(DmdiffError, match="return_latents"):
        pipe.decode(pipe(photos[0]), 0.5)


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from dmdiff.model.pipeline import DMDiffPipeline

    torch.set_num_threads(1)
    folder, image, maps, out = sys.argv[1:]
    pipe = DMDiffPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(np.load(image), maps=np.load(maps), alpha=0.7)
    np.save(out, result.images[0])
""")


def test_save_and_reload_in_a_fresh_process_is_exact(pipe, tmp_path):
    image, maps = _photo(37, 53, seed=3), np.full((7, 5, 5), 2.5, np.float32)
    expected = pipe(image, maps=maps, alpha=0.7).images[0]
    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, "backbone", CONFIG_FILE, TRAINABLE_FILE])
    assert (folder / "backbone" / "model_index.json").is_file()
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["config"]["preset"] == "tiny" and meta["backbone"]["embedded"] == "backbone"
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "maps.npy", maps)
    script = tmp_path / "reload.py"
    script.write_text(FRESH_PROCESS)
    run = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "image.npy"),
                          str(tmp_path / "maps.npy"), str(tmp_path / "out.npy")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = np.load(tmp_path / "out.npy")
    assert reloaded.shape == expected.shape
    assert np.abs(reloaded - expected).max() == 0

    with pytest.raises(DmdiffError, match="not empty"):
        pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, overwrite=True)


def test_refuses_pickles(pipe, tmp_path):
    with pytest.raises(DmdiffError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "unsafe", safe_serialization=False)
    assert not (tmp_path / "unsafe").exists()
    folder = pipe.save_pretrained(tmp_path / "pipe")
    torch.save({"x": torch.zeros(1)}, folder / "dmdiff_trainable.bin")
    with pytest.raises(DmdiffError, match=r"pickle weight files \(dmdiff_trainable.bin\)"):
        DMDiffPipeline.from_pretrained(folder)
    (folder / "dmdiff_trainable.bin").unlink()
    (folder / TRAINABLE_FILE).unlink()
    with pytest.raises(DmdiffError, match="lacks its trained weights"):
        DMDiffPipeline.from_pretrained(folder)


def test_sd_turbo_layout_folder_loads_through_the_sd_turbo_preset(tmp_path):
    """A folder in SD-Turbo's layout (here: a tiny backbone saved outside the repo) is what the
    ``sd-turbo`` preset reads; the pipeline refers to it by path instead of embedding it."""
    sd_turbo = save_backbone(load_backbone("tiny", pretrained=False, seed=2), tmp_path / "models" / "sd-turbo")
    config = DMDiffConfig(preset="sd-turbo", model_path=str(sd_turbo))
    model = perturb_trainable(DMDiff(config))
    assert model.backbone.preset == "sd-turbo" and model.unet_lora.rank == 32     # sd-turbo ranks
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    out = model.restore(x, alpha=1.05)
    assert out.shape == x.shape and torch.isfinite(out).all()

    pipe = DMDiffPipeline.from_model(model)
    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert not (folder / "backbone").exists()
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["backbone"]["source"] == str(sd_turbo.resolve())
    reloaded = DMDiffPipeline.from_pretrained(folder).model
    assert torch.equal(reloaded.restore(x, alpha=1.05), out)
    with pytest.raises(DmdiffError, match="backbone folder"):
        DMDiffPipeline.from_pretrained(sd_turbo)
