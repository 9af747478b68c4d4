"""Curation keeps real tissue and flags blank, saturated, padded and duplicated tiles."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_em.data.archive import TileFlag
from ssl_em.data.curation import Curator, HashIndex, curate, dhash, popcount
from ssl_em.data.volume import ArrayVolume

T = 128


def _flags(image: np.ndarray, **kw) -> np.ndarray:
    return curate(ArrayVolume(image), Curator(tile_size=T, **kw))


@pytest.fixture(scope="module")
def isbi(shared_data) -> np.ndarray:
    """Three real ssTEM slices (3, 512, 512) uint8."""
    from ssl_em.data.readers import open_volume

    return open_volume(shared_data / "isbi2012" / "test").read(slice(0, 3))


def _reference_dhash(tile: np.ndarray) -> int:
    """dHash written out with loops: 8 x 9 area means, bit = right neighbour brighter."""
    t = tile.shape[0]
    rows, cols = np.linspace(0, t, 9).astype(int), np.linspace(0, t, 10).astype(int)
    means = [[tile[rows[r] : rows[r + 1], cols[c] : cols[c + 1]].mean() for c in range(9)] for r in range(8)]
    value = 0
    for r in range(8):
        for c in range(8):
            value = (value << 1) | int(means[r][c + 1] > means[r][c])
    return value


def test_dhash_and_popcount_match_references():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (3, 100, 100)).astype(np.float32)
    assert [int(h) for h in dhash(tiles)] == [_reference_dhash(t) for t in tiles]
    x = rng.integers(0, 2**63, 50, dtype=np.uint64)
    assert [int(c) for c in popcount(x)] == [bin(int(v)).count("1") for v in x]


@pytest.mark.realdata
@pytest.mark.parametrize("spec, tile, voxel", [
    ("isbi2012/test", 256, (50, 4, 4)),
    ("flyem_fibsem_sample1/grayscale_maps", 125, (10, 10, 10)),
    ("bioimageio_crops/cremi_center_crop_32x360x360__zenodo5874741.tif", 120, (40, 4, 4)),
])
def test_real_tissue_is_kept(shared_data, spec, tile, voxel):
    from ssl_em.data.readers import open_volume

    v = open_volume(shared_data / spec, voxel_size=voxel)
    z = slice(0, min(v.shape[0], 40))  # neighbouring slices: continuity must not read as duplication
    sub = ArrayVolume(v.read(z), voxel_size=voxel)
    flags = curate(sub, Curator(tile_size=tile))
    assert (flags == 0).mean() >= 0.95, {f.name: int((flags & f).astype(bool).sum()) for f in TileFlag}


@pytest.mark.realdata
def test_blank_regions_pasted_into_tissue(isbi):
    image = isbi.copy()
    rng = np.random.default_rng(0)
    image[0, :T, :T] = np.clip(200 + rng.normal(0, 6, (T, T)), 0, 255).astype(np.uint8)  # empty resin, noisy
    image[1, T : 2 * T, :T] = 170  # constant fill
    image[2, :T, T : 2 * T] = 255  # saturated
    flags = _flags(image)
    assert flags[0, 0, 0] & TileFlag.LOW_INFORMATION
    assert flags[1, 1, 0] & TileFlag.PADDING and flags[1, 1, 0] & TileFlag.LOW_INFORMATION
    assert flags[2, 0, 1] & TileFlag.SATURATED
    untouched = np.ones(flags.shape, bool)
    untouched[0, 0, 0] = untouched[1, 1, 0] = untouched[2, 0, 1] = False
    assert (flags[untouched] == 0).all()


@pytest.mark.realdata
def test_noisy_copy_of_a_tile_is_a_duplicate(isbi):
    image = isbi[:1].copy()
    rng = np.random.default_rng(1)
    copy = image[0, :T, :T].astype(np.float32) + rng.normal(0, 4, (T, T))
    image[0, 2 * T : 3 * T, T : 2 * T] = np.clip(copy, 0, 255).astype(np.uint8)
    flags = _flags(image)
    assert flags[0, 0, 0] == 0  # the first copy is kept...
    assert flags[0, 2, 1] == TileFlag.DUPLICATE  # ...the later one flagged
    assert (flags == 0).sum() == flags.size - 1


@pytest.mark.realdata
def test_repeated_slice_elsewhere_in_z_is_a_duplicate(isbi):
    # Far apart in z (beyond the continuity window), the same content is a copy.
    stack = np.concatenate([isbi[:1], isbi[1:3], isbi[:1]])
    flags = curate(ArrayVolume(stack, voxel_size=(50, 4, 4)), Curator(tile_size=256, z_continuity=0.01))
    assert (flags[3] == TileFlag.DUPLICATE).all() and (flags[:3] == 0).all()


def test_edge_tiles_and_small_volumes():
    from ssl_em.synthetic import make_volume

    image = make_volume(shape=(1, 300, 300), seed=2).image
    flags = curate(ArrayVolume(image), Curator(tile_size=256))  # edge tiles hold 44 of 256 px, all tissue
    assert (flags == 0).all()  # judged by content, not position
    framed = np.zeros((1, 360, 360), image.dtype)  # the same tissue, with empty (zero) margins
    framed[0, :300, :300] = image[0]
    flags = curate(ArrayVolume(framed), Curator(tile_size=256))
    assert flags[0, 0, 0] == 0 and (flags[0, 1, 1] & TileFlag.PADDING)  # the corner tile is 44 px of tissue in 104
    small = make_volume(shape=(1, 100, 200), seed=2).image  # smaller than one tile: still kept
    assert (curate(ArrayVolume(small), Curator(tile_size=256)) == 0).all()


def test_hash_index_keeps_first_of_a_group():
    index = HashIndex(max_reference=100)
    h = np.array([[0b1111, 0b1110, 2**60]], np.uint64)
    dup = index.add(h, np.ones(h.shape, bool), z=0, ty0=0, z_window=0, max_distance=1)
    assert dup.tolist() == [[False, True, False]]
    # Same position within the window: continuity, not a duplicate; elsewhere: duplicate.
    again = np.array([[0b1111, 0b111 << 20, 0b1111]], np.uint64)
    assert index.add(again, np.ones(again.shape, bool), z=1, ty0=0, z_window=2, max_distance=1).tolist() == [[False, False, True]]


def test_tiles_holding_nan_or_inf_are_flagged():
    """A non-finite tile's contrast is NaN, which no threshold caught: it reached pretraining
    and made the loss NaN."""
    from ssl_em.data.archive import TileFlag
    from ssl_em.synthetic import make_volume

    block = make_volume(shape=(1, 128, 128), seed=0).image.astype(np.float32)
    block[0, 5, 5], block[0, 70, 100] = np.nan, np.inf  # tiles (0, 0) and (1, 1) of 64 px
    flags = Curator(tile_size=64, dhash_max_distance=0).start(block.shape, block.dtype, (0.0, 255.0, 0.0, 255.0)).flag(block, 0, 0)
    low = (flags[0] & TileFlag.LOW_INFORMATION) > 0
    assert low[0, 0] and low[1, 1] and not low[0, 1] and not low[1, 0]
