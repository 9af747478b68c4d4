"""Shared fixtures: where the real EM lives, and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real EM sits beside the checkout (../shared/data); SSL_EM_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("SSL_EM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; tests that use it skip with a reason where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real EM data not found at {SHARED_DATA} (set SSL_EM_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_small():
    """A small synthetic EM volume with labels (16 x 128 x 128), made once per session."""
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(16, 128, 128), seed=0)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test uses tiny models: on a shared 2-core machine one intra-op thread is many
    times faster than two threads fighting other processes for the cores (10-40x measured)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def em_files(em, tmp_path_factory):
    """The requesting module's `em` volume written as image.tif and semantic.tif."""
    import tifffile

    d = tmp_path_factory.mktemp("em")
    tifffile.imwrite(d / "image.tif", em.image, photometric="minisblack")
    tifffile.imwrite(d / "semantic.tif", em.semantic, photometric="minisblack")
    return d
