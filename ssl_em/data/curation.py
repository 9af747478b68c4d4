"""Curation: flag level-0 tiles that would waste pretraining compute. Nothing is deleted.

Every z-slice is cut into a grid of `tile_size` x `tile_size` tiles (the last row and
column may run past the volume's edge). Each tile gets `TileFlag` bits:

- LOW_INFORMATION: empty resin, blank or nearly uniform, or holding NaN/Inf. Measured as the tile's contrast
  after 4x4 mean pooling (which averages shot noise away but keeps membranes and
  organelles): (p90 - p10) of the pooled tile over the volume's p1..p99 range. Real
  tissue (ISBI ssTEM, FlyEM FIB-SEM, CREMI) scores 0.4-0.9; blank resin with noise 0.01-0.05.
- SATURATED: most pixels at the dtype's min or max (for float data: the volume's).
- PADDING: constant fill (most pixels equal to both their right and lower neighbours, which
  natural EM with its noise almost never is).

Flags come from content only, never from position: an edge tile that runs past the volume
is judged on its in-volume pixels (reflected to fill the tile for the contrast and hash
measures), so a small volume's edges full of tissue reach pretraining like the rest.
- DUPLICATE: the tile's 64-bit dHash is within `dhash_max_distance` bits of an earlier
  kept tile, as in CEM500K. The tile at the same (y, x) position in nearby slices is not
  compared: in a 3D volume it is the natural continuation, not a copy (in FlyEM's 10 nm
  FIB-SEM neighbouring slices are 4 bits apart, slices 160 nm apart 27 bits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ssl_em.data.archive import TileFlag
from ssl_em.data.volume import Volume, VoxelSize


@dataclass(frozen=True)
class Curator:
    """Curation thresholds. Defaults keep nearly all real tissue and flag blank regions.

    tile_size: tile edge in level-0 pixels.
    min_contrast: LOW_INFORMATION below this pooled (p90 - p10) / (volume p99 - p1).
    contrast_pool: mean-pooling factor before measuring contrast (averages noise away).
    saturated_fraction: SATURATED when at least this fraction sits at the min or max.
    flat_fraction: PADDING when at least this fraction equals its right and lower neighbours.
    dhash_max_distance: DUPLICATE at or below this Hamming distance (CEM500K used 12).
    z_continuity: same-position tiles closer in z than this fraction of the tile's
        in-plane extent (in nm) are not compared for duplicates.
    max_reference: the newest kept hashes compared against, bounding memory and time
        on huge volumes (each new tile costs one XOR + popcount per reference).
    """

    tile_size: int = 256
    min_contrast: float = 0.1
    contrast_pool: int = 4
    saturated_fraction: float = 0.5
    flat_fraction: float = 0.5
    dhash_max_distance: int = 12
    z_continuity: float = 0.25
    max_reference: int = 200_000

    def settings(self) -> dict:
        return asdict(self)

    def start(self, shape: tuple[int, int, int], dtype, value_range: tuple[float, float], voxel_size: VoxelSize | None = None) -> "VolumeCuration":
        """Begin curating one volume; `value_range` is its (p1, p99) from `sample_value_range`."""
        return VolumeCuration(self, shape, np.dtype(dtype), value_range, voxel_size)


class VolumeCuration:
    """Curation state for one volume: flags blocks of full-width slices in order.

    The duplicate index lives here, so blocks must be passed once each; any order works
    (the first kept copy of a tile wins).
    """

    def __init__(self, curator: Curator, shape, dtype: np.dtype, value_range, voxel_size: VoxelSize | None) -> None:
        self.c = curator
        self.shape = tuple(int(s) for s in shape)
        t = curator.tile_size
        self.grid_shape = (self.shape[0], math.ceil(self.shape[1] / t), math.ceil(self.shape[2] / t))
        lo, hi = float(value_range[0]), float(value_range[1])
        self.span = max(hi - lo, 1e-12)
        if dtype.kind in "ui":
            self.sat_values = (np.iinfo(dtype).min, np.iinfo(dtype).max)
        elif dtype.kind == "b":
            self.sat_values = (0, 1)
        else:
            self.sat_values = (float(value_range[2]), float(value_range[3])) if len(value_range) > 3 else (lo, hi)
        xy_nm = (voxel_size.y + voxel_size.x) / 2 if voxel_size else 1.0
        z_nm = voxel_size.z if voxel_size else 1.0
        self.z_window = math.ceil(curator.z_continuity * t * xy_nm / z_nm)
        self.index = HashIndex(curator.max_reference)

    def flag(self, block: np.ndarray, z0: int, y0: int) -> np.ndarray:
        """block: (dz, by, X) full-width level-0 slices starting at (z0, y0); y0 a multiple
        of tile_size and by too, unless the block reaches the volume's bottom edge.
        Returns (dz, ceil(by / t), ceil(X / t)) uint8 TileFlag bits."""
        t = self.c.tile_size
        tiles, valid_y, valid_x = _as_tiles(block, t)  # (dz, ty, tx, t, t)
        flags = np.zeros(tiles.shape[:3], np.uint8)
        # A tile holding NaN/Inf carries nothing to learn and would turn a batch's loss NaN
        # (its contrast measure is NaN, which no threshold catches): flagged as such.
        nonfinite = ~np.isfinite(tiles).all(axis=(-2, -1)) if tiles.dtype.kind == "f" else False
        flags[self._low_information(tiles) | nonfinite] |= np.uint8(TileFlag.LOW_INFORMATION)
        flags[self._saturated(tiles, valid_y, valid_x)] |= np.uint8(TileFlag.SATURATED)
        flags[self._padding(tiles, valid_y, valid_x)] |= np.uint8(TileFlag.PADDING)
        hashes = dhash(tiles)
        for i in range(flags.shape[0]):
            candidates = flags[i] == 0
            dup = self.index.add(hashes[i], candidates, z0 + i, y0 // t, self.z_window, self.c.dhash_max_distance)
            flags[i][dup] |= np.uint8(TileFlag.DUPLICATE)
        return flags

    def _low_information(self, tiles: np.ndarray) -> np.ndarray:
        p = self.c.contrast_pool
        n = tiles.shape[-1] // p
        pooled = tiles[..., : n * p, : n * p].reshape(*tiles.shape[:3], n, p, n, p).mean(axis=(4, 6), dtype=np.float32)
        p10, p90 = np.percentile(pooled.reshape(*tiles.shape[:3], -1), (10, 90), axis=-1)
        return (p90 - p10) / self.span < self.c.min_contrast

    def _saturated(self, tiles, valid_y, valid_x) -> np.ndarray:
        at_limit = (tiles == self.sat_values[0]) | (tiles == self.sat_values[1])
        return _valid_mean(at_limit, valid_y, valid_x) >= self.c.saturated_fraction

    def _padding(self, tiles, valid_y, valid_x) -> np.ndarray:
        flat = np.zeros(tiles.shape, bool)
        flat[..., :-1, :-1] = (tiles[..., :-1, :-1] == tiles[..., :-1, 1:]) & (tiles[..., :-1, :-1] == tiles[..., 1:, :-1])
        return _valid_mean(flat, valid_y, valid_x) >= self.c.flat_fraction


def _as_tiles(block: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dz, Y, X) -> (dz, ty, tx, t, t) float32 tiles, edge tiles filled by reflection
    (so a kept edge tile's statistics come from real pixels), and the valid extent in y
    and x of each tile row / column."""
    dz, Y, X = block.shape
    ty, tx = math.ceil(Y / t), math.ceil(X / t)
    b = block.astype(np.float32, copy=False)
    if (ty * t, tx * t) != (Y, X):
        b = np.pad(b, ((0, 0), (0, ty * t - Y), (0, tx * t - X)), mode="reflect" if min(Y, X) > 1 else "edge")
    tiles = b.reshape(dz, ty, t, tx, t).transpose(0, 1, 3, 2, 4)
    valid_y = np.minimum(t, Y - np.arange(ty) * t)
    valid_x = np.minimum(t, X - np.arange(tx) * t)
    return tiles, valid_y, valid_x


