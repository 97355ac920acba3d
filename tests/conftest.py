"""Shared fixtures: one PSF cache for the whole session, so grids are built once."""

import os

import pytest


@pytest.fixture(scope="session")
def psf_cache(tmp_path_factory):
    """A session-wide PSF cache folder, also exported as $DMDIFF_CACHE for papermill kernels."""
    path = tmp_path_factory.mktemp("psf-cache")
    old = os.environ.get("DMDIFF_CACHE")
    os.environ["DMDIFF_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DMDIFF_CACHE", None)
    else:
        os.environ["DMDIFF_CACHE"] = old
