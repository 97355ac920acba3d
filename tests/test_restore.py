"""Tiled restoration (dmdiff.model.tiling) and the `dmdiff restore` command (dmdiff.restore)."""

import hashlib
import json
import math
import shutil

import numpy as np
import png
import pytest
import tifffile
import torch
from conftest import noisy_photo, perturb_trainable  # noqa: E402
from PIL import Image

from dmdiff.cli import main as cli
from dmdiff.data.dataset import crop_maps
from dmdiff.device import torch_threads
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.imageio import read_image, write_png
from dmdiff.model.color import color_correct, resolve_color_correction
from dmdiff.model.dmdiff import DECODED_PATHS, DMDiff, DMDiffConfig, decoded_paths
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.model.tiling import (
    axis_tiles,
    check_tiling,
    ramp_profile,
    tile_windows,
    tiled_decode,
    tiled_latents,
    tiled_restore,
)
from dmdiff.restore import COPY_MAX_BYTES, REPORT_FILE, default_threads, default_workers, restore, worker_copy
from dmdiff.runs import load_pipeline


@pytest.fixture(scope="module")
def model():
    """The shipped tiny backbone with seeded, non-identity adapters (LoRA, SVDA, modulation); the
    adapters' initialisation is seeded too, so every run tests the same model."""
    torch.manual_seed(3)
    return perturb_trainable(DMDiff(DMDiffConfig()), seed=3)


@pytest.fixture(scope="module")
def pipeline_dir(model, tmp_path_factory):
    return DMDiffPipeline.from_model(model).save_pretrained(tmp_path_factory.mktemp("restore") / "pipe")


