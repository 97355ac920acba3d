"""`dmdiff restore --lens`: optics maps computed from a lens spec file or a dataset's lens.json
(dmdiff.data.lens, dmdiff.restore)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noisy_photo, perturb_trainable  # noqa: E402
from PIL import Image

from dmdiff.cli import main as cli
from dmdiff.config import dump_yaml
from dmdiff.data.dataset import crop_maps
from dmdiff.data.lens import LensFile, LensMaps
from dmdiff.data.simulate import simulate_dataset
from dmdiff.errors import ConfigError
from dmdiff.imageio import read_image, write_png
from dmdiff.model.dmdiff import DMDiff, DMDiffConfig
from dmdiff.model.pipeline import DMDiffPipeline
from dmdiff.optics.camera import MetalensCamera
from dmdiff.optics.sensor import sample_noise_levels, typical_noise_levels
from dmdiff.optics.spec import MetalensSpec
from dmdiff.restore import REPORT_FILE, restore
from test_anchor import lens_like_grid  # noqa: E402

#: Smoke lenses whose PSF grids other tests build too (tests/test_camera.py, tests/test_train.py):
#: the same lens before a 64 px and a 48 px sensor.
SPEC = MetalensSpec(image_size_px=64, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)
SPEC_48 = MetalensSpec(image_size_px=48, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)
ONE_LEVEL = 1 / 65535       # of the 16-bit outputs


@pytest.fixture(scope="module")
def model():
    return perturb_trainable(DMDiff(DMDiffConfig()), seed=5)


@pytest.fixture(scope="module")
def pipeline_dir(model, tmp_path_factory):
    return DMDiffPipeline.from_model(model).save_pretrained(tmp_path_factory.mktemp("restore-lens") / "pipe")


def _save(path, h, w, seed=0):
    write_png(path, noisy_photo(h, w, seed))
    return path


def _restored_with(model, path, maps) -> np.ndarray:
    """The tiny model's restoration (float64 (H, W, 3)) of the image file with the given (7, G, G) maps."""
    x = torch.from_numpy(read_image(path).transpose(2, 0, 1))[None]
    return model.restore(x, torch.from_numpy(np.asarray(maps))[None])[0].permute(1, 2, 0).numpy().astype(np.float64)


def _run(pipeline_dir, source, out, *extra) -> int:
    return cli(["restore", "--model", str(pipeline_dir), "--input", str(source), "--out", str(out),
                "--color-correct", "none", "--bits", "16", "--no-progress", *extra])


def _entries(out) -> dict:
    return {e["input"].rsplit("/", 1)[-1]: e for e in json.loads((out / REPORT_FILE).read_text())["files"]}


def test_the_middle_noise_is_the_median_of_the_simulations_draws():
    draws = np.array([sample_noise_levels(np.random.default_rng(k)) for k in range(4000)])
    shot, read = typical_noise_levels()
    assert abs(np.median(draws[:, 0]) / shot - 1) < 0.1 and abs(np.median(draws[:, 1]) / read - 1) < 0.25
    with pytest.raises(ValueError):
        typical_noise_levels((1e-2, 1e-3))