def _valid_mean(mask: np.ndarray, valid_y: np.ndarray, valid_x: np.ndarray) -> np.ndarray:
    """Fraction of True over each tile's in-volume pixels. mask: (dz, ty, tx, t, t)."""
    t = mask.shape[-1]
    inside = (np.arange(t)[None, :] < valid_y[:, None])[:, None, :, None] & (np.arange(t)[None, :] < valid_x[:, None])[None, :, None, :]
    return (mask & inside).sum(axis=(-2, -1)) / inside.sum(axis=(-2, -1))


def dhash(tiles: np.ndarray) -> np.ndarray:
    """64-bit difference hash of each tile: area-mean to 8 rows x 9 columns, then one bit
    per horizontal neighbour pair (brighter to the right). tiles: (..., t, t) -> (...) uint64."""
    t = tiles.shape[-1]
    rows = np.linspace(0, t, 9).astype(int)[:-1]
    cols = np.linspace(0, t, 10).astype(int)[:-1]
    # Sums over unequal bins are fine: both neighbours of a pair are compared as means.
    sums = np.add.reduceat(np.add.reduceat(tiles, rows, axis=-2, dtype=np.float64), cols, axis=-1)
    counts = np.diff(np.append(rows, t))[:, None] * np.diff(np.append(cols, t))[None, :]
    means = sums / counts
    bits = (means[..., :, 1:] > means[..., :, :-1]).reshape(*tiles.shape[:-2], 64)
    return np.packbits(bits, axis=-1).view(">u8")[..., 0].astype(np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


class HashIndex:
    """dHashes of kept tiles with their (z, ty, tx), queried by brute-force XOR + popcount.

    Vectorised in numpy: each query slice costs (tiles in the slice) x (references). The
    newest `max_reference` entries are kept, which bounds both on very large volumes.
    """

    def __init__(self, max_reference: int) -> None:
        self.max_reference = max_reference
        self.hashes = np.empty(0, np.uint64)
        self.z = np.empty(0, np.int64)
        self.pos = np.empty((0, 2), np.int64)

    def add(self, hashes: np.ndarray, candidates: np.ndarray, z: int, ty0: int, z_window: int, max_distance: int) -> np.ndarray:
        """Test the candidate tiles of one slice (in row-major order) and add the ones
        that are not duplicates. hashes, candidates: (ty, tx). Returns the duplicate mask."""
        dup = np.zeros(hashes.shape, bool)
        ys, xs = np.nonzero(candidates)
        if ys.size == 0:
            return dup
        h = hashes[ys, xs]
        pos = np.stack([ys + ty0, xs], 1)
        near_old = np.zeros(h.size, bool)
        for start in range(0, self.hashes.size, 8192):  # chunks bound the (n, m) matrix
            ref = slice(start, start + 8192)
            close = popcount(h[:, None] ^ self.hashes[None, ref]) <= max_distance
            same_place = (pos[:, None, :] == self.pos[None, ref, :]).all(-1) & (np.abs(z - self.z[None, ref]) <= z_window)
            near_old |= (close & ~same_place).any(1)
        # Within the slice, a tile is a duplicate of an earlier *kept* tile of the slice.
        close_new = popcount(h[:, None] ^ h[None, :]) <= max_distance
        kept = np.zeros(h.size, bool)
        for i in range(h.size):
            kept[i] = not near_old[i] and not close_new[i, :i][kept[:i]].any()
        dup[ys[~kept], xs[~kept]] = True
        self.hashes = np.concatenate([self.hashes, h[kept]])[-self.max_reference :]
        self.z = np.concatenate([self.z, np.full(kept.sum(), z)])[-self.max_reference :]
        self.pos = np.concatenate([self.pos, pos[kept]])[-self.max_reference :]
        return dup


def sample_value_range(volume: Volume, n_regions: int = 32, region: int = 256, seed: int = 0) -> tuple[float, float, float, float]:
    """(p1, p99, min, max) of `n_regions` random (1, region, region) crops: the reference
    range curation measures contrast against. Reads at most n_regions * region**2 voxels."""
    rng = np.random.default_rng(seed)
    Z, Y, X = volume.shape
    values = []
    for _ in range(n_regions):
        z, y, x = int(rng.integers(Z)), int(rng.integers(max(Y - region, 0) + 1)), int(rng.integers(max(X - region, 0) + 1))
        values.append(volume.read(slice(z, z + 1), slice(y, y + region), slice(x, x + region)).ravel())
    v = np.concatenate(values)
    p1, p99 = np.percentile(v, (1, 99))
    return float(p1), float(p99), float(v.min()), float(v.max())


def curate(volume: Volume, curator: Curator = Curator(), value_range=None) -> np.ndarray:
    """Flags of a whole volume, read one slice at a time: (Z, ceil(Y/t), ceil(X/t)) uint8."""
    value_range = value_range or sample_value_range(volume)
    run = curator.start(volume.shape, volume.dtype, value_range, volume.voxel_size if volume.voxel_size_known else None)
    return np.concatenate([run.flag(volume.read(z), z, 0) for z in range(volume.shape[0])])