def _smooth(h, w):
    """A smooth, low-frequency colour image (1, 3, h, w): ramps and one slow sine."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([0.3 + 0.4 * xx, 0.5 + 0.2 * torch.sin(2 * math.pi * yy), 0.6 - 0.3 * xx * yy])[None]


def _field_maps(grid=5):
    """Maps (1, 7, G, G) that grow across the field (PSF widths 1…8 px left to right, noise 0.01…0.03)."""
    ramp = torch.linspace(0, 1, grid)
    maps = torch.empty(1, 7, grid, grid)
    maps[:, :6] = (1 + 7 * ramp)[None, None, None, :]
    maps[:, 6] = (0.01 + 0.02 * ramp)[None, :, None]
    return maps


def _u8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _to_np(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------------


def test_layout_covers_the_axis_with_the_requested_overlap():
    assert axis_tiles(30, 32, 8) == [(0, 30, 0, 0)]
    for length, tile, overlap in [(128, 32, 8), (100, 32, 8), (1024, 128, 16), (65, 32, 0), (64, 32, 0)]:
        tiles = axis_tiles(length, tile, overlap)
        starts = [s for s, _, _, _ in tiles]
        assert starts[0] == 0 and starts[-1] + tile == length and all(size == tile for _, size, _, _ in tiles)
        for (s0, _, _, after), (s1, _, before, _) in zip(tiles, tiles[1:]):
            assert s0 + tile - s1 == after == before >= overlap     # the ramps are the real overlaps
    assert [r for _, _, *r in axis_tiles(64, 32, 0)] == [[0, 0], [0, 0]]  # abutting: the naive tiling
    # a pair of raised-cosine ramps sums to exactly 1 over their overlap; weights stay positive
    a, b = ramp_profile(32, 0, 12), ramp_profile(32, 12, 0)
    np.testing.assert_allclose((a[-12:] + b[:12]).numpy(), 1.0, atol=1e-12)
    assert a.min() > 0 and a[:20].eq(1).all()
    ramp = math.sin(math.pi / 8) ** 2                                      # sin²(π/2 · 0.5/2)
    assert ramp_profile(4, 1, 0, scale=2).tolist() == pytest.approx([ramp, 1 - ramp] + [1] * 6)
    assert len(tile_windows(100, 70, 32, 8)) == len(axis_tiles(100, 32, 8)) * len(axis_tiles(70, 32, 8))


def test_tile_settings_are_checked(model):
    assert check_tiling(model, 64, 16) == (64, 16)
    for tile, overlap, message in [(66, 16, "multiple of 16"), (4, 0, "at least 16"), (64, 3, "multiple of 2"),
                                   (64, 34, "tile/2"), (64, -2, "overlap"), (64.0, 16, "integer"),
                                   (True, 0, "integer")]:
        with pytest.raises(ConfigError, match=message):
            check_tiling(model, tile, overlap)


def test_an_image_in_one_tile_is_exactly_restore(model):
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    maps = _field_maps()
    expected, cached = model.restore(x, maps, alpha=0.7, return_latents=True)
    restored, latents = tiled_restore(model, x, maps, alpha=0.7, tile=64, overlap=16, return_latents=True)
    assert torch.equal(restored, expected)
    assert torch.equal(latents.z_neutral, cached.z_neutral) and latents.pad == cached.pad
    assert torch.equal(tiled_decode(model, latents, 0.2, tile=64, overlap=16), model.decode(cached, 0.2))
    assert not torch.allclose(restored, x, atol=0.02)                        # not the identity


def test_alpha_redecodes_tiled_latents(model):
    x = _smooth(80, 144) * 0.8 + 0.1 * torch.rand(1, 3, 80, 144, generator=torch.Generator().manual_seed(1))
    done = []
    restored, latents = tiled_restore(model, x, _field_maps(), alpha=1.0, tile=48, overlap=16,
                                      return_latents=True, on_tile=lambda i, n: done.append((i, n)))
    n_tiles = len(tile_windows(80 // 2, 144 // 2, 24, 8))
    assert n_tiles > 4 and done == [(i, n_tiles) for i in range(1, n_tiles + 1)]
    assert restored.shape == x.shape and latents.z_positive.shape == (1, 4, 40, 72)
    for alpha in (0.0, 0.4, 1.2):
        fresh = tiled_restore(model, x, _field_maps(), alpha=alpha, tile=48, overlap=16)
        assert torch.equal(tiled_decode(model, latents, alpha, tile=48, overlap=16), fresh)
    assert torch.equal(tiled_decode(model, latents, 1.0, tile=48, overlap=16), restored)
    # α moves the output (1.6e-5 here: untrained adapters, so the paths differ only by their prompts,
    # which the shipped UNet reads at its lowest level and in the mid-block, and its t = 250 step damps
    # ε's differences by sqrt(1 − ᾱ)/sqrt(ᾱ) = 0.70; it would be exactly 0 if α were ignored)
    assert (tiled_decode(model, latents, 0.0, tile=48, overlap=16) - restored).abs().max() > 2e-6


def test_latents_for_one_alpha_run_one_path_and_decode_only_there(model):
    x = _smooth(80, 144) * 0.8 + 0.1 * torch.rand(1, 3, 80, 144, generator=torch.Generator().manual_seed(2))
    maps = _field_maps()
    both = model.restore_latents(x, maps)
    tiled_both = tiled_latents(model, x, maps, tile=48, overlap=16)
    for alpha, kept in ((0.0, "neutral"), (1.0, "positive")):
        assert decoded_paths(alpha) == (kept,)
        one = model.restore_latents(x, maps, paths=decoded_paths(alpha))
        tiled_one = tiled_latents(model, x, maps, tile=48, overlap=16, paths=(kept,))
        for latents, reference in ((one, both), (tiled_one, tiled_both)):
            assert [p for p in DECODED_PATHS if getattr(latents, f"z_{p}") is None] == [p for p in DECODED_PATHS
                                                                                        if p != kept]
            torch.testing.assert_close(getattr(latents, f"z_{kept}"), getattr(reference, f"z_{kept}"),
                                       rtol=0, atol=1e-5)
            with pytest.raises(DmdiffError, match="cannot be decoded at α = 0.5"):
                model.decode(latents, 0.5)
        torch.testing.assert_close(model.decode(one, alpha), model.decode(both, alpha), rtol=0, atol=1e-5)
        torch.testing.assert_close(tiled_decode(model, tiled_one, alpha, tile=48, overlap=16),
                                   tiled_decode(model, tiled_both, alpha, tile=48, overlap=16), rtol=0, atol=1e-5)
    assert decoded_paths(0.5) == decoded_paths(None) == DECODED_PATHS
    with pytest.raises(ConfigError, match="paths must be some of"):
        model.path_latents(x, maps, paths=("negative",))


def test_each_tile_gets_the_maps_of_its_own_window(model, monkeypatch):
    x, maps = _smooth(64, 144), _field_maps(grid=7)
    seen = []
    original = model.path_latents

    def spy(tile, tile_maps=None, paths=DECODED_PATHS):
        seen.append((tuple(tile.shape[-2:]), tile_maps))
        return original(tile, tile_maps, paths)

    monkeypatch.setattr(model, "path_latents", spy)
    latents = tiled_latents(model, x, maps, tile=64, overlap=16)
    windows = tile_windows(32, 72, 32, 8)
    assert len(seen) == len(windows) == 3 and latents.pad == (0, 0, 0, 0)
    for ((y0, x0, h, w), _), (shape, tile_maps) in zip(windows, seen):
        assert shape == (2 * h, 2 * w)
        expected = crop_maps(maps[0].numpy(), (64, 144), (2 * y0, 2 * x0, 2 * h, 2 * w))
        np.testing.assert_allclose(tile_maps[0].numpy(), expected, rtol=1e-6)
    widths = [m[0, 0].mean().item() for _, m in seen]
    assert widths[0] < widths[1] < widths[2]                      # blur grows to the right, as the field does


def _seam_ratio(image: torch.Tensor, edges: list[int], margin: int = 16) -> float:
    """Gradient energy on the rows/columns at tile edges (±2 px) over that on the others (≥ 5 px away),
    both at least ``margin`` px from the image border; the larger of the row and column ratios."""
    y = image[0].double().numpy()
    ratios = []
    for axis, diff in ((2, y[:, :, 1:] - y[:, :, :-1]), (1, y[:, 1:, :] - y[:, :-1, :])):
        energy = (diff ** 2).mean(axis=(0, 3 - axis))                     # per boundary k | k + 1
        index = np.arange(energy.size)
        distance = np.min([np.abs(index - (e - 1)) for e in edges], axis=0)
        inside = (index >= margin) & (index < energy.size - margin)
        ratios.append(energy[inside & (distance <= 2)].mean() / energy[inside & (distance >= 5)].mean())
    return max(ratios)


def test_blended_tiles_leave_no_seams_where_naive_tiles_do(model):
    """A smooth image in 64-px tiles: blended (16 px overlap) vs abutting (no overlap, the naive tiling)."""
    x, maps = _smooth(128, 128), _field_maps()
    whole = model.restore(x, maps)
    blended = tiled_restore(model, x, maps, tile=64, overlap=16)
    naive = tiled_restore(model, x, maps, tile=64, overlap=0)
    edges_blended = sorted({2 * e for s, size, _, _ in axis_tiles(64, 32, 8) for e in (s, s + size)} - {0, 128})
    assert edges_blended == [32, 64, 96]
    ratio_blended, ratio_naive = _seam_ratio(blended, edges_blended), _seam_ratio(naive, [64])
    ratio_whole = _seam_ratio(whole, edges_blended)                      # the same rows/columns, no tiling
    print(f"seam ratios: blended {ratio_blended:.2f}, naive {ratio_naive:.1f}, untiled {ratio_whole:.2f}")
    assert ratio_blended < 1.6 and ratio_naive > 10                     # measured: 1.00 and 19.0
    # Tiles see less context (GroupNorm statistics, attention) than the whole image: at 64 px the
    # blended result is 0.04 (mean abs) from the untiled one, at 96 px 0.012; a misplaced tile is far more.
    larger = tiled_restore(model, x, maps, tile=96, overlap=32)
    assert (larger - whole).abs().mean() < 0.025


# ---------------------------------------------------------------------------------------------
# colour correction
# ---------------------------------------------------------------------------------------------


def test_color_correction():
    rng = np.random.default_rng(0)
    reference = np.clip(_to_np(_smooth(96, 96)), 0, 1)
    detail = 0.05 * np.sign(rng.standard_normal((96, 96, 1)))              # fine texture, all channels
    restored = np.clip(reference * 0.7 + np.array([0.15, -0.05, 0.1]) + detail, 0, 1)
    assert color_correct(restored, reference, "none") == pytest.approx(restored)
    matched = color_correct(restored, reference, "meanstd")
    np.testing.assert_allclose(matched.mean(axis=(0, 1)), reference.mean(axis=(0, 1)), atol=2e-3)
    np.testing.assert_allclose(matched.std(axis=(0, 1)), reference.std(axis=(0, 1)), atol=2e-3)
    low = color_correct(restored, reference, "lowpass")
    core = (slice(24, -24), slice(24, -24))
    # the colour cast is gone and the texture kept: what is left is the texture (plus a little leakage)
    assert np.abs((low - reference - detail)[core]).mean() < 0.01 < np.abs((restored - reference - detail)[core]).mean()
    with pytest.raises(ConfigError, match="meanstd"):
        color_correct(restored, reference, "wavelet")
    with pytest.raises(ConfigError, match="resolve_color_correction"):
        color_correct(restored, reference, "auto")


def test_auto_color_correction_follows_the_models_anchor(model, tmp_path):
    """``auto`` is lowpass for a model without a colour anchor and none for one with it; the
    command writes the anchored model's own output and records the resolved choice."""
    anchored = DMDiff(DMDiffConfig(anchor_sigma_px=12.0))
    anchored.load_trainable_state_dict(model.trainable_state_dict())
    assert resolve_color_correction("auto", model) == "lowpass"
    assert resolve_color_correction("auto", anchored) == "none"
    assert resolve_color_correction("meanstd", anchored) == "meanstd"
    with pytest.raises(ConfigError, match="auto"):
        resolve_color_correction("wavelet", model)
    pipe = DMDiffPipeline.from_model(anchored).save_pretrained(tmp_path / "anchored")
    photo = tmp_path / "shot.png"
    rgb = np.clip(_to_np(_smooth(48, 64)), 0, 1)
    Image.fromarray(_u8(rgb)).save(photo)
    assert cli(["restore", "--model", str(pipe), "--input", str(photo), "--out", str(tmp_path / "out"),
                "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["color_correct"] == "none"
    own = _u8(_to_np(anchored.restore(torch.from_numpy(read_image(photo).transpose(2, 0, 1))[None])))
    written = np.asarray(Image.open(tmp_path / "out" / "shot.png")).astype(int)
    assert np.abs(written - own).max() <= 1          # same weights, reloaded, no correction on top


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folder_of_mixed_images_continues_after_bad_files(pipeline_dir, model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = noisy_photo(40, 56)
    Image.fromarray(_u8(rgb)).save(photos / "a_rgb.png")
    Image.fromarray(_u8(rgb[..., 1])).save(photos / "b_gray.png")
    rgba = np.dstack([_u8(rgb), np.full((40, 56), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(photos / "c_rgba.png")
    Image.fromarray(_u8(rgb)).convert("P", palette=Image.ADAPTIVE).save(photos / "d_palette.png")
    write_png(photos / "e_16bit.png", rgb, bits=16)
    good = (photos / "a_rgb.png").read_bytes()
    (photos / "f_truncated.png").write_bytes(good[: len(good) // 2])
    nan = rgb.astype(np.float32)
    nan[5, 5] = np.nan
    tifffile.imwrite(photos / "g_nan.tif", nan, photometric="rgb")
    Image.fromarray(_u8(rgb[:5, :5])).save(photos / "h_tiny.png")
    (photos / "notes.txt").write_text("not an image")
    before = _digest(photos)
    out = tmp_path / "out"

    code = cli(["restore", "--model", str(pipeline_dir), "--input", str(photos), "--out", str(out),
                "--alpha", "0.8", "--color-correct", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 image(s) failed" in err and "f_truncated.png" in err and "g_nan.tif" in err and "h_tiny.png" in err
    assert "NaN" in err and "SVDA grid" in err
    assert _digest(photos) == before                                     # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_palette.png", "e_16bit.png", REPORT_FILE])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["alpha"] == 0.8 and report["tile"] == 256 and report["overlap"] == 32 and report["failed"] == 3
    assert report["color_correct"] == "none"
    status = {e["input"].rsplit("/", 1)[-1]: e["status"] for e in report["files"]}
    assert [n for n, s in status.items() if s == "failed"] == ["f_truncated.png", "g_nan.tif", "h_tiny.png"]
    assert all(e["seconds"] >= 0 for e in report["files"]) and "notes.txt" not in status
    # each output is the model's restoration of what read_image makes of the input (8-bit)
    for name in ("a_rgb", "b_gray", "c_rgba", "d_palette", "e_16bit"):
        source = next(photos.glob(f"{name}.*"))
        x = torch.from_numpy(read_image(source).transpose(2, 0, 1))[None]
        expected = _u8(_to_np(model.restore(x, alpha=0.8)))
        written = np.asarray(Image.open(out / f"{name}.png"))
        assert written.shape == (40, 56, 3) and written.dtype == np.uint8
        assert np.abs(written.astype(int) - expected).max() <= 1, name    # same weights, reloaded
    gray = np.asarray(Image.open(out / "b_gray.png")).astype(float)
    assert np.abs(gray - _u8(rgb)).mean() > 1                             # restored, not copied


def test_big_image_16_bit_output_and_colour_correction(pipeline_dir, model, tmp_path):
    image = noisy_photo(96, 200, seed=4)
    source = tmp_path / "wide.png"
    write_png(source, image, bits=16)
    out = tmp_path / "out"
    assert cli(["restore", "--model", str(pipeline_dir), "--input", str(source), "--out", str(out),
                "--tile", "64", "--overlap", "16", "--bits", "16", "--color-correct", "none", "--no-progress"]) == 0
    width, height, _, info = png.Reader(filename=str(out / "wide.png")).read()
    assert (width, height, info["bitdepth"]) == (200, 96, 16)
    restored = read_image(out / "wide.png")
    x = torch.from_numpy(read_image(source).transpose(2, 0, 1))[None]
    expected = _to_np(tiled_restore(model, x, tile=64, overlap=16))
    assert np.abs(restored - expected).max() < 2e-4                       # 16-bit rounding and reload
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["files"][0]["tiles"] == len(tile_windows(48, 100, 32, 8)) > 1 and report["files"][0]["maps"] is None

    corrected = tmp_path / "corrected"
    assert cli(["restore", "--model", str(pipeline_dir), "--input", str(source), "--out", str(corrected),
                "--tile", "64", "--overlap", "16", "--color-correct", "meanstd", "--no-progress"]) == 0
    fixed = read_image(corrected / "wide.png")
    np.testing.assert_allclose(fixed.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=3e-3)
    assert np.abs(fixed.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() < \
        np.abs(restored.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max()


def test_maps_auto_none_and_file(pipeline_dir, model, tmp_path):
    data = tmp_path / "data"
    (data / "lr_test").mkdir(parents=True)
    (data / "maps").mkdir()
    image = noisy_photo(48, 48, seed=5)
    Image.fromarray(_u8(image)).save(data / "lr_test" / "scene.png")
    maps = _field_maps(grid=7)[0].numpy()
    np.save(data / "maps" / "scene.npy", maps)
    np.save(tmp_path / "other.npy", maps * 2)                               # a blurrier, noisier lens
    x = torch.from_numpy(read_image(data / "lr_test" / "scene.png").transpose(2, 0, 1))[None]
    results = {}
    for option in ("auto", "none", str(tmp_path / "other.npy")):
        out = tmp_path / f"out-{len(results)}"
        assert cli(["restore", "--model", str(pipeline_dir), "--input", str(data / "lr_test"), "--out", str(out),
                    "--maps", option, "--color-correct", "none", "--bits", "16", "--no-progress"]) == 0
        results[option] = read_image(out / "scene.png").astype(np.float64)
        used = json.loads((out / REPORT_FILE).read_text())["files"][0]["maps"]
        assert used == {"auto": str(data / "maps" / "scene.npy"), "none": None}.get(option, option)
    one_level = 1 / 65535
    with_maps = _to_np(model.restore(x, torch.from_numpy(maps)[None]))
    assert np.abs(results["auto"] - with_maps).max() <= one_level
    assert np.abs(results["none"] - _to_np(model.restore(x))).max() <= one_level
    # the maps matter (16-bit outputs: the shipped t = 250 backbone damps the modulation's effect)
    assert np.abs(results["auto"] - results["none"]).max() > 20 * one_level
    assert np.abs(results["auto"] - results[str(tmp_path / "other.npy")]).max() > 20 * one_level
    np.save(tmp_path / "bad.npy", np.zeros((3, 7, 7), np.float32))
    with pytest.raises(DmdiffError, match=r"shape \(7, G, G\)"):
        from dmdiff.restore import restore
        restore(pipeline_dir, data / "lr_test", tmp_path / "never", maps=str(tmp_path / "bad.npy"), progress=False)
    assert not (tmp_path / "never").exists()


def test_refusals_are_clear_and_write_nothing(pipeline_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_u8(noisy_photo(24, 24))).save(photos / "x.png")
    unsafe = tmp_path / "unsafe"
    shutil.copytree(pipeline_dir, unsafe)
    torch.save({"w": torch.zeros(1)}, unsafe / "dmdiff_trainable.bin")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    torch.save({"w": torch.zeros(1)}, bin_only / "diffusion_pytorch_model.bin")
    twins = tmp_path / "twins"
    twins.mkdir()
    Image.fromarray(_u8(noisy_photo(24, 24))).save(twins / "y.png")
    Image.fromarray(_u8(noisy_photo(24, 24))).save(twins / "y.jpg")
    out = str(tmp_path / "out")
    base = ["restore", "--no-progress"]
    cases = [
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", str(photos)], "is the input folder"),
        (["--model", str(pipeline_dir), "--input", str(photos / "x.png"), "--out", str(photos)], "overwrite an input"),
        (["--model", str(unsafe), "--input", str(photos), "--out", out], "safetensors only"),
        (["--model", str(bin_only), "--input", str(photos), "--out", out], "neither a DMDiff pipeline folder"),
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", out, "--alpha", "1.5"], "alpha must be"),
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", out, "--tile", "50"], "tile must be"),
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", out, "--overlap", "200"], "overlap must be"),
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", out, "--workers", "0"], "--workers must be"),
        (["--model", str(pipeline_dir), "--input", str(tmp_path / "missing"), "--out", out], "no such file"),
        (["--model", str(pipeline_dir), "--input", str(twins), "--out", out], "share the name"),
        (["--model", str(pipeline_dir), "--input", str(photos), "--out", out, "--maps", str(tmp_path / "no.npy")],
         "unreadable map file"),
    ]
    before = _digest(photos)
    for args, message in cases:
        assert cli(base + args) == 2, args
        assert message in capsys.readouterr().err, message
    assert _digest(photos) == before
    assert not (tmp_path / "out").exists()
    # a file next to its output folder is fine when the names differ
    Image.fromarray(_u8(noisy_photo(24, 24))).save(tmp_path / "z.jpg")
    assert cli(base + ["--model", str(pipeline_dir), "--input", str(tmp_path / "z.jpg"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "z.png").is_file() and (tmp_path / REPORT_FILE).is_file()


def test_restore_uses_the_models_recommended_alpha_unless_told(pipeline_dir, tmp_path):
    """A pipeline whose α was chosen on the validation split restores at that α by default; an
    explicit --alpha wins; a pipeline without a choice restores at α = 1."""
    from dmdiff.train.alpha import set_recommended_alpha

    chosen = tmp_path / "chosen"
    shutil.copytree(pipeline_dir, chosen)
    set_recommended_alpha(chosen, 0.4, {"alphas": [0.0, 0.4, 1.0], "psnr": [20.0, 20.1, 19.0]})
    assert DMDiffPipeline.from_pretrained(chosen).model.config.recommended_alpha == 0.4
    photos = tmp_path / "in"
    photos.mkdir()
    write_png(photos / "a.png", noisy_photo(32, 48))
    assert restore(chosen, photos, tmp_path / "o1", progress=False)["alpha"] == 0.4
    assert restore(chosen, photos, tmp_path / "o2", alpha=0.9, progress=False)["alpha"] == 0.9
    assert restore(pipeline_dir, photos, tmp_path / "o3", progress=False)["alpha"] == 1.0
    a, b = (read_image(tmp_path / o / "a.png") for o in ("o1", "o3"))
    assert not np.array_equal(a, b)


def test_the_colour_anchor_is_computed_once_per_image_and_reused(model, monkeypatch):
    """Tiles need no anchor of their own (the whole image's is blended in): one anchor per image,
    and one given by the caller (computed ahead in dmdiff restore's reader thread) is not recomputed."""
    anchored = DMDiff(DMDiffConfig(anchor_sigma_px=12.0))
    anchored.load_trainable_state_dict(model.trainable_state_dict())
    x = _smooth(64, 144)
    expected = tiled_restore(anchored, x, tile=64, overlap=16)
    calls = []
    real = anchored.input_anchor
    monkeypatch.setattr(anchored, "input_anchor", lambda image: calls.append(image.shape) or real(image))
    assert torch.equal(tiled_restore(anchored, x, tile=64, overlap=16), expected)
    assert calls == [x.shape]                                   # 3 tiles, one anchor
    given = real(x)
    latents = tiled_latents(anchored, x, tile=64, overlap=16, anchor=given)
    assert len(calls) == 1 and latents.anchor is given
    assert torch.equal(tiled_decode(anchored, latents, 1.0, tile=64, overlap=16), expected)


def test_overlapped_and_sequential_folder_runs_agree(pipeline_dir, tmp_path):
    """The overlapped run (reader and writer threads, one or three compute threads with their own
    copies of the model) writes the same files and report entries as the sequential one, in input
    order, bad files included; a single image is not overlapped."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (h, w) in enumerate([(40, 56), (96, 200), (48, 48), (33, 70)]):
        write_png(photos / f"p{i}.png", noisy_photo(h, w, seed=i))
    (photos / "p1_broken.png").write_bytes((photos / "p0.png").read_bytes()[:50])
    Image.fromarray(_u8(noisy_photo(5, 5))).save(photos / "p2_tiny.png")
    records = {}
    for name, options in {"sequential": dict(sequential=True), "one": dict(workers=1),
                          "three": dict(workers=3)}.items():
        records[name] = restore(pipeline_dir, photos, tmp_path / name, tile=64, overlap=16, threads=1,
                                progress=False, **options)
        assert records[name]["overlapped"] is (name != "sequential") and records[name]["torch_threads"] == 1
        assert records[name]["workers"] == {"sequential": 1, "one": 1, "three": 3}[name]
    for name in ("one", "three"):
        assert _digest(tmp_path / "sequential").keys() == _digest(tmp_path / name).keys()
        for image in (f"p{i}.png" for i in range(4)):
            assert (tmp_path / "sequential" / image).read_bytes() == (tmp_path / name / image).read_bytes()
    strip = {name: [{**{k: v for k, v in e.items() if k != "seconds"},
                     "output": e["output"] and e["output"].rsplit("/", 1)[-1]} for e in r["files"]]
             for name, r in records.items()}
    assert strip["sequential"] == strip["one"] == strip["three"]
    assert [e["input"].rsplit("/", 1)[-1] for e in records["three"]["files"]] == sorted(p.name for p in photos.iterdir())
    assert records["three"]["failed"] == 2 and records["three"]["written"] == records["sequential"]["written"]
    assert [e["tiles"] for e in records["three"]["files"] if e["status"] == "ok"] == [1, 8, 1, 2]
    single = restore(pipeline_dir, photos / "p0.png", tmp_path / "single", progress=False)
    assert single["overlapped"] is False and single["workers"] == 1


def test_a_worker_copy_has_its_own_modules_and_modulation_but_shares_the_weights(pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    other = worker_copy(pipe)
    for (name, a), (_, b) in zip(pipe.model.named_parameters(), other.model.named_parameters(), strict=True):
        assert a is b, name
    assert other.model is not pipe.model and other.model.unet_lora.state is not pipe.model.unet_lora.state
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(other.model.restore(x), pipe.model.restore(x))


def test_default_compute_threads_copy_only_a_small_model_on_a_multi_core_cpu():
    cpu, small, large = torch.device("cpu"), torch.nn.Linear(4, 4), torch.nn.Module()
    large.register_buffer("weights", torch.empty(COPY_MAX_BYTES // 4 + 1, device="meta"))
    with torch_threads(2):
        assert default_workers(cpu, True, small) == 2 and default_workers(cpu, True, large) == 1
        assert default_workers(cpu, False, small) == 1 and default_workers(torch.device("meta"), True, small) == 1
        assert default_threads(cpu, True, 2) == 1 and default_threads(cpu, False, 2) is None
    with torch_threads(1):
        assert default_workers(cpu, True, small) == 1
    with torch_threads(8):
        assert default_threads(cpu, True, 2) == 2 and default_threads(cpu, True, 1) == 4
