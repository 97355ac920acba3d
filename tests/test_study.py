"""What the study's notebooks share (dmdiff.study), and the pair naming they read (image_source)."""

import pytest
import torch

from dmdiff import study
from dmdiff.data.dataset import (
    DEAD_LEAVES,
    PairedFolderDataset,
    image_source,
    read_lens,
)
from dmdiff.data.sources import TRAIN_PHOTOS
from dmdiff.study import (
    StudyPaths,
    ensure_dataset,
    load_recipe_config,
    prepare,
    use_threads,
)
from dmdiff.train.config import load_train_config
from dmdiff.train.pseudo import bundled_clean_images
from dmdiff.train.recipe import recipe_config_path, smoke_recipe_config


@pytest.fixture(scope="module")
def dataset(psf_cache, tmp_path_factory):
    """A smoke dataset, simulated by ensure_dataset as notebook 01 does."""
    return ensure_dataset(tmp_path_factory.mktemp("study") / "data", seed=0, smoke=True)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_image_source_reads_the_names_of_dmdiff_simulate(dataset):
    images = read_lens(dataset)["images"]        # the simulator's own record of each pair's source
    assert {e["source"] for e in images.values()} >= {"dead_leaves", TRAIN_PHOTOS[0]}
    for name, entry in images.items():
        assert image_source(name) == (DEAD_LEAVES if entry["source"] == "dead_leaves" else entry["source"]), name


def test_image_source_reads_pseudo_pair_names():
    names = [name for name, _ in bundled_clean_images(count=7, size=16, seed=0, dead_leaves_fraction=0.3)]
    assert [image_source(n) for n in names] == [DEAD_LEAVES] * 2 + list(TRAIN_PHOTOS)


@pytest.mark.parametrize("name, source", [
    ("coffee_002", "coffee"), ("grace_hopper_010", "grace_hopper"), ("deadleaves_007", DEAD_LEAVES),
    ("pseudo_hubble_deep_field_001", "hubble_deep_field"), ("pseudo_deadleaves_000", DEAD_LEAVES),
    ("my_deadleaves_003", "my_deadleaves"),      # an --images file that merely has the word in its name
    ("pseudo_a_photo", "a_photo"), ("pseudo_b", "b"),   # pseudo pairs of whole --images files: no index
    ("deadleaves", "deadleaves"), ("_001", "_001"),
])
def test_image_source_examples(name, source):
    assert image_source(name) == source


def test_ensure_dataset_simulates_only_a_missing_dataset(dataset, monkeypatch):
    assert len(PairedFolderDataset(dataset, "train")) and len(PairedFolderDataset(dataset, "test"))
    assert read_lens(dataset)["smoke"] is True and read_lens(dataset)["seed"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("simulated again")

    monkeypatch.setattr(study, "simulate_dataset", refuse)
    assert ensure_dataset(str(dataset), seed=1) == dataset


def test_prepare(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "simulate_dataset", lambda data, **kw: calls.append((data, kw)))
    paths = prepare(tmp_path / "a" / "out")
    assert paths == StudyPaths(tmp_path / "a" / "out", None, None) and paths.out.is_dir() and not calls
    out, data, run = prepare(str(tmp_path / "out"), str(tmp_path / "data"), str(tmp_path / "run"), seed=3, smoke=True)
    assert (out, data, run) == (tmp_path / "out", tmp_path / "data", tmp_path / "run")
    assert calls == [(tmp_path / "data", {"seed": 3, "smoke": True})]
    assert not run.exists()                      # nothing is trained or made there
    prepare(tmp_path / "out", tmp_path / "data", seed=3, smoke=True, simulate=False)
    assert len(calls) == 1


def test_load_recipe_config_is_the_notebooks_recipe(dataset, keep_threads):
    path = recipe_config_path("tiny")
    full = load_train_config(path, data=str(dataset), seed=3, model={"preset": "tiny"})
    assert full.threads                          # the test below needs a config that sets them
    torch.set_num_threads(full.threads + 1)
    cfg = load_recipe_config(path, dataset, seed=3, preset="tiny", smoke=True)
    assert cfg == smoke_recipe_config(full) and cfg.data == str(dataset) and cfg.seed == 3
    assert torch.get_num_threads() == cfg.threads
    assert load_recipe_config(str(path), str(dataset), seed=3) == full


def test_use_threads(keep_threads):
    torch.set_num_threads(2)
    use_threads(0)
    use_threads(None)
    assert torch.get_num_threads() == 2
    use_threads(1)
    assert torch.get_num_threads() == 1
