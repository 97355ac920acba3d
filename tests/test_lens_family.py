"""Lens families: the spec's sensor offset, drawing lenses, family datasets, per-image lenses
downstream (baselines, pseudo pairs), and config files that extend others."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from dmdiff.cli import main as cli
from dmdiff.config import config_layers
from dmdiff.data.dataset import LensGrids, PairedFolderDataset, dataset_central_psf, image_lens_spec, read_lens
from dmdiff.data.family import RANGED_FIELDS, LensFamily, draw_lenses
from dmdiff.data.simulate import simulate_dataset
from dmdiff.errors import ConfigError, DmdiffError
from dmdiff.evaluation.baselines import dataset_varying_blur
from dmdiff.evaluation.family import format_lens_table, format_per_lens, maps_swap, swap_partners
from dmdiff.imageio import read_image
from dmdiff.optics.camera import MetalensCamera
from dmdiff.optics.propagation import LensSpectrum
from dmdiff.optics.spec import MetalensSpec, SpecError
from dmdiff.train.config import load_train_config
from dmdiff.train.pseudo import imitated_lenses, pairs_lens, pairs_lens_record

SMALL = {"image_size_px": 64, "psf_size_px": 15, "grid_size": 3, "wavelengths_per_channel": 2}
FAMILY = {"train_lenses": 2, "held_out_lenses": 2}


@pytest.fixture(scope="module")
def family(psf_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("family") / "data"
    return simulate_dataset(out, seed=0, smoke=True, config={"family": FAMILY, "spec": SMALL}, cache_dir=psf_cache,
                            progress=False)


def test_sensor_offset_defocuses_and_is_validated():
    spec = MetalensSpec(**SMALL)
    assert spec.sensor_distance_m == spec.focal_length_m
    moved = replace(spec, sensor_offset_m=60e-6)
    assert moved.sensor_distance_m == pytest.approx(spec.focal_length_m + 60e-6)
    assert moved.cache_key() != spec.cache_key()
    focused = LensSpectrum(spec, 550e-9, 15, spec.pitch_m).psf()
    defocused = LensSpectrum(moved, 550e-9, 15, spec.pitch_m).psf()
    assert defocused[7, 7] < 0.5 * focused[7, 7]          # the design colour's focus spreads out
    with pytest.raises(SpecError, match="sensor_offset_m"):
        MetalensSpec(sensor_offset_m=0.6e-3)


def test_lenses_are_drawn_in_their_ranges_reproducibly():
    fam = LensFamily(train_lenses=3, held_out_lenses=2)
    base = MetalensSpec(**SMALL)
    lenses = draw_lenses(fam, base, seed=5)
    assert [lens.name for lens in lenses] == [f"lens_{k:02d}" for k in range(5)]
    assert [lens.held_out for lens in lenses] == [False] * 3 + [True] * 2
    for lens in lenses:
        for name in RANGED_FIELDS:
            lo, hi = getattr(fam, name)
            assert lo <= getattr(lens.spec, name) <= hi
        assert lens.spec.image_size_px == base.image_size_px and lens.spec.grid_size == base.grid_size
    assert draw_lenses(fam, base, seed=5) == lenses
    assert draw_lenses(fam, base, seed=6) != lenses
    assert len({lens.spec.cache_key() for lens in lenses}) == 5
    with pytest.raises(ConfigError, match="held_out_lenses"):
        LensFamily(held_out_lenses=0)
    with pytest.raises(ConfigError, match="focal_length_m"):
        LensFamily(focal_length_m=(1.2e-3, 0.9e-3))
    with pytest.raises(ConfigError, match="lens_00.*aperture_diameter_m"):
        draw_lenses(LensFamily(aperture_diameter_m=(0.2, 0.3)), base, seed=0)


def test_family_dataset_records_one_lens_per_image(family):
    meta = read_lens(family)
    assert "spec" not in meta and set(meta["lenses"]) == {"lens_00", "lens_01", "lens_02", "lens_03"}
    held_out = {n for n, lens in meta["lenses"].items() if lens["held_out"]}
    assert held_out == {"lens_02", "lens_03"}
    by_split = {}
    for name, entry in meta["images"].items():
        by_split.setdefault(entry["split"], set()).add(entry["lens"])
        if entry["split"] == "test":
            assert name.endswith(entry["lens"])
    assert by_split["train"] == by_split["val"] == {"lens_00", "lens_01"}      # every training lens, in turn
    assert by_split["test"] == held_out
    # every test crop is captured once by each held-out lens, from the same clean image
    crops = {name[: -len("_lens_02")] for name, e in meta["images"].items() if e["split"] == "test"}
    for crop in crops:
        a, b = (PairedFolderDataset(family, "test")[i] for i in
                [PairedFolderDataset(family, "test").names.index(f"{crop}_{lens}") for lens in sorted(held_out)])
        assert np.array_equal(a["gt"].numpy(), b["gt"].numpy()) and not np.array_equal(a["lr"].numpy(), b["lr"].numpy())
    # the stored maps are the image's own lens's (PSF widths differ between lenses)
    name, entry = next((n, e) for n, e in meta["images"].items() if e["split"] == "train")
    spec = image_lens_spec(meta, name)
    assert spec.to_dict() == meta["lenses"][entry["lens"]]["spec"]
    stored = np.load(family / "maps" / f"{name}.npy")
    assert np.allclose(stored, MetalensCamera(spec, progress=False).maps(tuple(entry["noise"])))
    other = next(n for n, e in meta["images"].items() if e["split"] == "train" and e["lens"] != entry["lens"])
    assert not np.allclose(stored[:6], np.load(family / "maps" / f"{other}.npy")[:6])
    with pytest.raises(DmdiffError, match="no_such_image"):
        image_lens_spec(meta, "no_such_image")
    assert "lens_02 | held out" in format_lens_table(meta)


def test_family_downstream_uses_each_images_lens(family):
    psf, _, reason = dataset_central_psf(family)
    assert psf is None and "lens-family" in reason
    meta = read_lens(family)
    blurs = dataset_varying_blur(family)
    names = {e["lens"]: n for n, e in meta["images"].items()}
    first, second = blurs(names["lens_02"]), blurs(names["lens_03"])
    assert first is not second and blurs(names["lens_02"]) is first
    assert not np.allclose(first.psfs.numpy(), second.psfs.numpy())
    # pseudo pairs imitate one training image's lens each: its maps and its spec
    lens, has_maps, has_targets = imitated_lenses(family, seed=1)
    assert has_maps and has_targets
    train = PairedFolderDataset(family, "train")
    stored = {n: np.load(p) for n, p in zip(train.names, train.map_paths)}
    imitated = set()
    for k in range(12):
        maps, camera, lens_name = lens(f"pseudo_{k}")
        donor = next(n for n, m in stored.items() if np.array_equal(m, maps))
        assert camera.spec == image_lens_spec(meta, donor)
        assert lens_name == meta["images"][donor]["lens"]
        imitated.add(lens_name)
        assert np.array_equal(lens(f"pseudo_{k}")[0], maps)
    assert imitated == {"lens_00", "lens_01"}


def test_per_lens_table_splits_the_frames_by_lens(family):
    meta = read_lens(family)
    test = [n for n, e in meta["images"].items() if e["split"] == "test"]
    metrics = {"labels": {"m": "method m"},
               "per_image": [{"name": n, "methods": {"m": {"psnr": 10.0 if meta["images"][n]["lens"] == "lens_02" else 20.0}}}
                             for n in test]}
    table = format_per_lens(metrics, meta, ["m"])
    assert "| lens_02 | lens_03 |" in table and "| method m | 10.00 | 20.00 |" in table


class MapsEcho:
    """A stand-in pipeline whose output brightens with the maps' mean (none: the capture itself), so
    that what :func:`maps_swap` gives it shows in the PSNR; records the maps it was called with."""

    def __init__(self):
        self.calls, self.grids = [], []
        self.model = self                       # DMDiff.use_capture_lens, recorded

    def use_capture_lens(self, grid):
        self.grids.append(grid)

    def __call__(self, lr, maps, alpha):
        self.calls.append(None if maps is None else maps.clone())
        gain = 1.0 if maps is None else 1.0 + 0.01 * float(maps[:6].mean())
        return type("Out", (), {"images": [(lr.permute(1, 2, 0).numpy() * gain).clip(0, 1)]})()


@pytest.mark.parametrize("split", ["test", "val"])
def test_maps_swap_gives_another_lenses_maps(family, split):
    meta = read_lens(family)
    frames = PairedFolderDataset(family, split)
    partners = swap_partners(frames.names, meta)
    assert set(partners) == set(frames.names)
    for name, partner in partners.items():
        assert meta["images"][partner]["lens"] != meta["images"][name]["lens"]
        if split == "test":                     # the same crop under the other held-out lens
            assert partner[: -len("lens_02")] == name[: -len("lens_02")]
    pipeline = MapsEcho()
    record = maps_swap(pipeline, family, alpha=1.0, split=split, progress=False)
    assert record["split"] == split and record["images"] == len(frames.names)
    stored = {n: np.load(p) for n, p in zip(frames.names, frames.map_paths)}
    first = frames.names[0]
    own, swapped, none = pipeline.calls[:3]
    assert np.array_equal(own.numpy(), stored[first]) and none is None
    assert np.array_equal(swapped.numpy(), stored[record["per_image"][first]["swapped_with"]])
    assert not np.array_equal(own.numpy(), swapped.numpy())
    # the colour anchor always deconvolves with the capture's own lens: only the maps are swapped
    grids = LensGrids.of_dataset(family)
    assert np.array_equal(pipeline.grids[0], grids(first)) and len(pipeline.grids) == len(frames.names)
    assert not np.array_equal(pipeline.grids[0], grids(record["per_image"][first]["swapped_with"]))
    scores = record["per_image"][first]
    assert scores["own"] != scores["swapped"] and record["own"] == pytest.approx(
        np.mean([s["own"] for s in record["per_image"].values()]))


def test_maps_swap_refuses_what_it_cannot_swap(family, tmp_path, capsys):
    with pytest.raises(DmdiffError, match="lens-family"):
        maps_swap(MapsEcho(), tmp_path, split="val", progress=False)
    assert cli(["maps-swap", str(tmp_path), str(tmp_path / "no-model")]) == 2
    assert "dmdiff maps-swap: error:" in capsys.readouterr().err


def test_config_files_extend_others(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: tiny\nsteps: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {anchor_wiener_nsr: null, input_rl_iterations: null}\n")
    cfg = load_train_config(tmp_path / "child.yaml")
    tiny = load_train_config("configs/tiny.yaml")
    assert cfg.steps == 7 and cfg.model.anchor_wiener_nsr is None and tiny.model.anchor_wiener_nsr is not None
    assert cfg.lr == tiny.lr and cfg.model.anchor_sigma_px == tiny.model.anchor_sigma_px
    assert [list(layer) for layer in config_layers(tmp_path / "child.yaml")][1:] == [["steps"], ["model"]]
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_train_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="nowhere"):
        load_train_config(tmp_path / "missing.yaml")
    family = load_train_config("configs/lens-family.yaml")
    assert family.model.anchor_wiener_nsr == tiny.model.anchor_wiener_nsr    # each image's own lens grid
    assert family.recipe.simulate["family"]["held_out_lenses"] == 2
    assert json.dumps(family.recipe.simulate)      # a plain mapping, as dmdiff simulate takes it


def test_pseudo_pairs_record_the_lens_each_imitates(family, tmp_path):
    meta = read_lens(family)
    names = {e["lens"]: n for n, e in meta["images"].items()}
    record = pairs_lens_record(meta, {"pseudo_a": "lens_00", "pseudo_b": "lens_01", "pseudo_c": "lens_00"})
    assert sorted(record["lenses"]) == ["lens_00", "lens_01"]
    grids = LensGrids(record)          # read like a lens.json: each pair the grid of the lens it imitates
    assert np.array_equal(grids("pseudo_b"), LensGrids.of_dataset(family)(names["lens_01"]))
    assert grids("pseudo_a") is grids("pseudo_c")
    single = {"spec": meta["lenses"]["lens_00"]["spec"]}
    assert pairs_lens_record(single, {"pseudo_a": None}) == single and pairs_lens_record(None, {}) is None
    folder = tmp_path / "pseudo"
    folder.mkdir()
    assert pairs_lens(folder) is None                                  # not a pseudo-pair folder
    (folder / "pseudo.json").write_text(json.dumps({"format": "dmdiff-pseudo-pairs", "names": []}))
    with pytest.raises(DmdiffError, match="older dmdiff"):
        pairs_lens(folder)


def test_family_model_anchors_each_capture_with_its_own_lens(family, tmp_path):
    """Trained on a family with the Wiener anchor, each training frame is anchored with its own
    lens's grid; the pipeline stores no lens, refuses to restore without one and restores with
    --lens."""
    import torch

    from dmdiff.model.dmdiff import colour_anchor
    from dmdiff.model.pipeline import CONFIG_FILE, DMDiffPipeline
    from dmdiff.optics.deconvolution import check_psf_grid
    from dmdiff.restore import restore
    from dmdiff.train.data import frame_products
    from dmdiff.train.loop import train

    cfg = load_train_config({"data": str(family), "crop_px": 32, "batch_size": 2, "steps": 2, "lr": 1e-3,
                             "checkpoint_every": 2, "validate_every": 2, "val_images": 2, "val_crop_px": 32,
                             "model": {"anchor_sigma_px": 4.0, "anchor_wiener_nsr": 1e-3}})
    meta, grids = read_lens(family), LensGrids.of_dataset(family)
    train_set = PairedFolderDataset(family, "train")
    first = {}
    for i, name in enumerate(train_set.names):
        first.setdefault(meta["images"][name]["lens"], i)
    (a, b) = sorted(first.values())[:2]
    anchor = frame_products(cfg.model, family)["anchor"]
    for i, other in ((a, b), (b, a)):
        name, x = train_set.names[i], train_set[i]["lr"][None]
        own = colour_anchor(x, cfg.model, torch.from_numpy(check_psf_grid(grids(name))).float())
        wrong = colour_anchor(x, cfg.model, torch.from_numpy(check_psf_grid(grids(train_set.names[other]))).float())
        assert torch.equal(anchor(x, name), own) and not torch.allclose(own, wrong, atol=1e-4)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    assert json.loads((out / "pipeline" / CONFIG_FILE).read_text())["anchor_psf_file"] is None
    assert not (out / "pipeline" / "anchor_psf.safetensors").exists()
    model = DMDiffPipeline.from_pretrained(out / "pipeline").model
    assert model.anchor_psf is None
    with pytest.raises(DmdiffError, match="lens family"):
        model.input_anchor(train_set[a]["lr"][None])
    photos = tmp_path / "photos"                         # the captures outside their dataset: no lens known
    shutil.copytree(family / "lr_test", photos)
    with pytest.raises(ConfigError, match="--lens"):
        restore(out / "pipeline", photos, tmp_path / "no-lens", progress=False)
    assert not (tmp_path / "no-lens").exists()
    report = restore(out / "pipeline", family / "lr_test", tmp_path / "restored", lens=family / "lens.json",
                     progress=False)
    assert report["failed"] == 0
    assert len(list((tmp_path / "restored").glob("*.png"))) == len(meta["splits"]["test"])
    implied = restore(out / "pipeline", family / "lr_test", tmp_path / "implied", progress=False)  # in their dataset
    assert implied["failed"] == 0 and implied["lens"] == str(family / "lens.json")
    for png in (tmp_path / "restored").glob("*.png"):
        assert np.array_equal(read_image(png), read_image(tmp_path / "implied" / png.name)), png.name