def test_a_spec_file_gives_the_cameras_maps_scaled_to_each_image(pipeline_dir, model, tmp_path, psf_cache, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _save(photos / "a.png", 64, 64, seed=1)           # the sensor's size
    _save(photos / "b.png", 32, 48, seed=2)           # smaller and not square
    _save(photos / "c.png", 32, 32, seed=3)           # half the sensor's resolution
    noise = [2e-3, 3e-6]
    lens = tmp_path / "lens.yaml"
    lens.write_text(dump_yaml({**SPEC.to_dict(), "noise": noise}))
    out = tmp_path / "out"
    assert _run(pipeline_dir, photos, out, "--lens", str(lens)) == 0
    err = capsys.readouterr().err
    assert err.count("taken as the whole sensor at another resolution") == 1 and "scaled by 0.75" in err
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["maps"] == "lens" and report["lens"] == str(lens)
    assert report["settings"]["lens"] == str(lens.resolve()) and report["settings"]["maps"] == "lens"
    entries = _entries(out)
    record = {"file": str(lens), "lens": None, "cache_key": SPEC.cache_key(), "noise": noise, "noise_assumed": False}
    assert all(e["status"] == "ok" and e["lens"] == record and e["maps"] == str(lens) for e in entries.values())
    assert [entries[f"{n}.png"]["psf_scale"] for n in "abc"] == [1.0, 0.75, 0.5]

    # what the pipeline got: the camera's maps, exactly as given with --maps FILE.npy
    maps = MetalensCamera(SPEC, psf_cache, progress=False).maps(tuple(noise))
    np.save(tmp_path / "a.npy", maps)
    assert _run(pipeline_dir, photos / "a.png", tmp_path / "by-npy", "--maps", str(tmp_path / "a.npy")) == 0
    assert (tmp_path / "by-npy" / "a.png").read_bytes() == (out / "a.png").read_bytes()
    # other sizes: PSF widths (pixels) scaled; the 48 × 32 image is the centred crop of a 48 px sensor
    half = maps.copy()
    half[:6] *= 0.5
    wide = maps.copy()
    wide[:6] *= 0.75
    wide = crop_maps(wide, (48, 48), (8, 0, 32, 48))
    for name, expected in (("c", half), ("b", wide)):
        written = read_image(out / f"{name}.png").astype(np.float64)
        assert np.abs(written - _restored_with(model, photos / f"{name}.png", expected)).max() <= ONE_LEVEL, name
    assert np.abs(read_image(out / "c.png") - _restored_with(model, photos / "c.png", maps)).max() > 5 * ONE_LEVEL

    # --resume skips what the same lens restored, and redoes an image whose lens record changed
    assert _run(pipeline_dir, photos, out, "--lens", str(lens), "--resume") == 0
    assert all(e.get("resumed") for e in _entries(out).values())
    lens.write_text(dump_yaml({**SPEC.to_dict(), "noise": [1e-3, 1e-6]}))
    assert _run(pipeline_dir, photos / "a.png", out, "--lens", str(lens), "--resume") == 0
    assert not _entries(out)["a.png"].get("resumed") and _entries(out)["a.png"]["lens"]["noise"] == [1e-3, 1e-6]


def test_a_datasets_lens_json_gives_each_image_its_lens_and_noise(pipeline_dir, model, tmp_path, psf_cache, capsys):
    lr = tmp_path / "data" / "lr_test"
    lr.mkdir(parents=True)
    _save(lr / "x.png", 64, 64, seed=4)
    _save(lr / "y.png", 48, 48, seed=5)
    _save(lr / "z.png", 48, 48, seed=6)               # not in the lens.json
    family = tmp_path / "data" / "lens.json"
    family.write_text(json.dumps({
        "format": "dmdiff-dataset",
        "lenses": {"big": {"spec": SPEC.to_dict(), "held_out": False},
                   "small": {"spec": SPEC_48.to_dict(), "held_out": True}},
        "images": {"x": {"lens": "big", "noise": [1e-3, 2e-6], "split": "test"},
                   "y": {"lens": "small", "noise": [4e-3, 1e-5], "split": "test"}},
    }))
    out = tmp_path / "out"
    assert _run(pipeline_dir, lr, out, "--lens", str(family)) == 1       # z failed, the others restored
    err = capsys.readouterr().err
    assert "z.png" in err and str(family) in err and "'z'" in err and "not in its images" in err
    entries = _entries(out)
    assert entries["z.png"]["status"] == "failed" and not (out / "z.png").exists()
    cameras = {"big": (SPEC, [1e-3, 2e-6], "x"), "small": (SPEC_48, [4e-3, 1e-5], "y")}
    for lens, (spec, noise, name) in cameras.items():
        entry = entries[f"{name}.png"]
        assert entry["lens"] == {"file": str(family), "lens": lens, "cache_key": spec.cache_key(), "noise": noise,
                                 "noise_assumed": False} and entry["psf_scale"] == 1.0
        maps = MetalensCamera(spec, psf_cache, progress=False).maps(tuple(noise))
        written = read_image(out / f"{name}.png").astype(np.float64)
        assert np.abs(written - _restored_with(model, lr / f"{name}.png", maps)).max() <= ONE_LEVEL, lens

    # a single-lens dataset: its spec for every image, the recorded noise where the image is listed
    single = tmp_path / "single" / "lens.json"
    single.parent.mkdir()
    single.write_text(json.dumps({"spec": SPEC_48.to_dict(), "images": {"y": {"noise": [4e-3, 1e-5]}}}))
    out = tmp_path / "single-out"
    assert _run(pipeline_dir, lr, out, "--lens", str(single)) == 0
    assert "no noise levels for 2 image(s): assumed" in capsys.readouterr().err
    entries = _entries(out)
    assert entries["y.png"]["lens"]["noise"] == [4e-3, 1e-5] and not entries["y.png"]["lens"]["noise_assumed"]
    assert entries["z.png"]["lens"]["noise"] == list(typical_noise_levels()) and entries["z.png"]["lens"]["noise_assumed"]
    assert entries["x.png"]["psf_scale"] == 64 / 48 and entries["x.png"]["lens"]["cache_key"] == SPEC_48.cache_key()


def test_a_simulated_datasets_lens_json_gives_exactly_its_stored_maps(tmp_path, psf_cache):
    """The smoke dataset's lens (SPEC) and recorded noise give bit for bit the maps it stored per image."""
    data = simulate_dataset(tmp_path / "data", smoke=True, config={"dead_leaves_train": 0}, progress=False)
    lens, cameras = LensFile(data / "lens.json"), LensMaps(progress=False)
    stems = [p.stem for p in sorted((data / "maps").glob("*.npy"))]
    assert len(stems) >= 3
    for stem in stems:
        maps, scale = cameras.maps(lens.lens_of(stem), (64, 64))
        assert scale == 1 and np.array_equal(maps, np.load(data / "maps" / f"{stem}.npy")), stem
        assert not lens.lens_of(stem).noise_assumed
    assert cameras.camera(lens.lens_of(stems[0]).spec) is cameras.camera(lens.lens_of(stems[-1]).spec)  # one lens


def test_a_datasets_captures_are_restored_with_its_lens_unless_it_cannot_say(tmp_path, psf_cache, capsys):
    """--maps auto on a dataset's DATA/lr_<split>/ captures: DATA/lens.json gives each its lens, so the
    colour anchor deconvolves with the capture's lens, as with --lens DATA/lens.json, not with the lens
    the model was trained on (here another lens); a lens.json that cannot give every capture its lens
    is passed over with a warning."""
    data = simulate_dataset(tmp_path / "data", smoke=True, config={"dead_leaves_train": 0}, progress=False)
    model = perturb_trainable(DMDiff(DMDiffConfig(svda=False, anchor_sigma_px=4.0, anchor_wiener_nsr=1e-3)), seed=3)
    model.set_anchor_psf(lens_like_grid())                  # trained on another lens: the maps play no part
    pipe = DMDiffPipeline.from_model(model).save_pretrained(tmp_path / "pipe")
    lr, photos = data / "lr_test", tmp_path / "photos"      # the same captures outside the dataset
    shutil.copytree(lr, photos)
    runs = {"auto": lr, "told": lr, "own": photos}
    extra = {"told": ("--lens", str(data / "lens.json"))}
    for name, source in runs.items():
        assert _run(pipe, source, tmp_path / name, *extra.get(name, ())) == 0, name
    auto = json.loads((tmp_path / "auto" / REPORT_FILE).read_text())
    assert auto["lens"] == str(data / "lens.json") and auto["maps"] == "lens"
    names = sorted(p.name for p in lr.glob("*.png"))
    for name in names:
        out = {run: read_image(tmp_path / run / name) for run in runs}
        assert np.array_equal(out["auto"], out["told"]), name
        assert np.abs(out["auto"] - out["own"]).max() > 10 * ONE_LEVEL, name

    lens = json.loads((data / "lens.json").read_text())
    del lens["images"][Path(names[0]).stem]["noise"]       # no longer the simulation's record of every capture
    (data / "lens.json").write_text(json.dumps(lens))
    assert _run(pipe, lr, tmp_path / "unlisted") == 0
    assert "is not used" in capsys.readouterr().err
    assert json.loads((tmp_path / "unlisted" / REPORT_FILE).read_text())["lens"] is None
    for name in names:
        assert np.array_equal(read_image(tmp_path / "unlisted" / name), read_image(tmp_path / "own" / name)), name


def test_bad_lens_files_are_refused_by_name_and_nothing_is_written(pipeline_dir, tmp_path, capsys):
    photo = _save(tmp_path / "p.png", 24, 24)
    good = SPEC.to_dict()
    files = {
        "unreadable.yaml": "image_size_px: [64",
        "broken.json": '{"image_size_px": 64,',
        "list.yaml": "- image_size_px: 64",
        "typo.yaml": dump_yaml({**good, "focal_lenght_m": 1e-3}),
        "even.yaml": dump_yaml({**good, "psf_size_px": 16}),
        "noise.yaml": dump_yaml({**good, "noise": [1e-3]}),
        "number.yaml": "1: 64",
        "family.json": json.dumps({"lenses": {"a": {"spec": good}, "b": {"spec": {**good, "grid_size": 0}}}}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    np.save(tmp_path / "maps.npy", np.ones((7, 3, 3), np.float32))
    out = tmp_path / "out"
    cases = [
        ("missing.yaml", [], "--lens " + str(tmp_path / "missing.yaml") + ": no such file"),
        ("unreadable.yaml", [], "unreadable.yaml: not valid YAML"),
        ("broken.json", [], "broken.json: not valid JSON"),
        ("list.yaml", [], "expected a mapping"),
        ("typo.yaml", [], "typo.yaml: unknown MetalensSpec field(s) ['focal_lenght_m']"),
        ("even.yaml", [], "even.yaml: psf_size_px must be odd"),
        ("noise.yaml", [], "noise.yaml: noise must be [shot, read]"),
        ("number.yaml", [], "number.yaml: field names must be strings, got 1"),
        ("family.json", [], "family.json: lenses.b.spec: grid_size must be in"),
        ("typo.yaml", ["--maps", "none"], "--lens and --maps none both give the optics maps"),
        ("typo.yaml", ["--maps", str(tmp_path / "maps.npy")], "both give the optics maps"),
    ]
    for name, extra, message in cases:
        assert _run(pipeline_dir, photo, out, "--lens", str(tmp_path / name), *extra) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
    assert not out.exists()
    with pytest.raises(ConfigError, match="both give the optics maps"):
        restore(pipeline_dir, photo, out, lens=tmp_path / "even.yaml", maps="none", progress=False)
