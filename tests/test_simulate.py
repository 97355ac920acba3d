"""`dmdiff simulate`: layout, split hygiene, reproducibility, atomicity, --images handling, CLI."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmdiff.cli import main as cli_main
from dmdiff.data.dataset import PairedFolderDataset, read_lens
from dmdiff.data.simulate import (
    SimulationConfig,
    SimulationWarning,
    centre_square,
    random_crop,
    resolve_config,
    simulate_dataset,
)
from dmdiff.data.sources import TEST_PHOTOS, TRAIN_PHOTOS, VALIDATION_PHOTOS
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.imageio import read_image, write_png
from dmdiff.optics.spec import MetalensSpec
from dmdiff.outputs import MANIFEST

SMALL = {"image_size_px": 64, "psf_size_px": 15, "grid_size": 3, "wavelengths_per_channel": 2}
FOLDERS = tuple(f"{k}_{s}" for s in ("train", "val", "test") for k in ("gt", "lr", "gt_blur"))


@pytest.fixture(scope="module")
def smoke(psf_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    return simulate_dataset(out, seed=0, smoke=True, cache_dir=psf_cache, progress=False)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_layout_and_alignment(smoke):
    assert sorted(p.name for p in smoke.iterdir()) == sorted(FOLDERS + ("maps", "lens.json", MANIFEST))
    for split in ("train", "val", "test"):
        gt = names(smoke / f"gt_{split}")
        assert gt and gt == names(smoke / f"lr_{split}") == names(smoke / f"gt_blur_{split}")
        for name in gt:
            imgs = [read_image(smoke / f"{kind}_{split}" / name) for kind in ("gt", "lr", "gt_blur")]
            assert all(i.shape == (64, 64, 3) for i in imgs)
            maps = np.load(smoke / "maps" / name.replace(".png", ".npy"), allow_pickle=False)
            assert maps.shape == (7, 3, 3) and maps.dtype == np.float32
    all_names = names(smoke / "gt_train") + names(smoke / "gt_val") + names(smoke / "gt_test")
    assert names(smoke / "maps") == sorted(n.replace(".png", ".npy") for n in all_names)
    meta = read_lens(smoke)
    assert MetalensSpec.from_dict(meta["spec"]) == MetalensSpec(
        image_size_px=64, psf_size_px=15, grid_size=3, wavelengths_per_channel=2)
    assert meta["seed"] == 0 and meta["smoke"] is True
    assert meta["counts"] == {"train": len(TRAIN_PHOTOS) + 2, "val": len(VALIDATION_PHOTOS), "test": len(TEST_PHOTOS)}
    assert {"provenance", "simulation", "camera", "images"} <= set(meta)
    assert meta["provenance"]["seed"] == 0 and meta["provenance"]["versions"]["numpy"]


def test_test_split_only_from_test_photos(smoke):
    test = [n.rsplit("_", 1)[0] for n in names(smoke / "gt_test")]
    train = [n.rsplit("_", 1)[0] for n in names(smoke / "gt_train")]
    assert sorted(set(test)) == sorted(TEST_PHOTOS)
    assert not set(train) & set(TEST_PHOTOS)
    assert {t for t in train if not t.startswith("deadleaves")} == set(TRAIN_PHOTOS)
    assert sum(t.startswith("deadleaves") for t in train) == 2


def test_pairs_are_degraded_and_readable_by_the_dataset(smoke):
    ds = PairedFolderDataset(smoke, "test")
    item = ds[0]
    assert set(item) == {"lr", "gt", "gt_blur", "maps", "name"}
    gt, lr, gb = (item[k].numpy() for k in ("gt", "lr", "gt_blur"))
    assert np.mean((gb - gt) ** 2) < 0.2 * np.mean((lr - gt) ** 2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lens_without_provenance(root: Path) -> dict:
    meta = json.loads((root / "lens.json").read_text())
    meta.pop("provenance")
    return meta


def test_same_seed_gives_identical_bytes(smoke, psf_cache, tmp_path):
    again = simulate_dataset(tmp_path / "again", seed=0, smoke=True, cache_dir=psf_cache, progress=False)
    a, b = _files(smoke), _files(again)
    assert a.keys() == b.keys()
    differing = [k for k in a if k != "lens.json" and a[k] != b[k]]
    assert differing == []
    assert _lens_without_provenance(smoke) == _lens_without_provenance(again)
    other = simulate_dataset(tmp_path / "other", seed=1, smoke=True, cache_dir=psf_cache, progress=False,
                             config={"dead_leaves_train": 0})
    assert (other / "lr_test" / "chelsea_000.png").read_bytes() != a["lr_test/chelsea_000.png"]


def test_refuses_to_overwrite_and_replaces_with_flag(psf_cache, tmp_path):
    cfg = {"dead_leaves_train": 0, "crops_per_test_photo": 0}
    out = simulate_dataset(tmp_path / "d", seed=0, smoke=True, config=cfg, cache_dir=psf_cache, progress=False)
    with pytest.raises(DmdiffError, match="--overwrite"):
        simulate_dataset(out, seed=0, smoke=True, config=cfg, cache_dir=psf_cache, progress=False)
    (out / "gt_train" / "mine.png").write_bytes(b"a file the user put there")
    with pytest.raises(DmdiffError, match="gt_train/mine.png"):   # not the dataset's own: never replaced
        simulate_dataset(out, seed=0, smoke=True, config=cfg, cache_dir=psf_cache, progress=False, overwrite=True)
    assert (out / "gt_train" / "mine.png").read_bytes() == b"a file the user put there"
    (out / "gt_train" / "mine.png").unlink()
    simulate_dataset(out, seed=1, smoke=True, config=cfg, cache_dir=psf_cache, progress=False, overwrite=True)
    assert read_lens(out)["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DmdiffError, match="not a dmdiff dataset folder"):
        simulate_dataset(unrelated, seed=0, smoke=True, cache_dir=psf_cache, progress=False, overwrite=True)
    assert (unrelated / "holiday.jpg").exists()


def test_failure_leaves_nothing_half_written(psf_cache, tmp_path, monkeypatch):
    from dmdiff.optics.camera import MetalensCamera

    calls = []

    def broken(self, image, seed, noise=None):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return original(self, image, seed, noise)

    original = MetalensCamera.capture
    monkeypatch.setattr(MetalensCamera, "capture", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate_dataset(tmp_path / "d", seed=0, smoke=True, cache_dir=psf_cache, progress=False)
    assert list(tmp_path.iterdir()) == []


def _user_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(5):
        write_png(root / f"photo {i}.png", rng.random((80 + 10 * i, 96, 3)))
    Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8)).save(root / "gray_small.jpg")  # upscaled
    write_png(root / "tiny.png", rng.random((8, 9, 3)))  # rejected (< 16 px)
    (root / "notes.png").write_text("not an image")
    good = (root / "photo 0.png").read_bytes()
    (root / "broken.png").write_bytes(good[: len(good) // 2])
    (root / "README.txt").write_text("ignored")
    return root


def test_user_images_split_warnings_and_names(psf_cache, tmp_path):
    folder = _user_folder(tmp_path / "in")
    cfg = {"crops_per_train_photo": 2, "crops_per_test_photo": 1, "test_fraction": 0.3, "spec": SMALL}
    with pytest.warns(SimulationWarning) as record:
        out = simulate_dataset(tmp_path / "out", seed=0, images=folder, config=cfg, cache_dir=psf_cache,
                               progress=False)
    text = " | ".join(str(w.message) for w in record)
    assert "notes.png" in text and "broken.png" in text and "unreadable" in text
    assert "tiny.png" in text and "9×8 px" in text
    assert "gray_small.jpg is 50×40 px" in text and "upscaled" in text
    train, test = names(out / "gt_train"), names(out / "gt_test")
    assert train and test
    stems = {n.rsplit("_", 1)[0] for n in train} | {n.rsplit("_", 1)[0] for n in test}
    assert stems == {"photo_0", "photo_1", "photo_2", "photo_3", "photo_4", "gray_small"}
    assert not {n.rsplit("_", 1)[0] for n in train} & {n.rsplit("_", 1)[0] for n in test}
    assert not any(n.startswith("deadleaves") for n in train)
    assert read_lens(out)["source"] == "images"
    # the split depends on file names only: the same files give the same split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = simulate_dataset(tmp_path / "again", seed=5, images=folder, config=cfg, cache_dir=psf_cache,
                                 progress=False)
    assert names(again / "gt_test") == test


def test_user_images_none_readable(psf_cache, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_text("nope")
    with pytest.raises(DmdiffError, match="none of the 1 image file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate_dataset(tmp_path / "out", images=folder, smoke=True, cache_dir=psf_cache, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DmdiffError, match="no image files"):
        simulate_dataset(tmp_path / "out", images=empty, smoke=True, cache_dir=psf_cache, progress=False)
    with pytest.raises(DmdiffError, match="not a folder"):
        simulate_dataset(tmp_path / "out", images=tmp_path / "missing", smoke=True, cache_dir=psf_cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "in"]


def test_config_loading(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("crops_per_train_photo: 3\nspec:\n  grid_size: 5\n  bands_m: [[6.0e-7, 6.8e-7], "
                    "[5.0e-7, 5.8e-7], [4.2e-7, 4.9e-7]]\n")
    cfg = resolve_config(path)
    assert isinstance(cfg, SimulationConfig)
    assert cfg.crops_per_train_photo == 3 and cfg.spec.grid_size == 5 and cfg.spec.image_size_px == 256
    smoke = resolve_config(path, smoke=True)
    assert smoke.spec.grid_size == 5 and smoke.spec.image_size_px == 64 and smoke.crops_per_train_photo == 3
    path.write_text("crops_per_trian_photo: 3\n")
    with pytest.raises(ConfigError, match="crops_per_trian_photo"):
        resolve_config(path)
    with pytest.raises(DmdiffError, match="grid_size"):
        resolve_config({"spec": {"grid_size": 0}})
    with pytest.raises(ConfigError, match="crop_scale"):
        resolve_config({"crop_scale": [0.5, 2.0]})


def test_cli(psf_cache, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dead_leaves_train: 0\ncrops_per_test_photo: 0\n")
    out = tmp_path / "cli"
    assert cli_main(["simulate", "--out", str(out), "--seed", "2", "--smoke", "--config", str(cfg)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "lens.json").is_file()
    assert cli_main(["simulate", "--out", str(out), "--smoke", "--config", str(cfg)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    cfg.write_text("no_such_key: 1\n")
    assert cli_main(["simulate", "--out", str(tmp_path / "x"), "--smoke", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "Traceback" not in err


def test_crop_helpers():
    img = np.random.default_rng(0).random((90, 120, 3)).astype(np.float32)
    sq = centre_square(img, 45)
    assert sq.shape == (45, 45, 3) and sq.dtype == np.float32
    np.testing.assert_allclose(sq.mean(), img[:, 15:105].mean(), atol=0.01)
    np.testing.assert_array_equal(centre_square(img, 90), img[:, 15:105])
    crop, rec = random_crop(img, 32, np.random.default_rng(1), (0.3, 1.0), hflip=True, vflip=False)
    y, x, side = rec["crop"]
    assert crop.shape == (32, 32, 3) and 32 <= side <= 90 and y + side <= 90 and x + side <= 120
    assert rec["vflip"] is False
