"""Shared fixtures: one PSF cache for the whole session, so grids are built once."""

import os

import pytest


def pytest_collection_modifyitems(items):
    """Modules holding a test marked ``slow`` first, each module's tests kept together and in order:
    under pytest-xdist (``--dist loadscope`` hands out whole modules) the longest modules then start
    at once instead of last, when the other workers have nothing left to do."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)


@pytest.fixture(scope="session")
def psf_cache(tmp_path_factory):
    """A session-wide PSF cache folder, also exported as $DMDIFF_CACHE for papermill kernels.

    Under pytest-xdist (``make test`` runs ``-n auto``) the workers share one folder beside their
    own temporary folders, so each grid is built once per run, not once per worker (the cache's
    writes are atomic; two workers building the same grid at once both write the same file)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "psf-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("psf-cache")
    old = os.environ.get("DMDIFF_CACHE")
    os.environ["DMDIFF_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DMDIFF_CACHE", None)
    else:
        os.environ["DMDIFF_CACHE"] = old


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tiny networks gain nothing from intra-op threads and lose a lot on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_trainable(model, seed: int = 0, scale: float = 0.02):
    """Add seeded noise to a DMDiff model's trainable weights, as after training, so that LoRA and the
    modulation are not the identity and a failed save/load would show. Returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def noisy_photo(h: int, w: int, seed: int = 0):
    """A test photo: smooth colour ramps and one slow sine plus seeded uniform noise, float64
    ``(h, w, 3)`` in [0, 1]."""
    import numpy as np

    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([0.3 + 0.4 * xx, 0.5 + 0.2 * np.sin(2 * np.pi * yy), 0.6 - 0.3 * xx * yy], axis=-1)
    return np.clip(smooth + 0.15 * np.random.default_rng(seed).random((h, w, 3)) - 0.07, 0, 1)
