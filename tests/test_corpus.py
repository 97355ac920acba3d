"""The pretraining photo corpus (dmdiff.data.corpus) on a fake extracted package tree: which photos,
their licences, the external check set kept apart, multi-scale crops."""

import json

import numpy as np
import pytest

from dmdiff.data import corpus
from dmdiff.errors import DmdiffError
from dmdiff.imageio import write_png


def fake_root(root, lomiri=True):
    """The package layout dmdiff reads, with tiny images."""
    rng = np.random.default_rng(0)
    for name in corpus.PLASMA_PHOTOS:
        folder = root / "usr/share/wallpapers" / name
        (folder / "contents/images").mkdir(parents=True)
        write_png(folder / "contents/images/80x60.png", rng.random((60, 80, 3)))
        write_png(folder / "contents/images/40x30.png", rng.random((30, 40, 3)))
        (folder / "metadata.json").write_text(json.dumps({"KPlugin": {"License": "LGPLv3",
                                                                       "Authors": [{"Name": f"author of {name}"}]}}))
    data = root / "usr/share/doc/opencv-doc/examples/data"
    data.mkdir(parents=True)
    for name in corpus.OPENCV_PHOTOS:
        write_png(data / f"{name}.png", rng.random((64, 64, 3)))
    (root / "usr/share/doc/opencv-doc/copyright").write_text(
        "Format: x\n\nFiles: *\nCopyright: OpenCV\nLicense: Apache-2.0 AND BSD-3-Clause\n")
    if lomiri:
        backgrounds = root / "usr/share/backgrounds"
        backgrounds.mkdir(parents=True)
        stanzas = []
        for k in range(3):
            write_png(backgrounds / f"photo{k}_by_Someone.jpg", rng.random((50, 70, 3)))
            stanzas.append(f"Files: 16.04/photo{k}_by_Someone.jpg\nCopyright: Someone, 2018\nLicense: CC-BY-4.0\n")
        (root / "usr/share/doc/lomiri-wallpapers-16.04").mkdir(parents=True)
        (root / "usr/share/doc/lomiri-wallpapers-16.04/copyright").write_text(
            "Format: x\n\nFiles: warty-final-ubuntu.png\nLicense: CC-BY-SA-3.0\n\n" + "\n".join(stanzas))
    return root


def test_training_photos_with_licences(tmp_path):
    photos = corpus.training_photos(fake_root(tmp_path))
    validation = corpus.validation_photos(tmp_path)
    assert len(photos) + len(validation) == len(corpus.PLASMA_PHOTOS) + len(corpus.OPENCV_PHOTOS)
    assert len({p.name for p in photos}) == len(photos)
    assert sorted(p.name for p in validation) == sorted(corpus.VALIDATION_PHOTOS)
    assert not {p.name for p in photos} & set(corpus.VALIDATION_PHOTOS)      # held out of training
    plasma = [p for p in photos if p.package == "plasma-workspace-wallpapers"]
    assert all(p.path.name == "80x60.png" and p.licence == "LGPLv3" for p in plasma)     # the largest image
    assert {p.licence for p in photos if p.package == "opencv-doc"} == {"Apache-2.0 AND BSD-3-Clause"}
    record = corpus.corpus_record(photos)
    assert set(record["packages"]) == {"plasma-workspace-wallpapers", "opencv-doc"} and record["bundled"]


def test_the_external_set_is_separate(tmp_path):
    root = fake_root(tmp_path)
    external = corpus.external_photos(root)
    assert [p.name for p in external] == [f"external_photo{k}_by_Someone" for k in range(3)]
    assert {p.licence for p in external} == {"CC-BY-4.0"} and external[0].author == "Someone"
    training = {p.path for p in corpus.training_photos(root)}
    assert not training & {p.path for p in external}


def test_missing_packages_say_how_to_get_them(tmp_path):
    with pytest.raises(DmdiffError, match="apt-get install plasma-workspace-wallpapers"):
        corpus.training_photos(tmp_path)
    with pytest.raises(DmdiffError, match="lomiri-wallpapers-16.04"):
        corpus.external_photos(fake_root(tmp_path / "r", lomiri=False))


def test_multiscale_crops_span_the_scales():
    rng = np.random.default_rng(1)
    image = np.zeros((400, 600, 3), np.uint8)
    image[:, 300:] = 255                                    # a vertical edge in the middle
    crops = [corpus.multiscale_crop(image, 32, rng, sensor_px=32) for _ in range(200)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1 for c in crops)
    means = np.array([c.mean() for c in crops])
    assert (means < 0.01).any() and (means > 0.99).any()      # small (1:1) windows on either side
    assert ((means > 0.3) & (means < 0.7)).any()              # whole-scene windows hold both halves
    with pytest.raises(DmdiffError, match="smaller than the 64 px crop"):
        corpus.multiscale_crop(np.zeros((50, 80, 3)), 64, rng)


def test_a_sensor_never_sees_more_than_the_whole_scene():
    """With a 256 px sensor, a 64 px crop of a 512 px photo covers 64 to 128 photo pixels."""
    rng = np.random.default_rng(2)
    ramp = np.broadcast_to(np.linspace(0, 1, 512, dtype=np.float32)[None, :, None], (512, 512, 3)).copy()
    spans = [float(np.ptp(corpus.multiscale_crop(ramp, 64, rng)[32, :, 0])) for _ in range(200)]
    assert max(spans) <= 128 / 511 + 0.01 and min(spans) >= 63 / 511 - 0.01     # window sides in [64, 128]
    assert max(spans) > 0.22 and min(spans) < 0.14                               # both ends are reached


def test_the_pretraining_sampler_draws_corpus_crops(tmp_path):
    from dmdiff.train.pretrain import CropSampler

    photos = corpus.training_photos(fake_root(tmp_path))
    sampler = CropSampler(0, dead_leaves_fraction=0.0, dead_leaves_images=1, dead_leaves_px=32, corpus=photos,
                          sensor_px=64)
    assert set(sampler.corpus) == {p.name for p in photos} and set(sampler.corpus) < set(sampler.names)
    assert all(a.dtype == np.uint8 for a in sampler.corpus.values())
    batch = sampler.batch(16, 24)
    assert batch.shape == (16, 3, 24, 24) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    plain = CropSampler(0, dead_leaves_fraction=0.0, dead_leaves_images=1, dead_leaves_px=32)
    assert not plain.corpus and all(name not in plain.names for name in sampler.corpus)


def test_simulate_external_puts_every_photo_in_the_test_split(tmp_path, psf_cache):
    from dmdiff.data.simulate import simulate_dataset

    root = fake_root(tmp_path / "root")
    out = simulate_dataset(tmp_path / "ext", smoke=True, external=root, cache_dir=psf_cache, progress=False,
                           config={"small_images": "upscale", "crops_per_test_photo": 1})
    meta = json.loads((out / "lens.json").read_text())
    assert meta["source"] == "external" and meta["counts"] == {"train": 0, "val": 0, "test": 3}
    assert [e["licence"] for e in meta["corpus"]["packages"]["lomiri-wallpapers-16.04"]] == ["CC-BY-4.0"] * 3
    with pytest.raises(DmdiffError, match="give one"):
        simulate_dataset(tmp_path / "x", smoke=True, external=root, images=tmp_path, progress=False)
