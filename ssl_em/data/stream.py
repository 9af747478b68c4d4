"""The pretraining tile stream: random 2D tiles (or 3D patches) from every image in an archive.

Speed comes from reading in *blocks*: a block is a chunk-aligned region of several chunks,
decoded once by tensorstore (in C++, several blocks in flight), and cut into
non-overlapping tiles with a little random jitter. Over an epoch each decoded voxel feeds
about one tile, so the stream is fast without re-using the few blocks it holds in memory.
Which blocks, where the tiles sit and the order they leave in are drawn before any pixel is
decoded, so each block's tiles are copied into their batches as soon as it is decoded and
the block is freed at once (none waits for its last tile to leave a shuffle buffer).
Memory is bounded by (blocks in flight + batches being filled), never by the volume.

Randomness is explicit: every (seed, epoch, rank, worker) gets its own generator; the
blocks of each image are permuted once per epoch with (seed, epoch) and dealt out to the
readers (ranks x workers), so different readers see different data and a given seed gives
the same stream.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from ssl_em.data.archive import Archive
from ssl_em.data.heap import keep_freed_memory
from ssl_em.data.normalize import IntensityStats, Normalization
from ssl_em.data.volume import Volume, VoxelSize, check_finite
from ssl_em.errors import UserError, check_at_least


class NoTilesError(UserError):
    """The data cannot provide any tile (too small, or everything flagged by curation)."""


@dataclass
class StreamSource:
    """One image the stream draws from: its pyramid, statistics and curation flags."""

    name: str
    levels: list[Volume]
    voxel_sizes: list[VoxelSize]
    stats: IntensityStats
    curation: np.ndarray | None = None  # (z, ty, tx) TileFlag bits at level 0, or None
    curation_tile: int = 256
    voxel_size_known: bool = True  # False: voxel_sizes are a placeholder, no pixel size to resample from
    origin: str | None = None  # the file it was ingested from (for the export's record of its data)
    fingerprint: str | None = None  # that file's content fingerprint

    @classmethod
    def from_archive(cls, path, threads: int | None = None) -> list["StreamSource"]:
        archive = Archive(path)
        out = []
        for im in archive.images:
            levels = im.levels
            for lv in levels:
                lv.threads = threads
            out.append(cls(im.name, levels, im.voxel_sizes, im.stats, im.curation, im.curation_tile, bool(im.meta.get("voxel_size_known", True)),
                           im.meta.get("source"), im.meta.get("source_fingerprint")))
        return out

    @classmethod
    def from_volume(cls, volume: Volume, sample_slices: int = 8, seed: int = 0) -> "StreamSource":
        """A source read directly (no archive): statistics from a few random slices, no curation."""
        rng = np.random.default_rng(seed)
        zs = rng.choice(volume.shape[0], size=min(sample_slices, volume.shape[0]), replace=False)
        sample = np.concatenate([volume.read(int(z)).ravel() for z in zs])
        # An archive's curation flags such data; a raw volume has none, and NaN/Inf would
        # make every tile's stretch NaN.
        check_finite(sample, f"{volume.path} (slices {sorted(int(z) for z in zs)})")
        return cls(volume.name, [volume], [volume.voxel_size], IntensityStats.compute(sample), voxel_size_known=volume.voxel_size_known, origin=str(volume.path))


@dataclass
class _Plan:
    """How tiles are cut from one source at the requested pixel size."""

    level: int
    src_tile: int  # tile side in level pixels; resampled to the output tile size
    block: tuple[int, int, int]  # block shape in level voxels (z, y, x)
    axes: tuple[int, ...]  # axes normal to the tile plane: 0 -> xy tiles, 1 -> xz, 2 -> yz
    n_blocks: tuple[int, int, int]
    zoom0: tuple[float, float, float]  # level -> level-0 coordinate factors


def plan_source(src: StreamSource, tile: int, depth: int, pixel_size_nm: float | None, block_target: int, isotropy_tol: float) -> _Plan | None:
    """Pick the pyramid level nearest the pixel size and lay out blocks; None if the image is too small."""
    xy = [(v.y + v.x) / 2 for v in src.voxel_sizes]
    if pixel_size_nm:
        # Nearest level in log-space; the rest of the way is resampling.
        level = int(np.argmin([abs(math.log(pixel_size_nm / p)) for p in xy]))
        src_tile = max(1, int(round(tile * pixel_size_nm / xy[level])))
    else:
        level, src_tile = 0, tile
    vol = src.levels[level]
    Z, Y, X = vol.shape
    chunks = getattr(vol, "chunks", (1, 256, 256))
    planar = depth == 1 and src.voxel_sizes[level].is_near_isotropic(isotropy_tol) and min(Z, Y, X) >= src_tile
    axes = (0, 1, 2) if planar else (0,)
    side = _block_side(src_tile, chunks[1], block_target)
    bz = _round_up(src_tile, chunks[0]) if planar else _round_up(depth, chunks[0])
    block = (min(bz, Z), min(side, Y), min(side, X))
    if block[1] < src_tile or block[2] < src_tile or block[0] < depth:
        return None
    n_blocks = tuple(math.ceil(s / b) for s, b in zip((Z, Y, X), block))
    zoom0 = tuple(s0 / s for s0, s in zip(src.levels[0].shape, vol.shape))
    return _Plan(level, src_tile, block, axes, n_blocks, zoom0)


def _block_side(tile: int, chunk: int, target: int) -> int:
    """Chunk-aligned block side near `target` that wastes the fewest decoded pixels.

    n tiles of `tile` px must fit with at least 2 px of jitter each; among such sides up to
    2 x target, the one where n * tile covers the most of the side wins (224 px tiles in
    256 px chunks: 2048 px, 9 tiles, 98% of each row used, instead of 88% at 1024).
    """
    best, best_cov = _round_up(tile, chunk), 0.0
    for side in range(_round_up(tile, chunk), max(2 * target, tile) + 1, chunk):
        n = side // tile
        cov = n * tile / side
        if side - n * tile >= 2 * n and cov > best_cov + 1e-9:
            best, best_cov = side, cov
    return best


def _round_up(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


def worker_share(samples: int, ranks: int, worker: int, workers: int, multiple: int = 1) -> int:
    """Tiles one loader worker of any rank yields per epoch: a whole number of `multiple`s
    (batches).

    Every rank gets the same floor(samples / ranks / multiple) batches, dealt out to its
    workers; a DDP rank with one batch more than another waits forever at the next
    collective, so the remainder is dropped rather than given to some ranks.
    """
    units = samples // ranks // multiple
    base, extra = divmod(units, workers)
    return (base + (worker < extra)) * multiple


class TileDataset(IterableDataset):
    """Streams tiles {"image": (1, T, T) or (1, D, T, T), "source": int} from several sources.

    Tiles keep the sources' dtype (uint8 stays uint8, 4x less to move); normalisation
    happens on the batch, on the device (`EMDataModule.on_after_batch_transfer`).

    Args:
        sources: the images to draw from.
        tile_size: output tile side in pixels.
        samples_per_epoch: tiles per epoch summed over all ranks and workers.
        pixel_size_nm: output pixel size; None keeps each image's level 0 as is.
        depth: 1 for 2D tiles, > 1 for 3D patches of that many z-sections.
        gamma: source weight = (number of voxels) ** gamma; 0 = equal, 1 = proportional.
        block_size: target block side in pixels (chunk-aligned).
        prefetch: blocks in flight while tiles are cut from the current one.
        shuffle_buffer: tiles of consecutive blocks are shuffled together in groups of 2 x this
            many, so neighbours from one block spread out over several batches.
        use_curation: skip tiles whose centre lies in a flagged curation tile.
        isotropy_tolerance: xz/yz tiles only when z spacing is within this fraction of xy.
    """

    def __init__(
        self,
        sources: list[StreamSource],
        tile_size: int = 224,
        samples_per_epoch: int = 10_000,
        pixel_size_nm: float | None = None,
        depth: int = 1,
        gamma: float = 0.5,
        block_size: int = 1024,
        prefetch: int = 4,
        shuffle_buffer: int = 512,
        use_curation: bool = True,
        isotropy_tolerance: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tile_size, self.depth, self.samples_per_epoch = tile_size, depth, samples_per_epoch
        self.prefetch, self.shuffle_buffer, self.seed, self.use_curation = prefetch, shuffle_buffer, seed, use_curation
        self.sources, self.plans = [], []
        #: (image name, why it is not drawn from): nothing is dropped without a reason.
        self.left_out: list[tuple[str, str]] = []
        for src in sources:
            if pixel_size_nm and not src.voxel_size_known:
                self.left_out.append((src.name, f"voxel size unknown, so it cannot be resampled to {pixel_size_nm:g} nm/px (ingest it with --voxel-size)"))
                continue
            plan = plan_source(src, tile_size, depth, pixel_size_nm, block_size, isotropy_tolerance)
            if plan is None:
                (z, y, x), v = src.levels[0].shape, src.voxel_sizes[0]
                self.left_out.append((src.name, f"too small for {tile_size} px tiles at {pixel_size_nm or 'native'} nm/px, depth {depth} "
                                                f"(it is {z} x {y} x {x} voxels of {(v.y + v.x) / 2:g} nm)"))
                continue
            self.sources.append(src)
            self.plans.append(plan)
        if not self.sources:
            why = "; ".join(f"{n}: {r}" for n, r in self.left_out[:3]) + (f"; and {len(self.left_out) - 3} more" if len(self.left_out) > 3 else "")
            raise NoTilesError(f"no image can give {tile_size}px tiles at {pixel_size_nm or 'native'} nm/px (depth {depth}): {why}")
        if use_curation and all(s.curation is not None and not (s.curation == 0).any() for s in self.sources):
            raise NoTilesError("every tile of every image was flagged by curation: nothing is left to train on")
        sizes = np.array([float(np.prod(s.levels[p.level].shape)) for s, p in zip(self.sources, self.plans)])
        self.weights = sizes**gamma / (sizes**gamma).sum()
        self.epoch = 0
        # Batches of the next pass already trained on before a resume (the pass is replayed
        # to there, reading but not assembling them, so the stream continues where it stopped).
        self.skip_batches = 0
        self.rank, self.world_size = 0, 1
        # What this copy of the dataset has read: for benchmarks and coverage checks.
        self.counters = {"blocks": 0, "voxels_decoded": 0, "tiles": 0}

    # -- readers: (rank, worker) ------------------------------------------------------
    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __len__(self) -> int:
        # Per rank, which is what a DataLoader on one rank iterates.
        return self.samples_per_epoch // self.world_size

    def tiles_per_worker(self, worker: int, workers: int, multiple: int = 1) -> int:
        """This rank's loader worker's share of the epoch (see `worker_share`)."""
        return worker_share(self.samples_per_epoch, self.world_size, worker, workers, multiple)

    def __iter__(self):
        """One tile at a time: {"image": (1, [D,] T, T) tensor, "source": int}.

        Tiles are views into batch arrays of 64 that `_assemble` fills (no copy per tile).
        Training uses `batches` instead, which skips the per-tile tensors and the collate.
        """
        for image, source in self._assemble(1, 64, skip=0):
            for k in range(len(source)):
                yield {"image": torch.from_numpy(image[k]), "source": int(source[k])}

    def batches(self, batch_size: int):
        """Ready batches {"image": (B, 1, [D,] T, T), "source": (B,) long}, one copy per tile.

        The same tiles in the same order as iterating the dataset, grouped by B; a reader's
        last tiles that do not fill a batch are dropped (like DataLoader's drop_last).
        After a resume the first `skip_batches` are left out: blocks that only they need are
        not even read. Assembled in numpy (single-threaded), so no torch thread pool spins.
        """
        skip, self.skip_batches = self._my_skip(self.skip_batches), 0
        for image, source in self._assemble(batch_size, batch_size, skip * batch_size):
            yield {"image": torch.from_numpy(image), "source": torch.from_numpy(source)}

    def _my_skip(self, batches: int) -> int:
        """This loader worker's share of the first `batches` batches of a rank: a DataLoader
        takes batches from its workers in turn (batch j from worker j % workers)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return max(0, (batches - worker + workers - 1) // workers)

    def batches_per_pass(self, batch_size: int, workers: int) -> int:
        """Batches one rank's loader yields in one pass (each worker drops its last partial one)."""
        w = max(1, workers)
        return sum(worker_share(self.samples_per_epoch, self.world_size, k, w, batch_size) // batch_size for k in range(w))

    def _assemble(self, multiple: int, size: int, skip: int):
        """This reader's share of one epoch as (image (n, 1, [D,] T, T), source (n,) int64)
        arrays of n = `size` tiles (the last may be shorter), in stream order, leaving out
        the first `skip` tiles (a multiple of `size`).

        The share is a whole number of `multiple`s (the batch size), the same total on every
        rank (`tiles_per_worker`). Every tile's place in the stream is known before its block
        is decoded (`_schedule`), so each block's tiles are copied into their batches as soon
        as it arrives and the block is freed at once: memory is the blocks in flight plus
        the batches of one shuffle group (2 x shuffle_buffer tiles).
        """
        # Blocks and batches are megabytes allocated and freed at a high rate: keep freed
        # memory for reuse instead of faulting it back in page by page (ssl_em.data.heap).
        keep_freed_memory()
        # Each pass is one epoch. Persistent loader workers each hold a copy of the
        # dataset and are iterated once per epoch, so their counters stay in step.
        self.epoch += 1
        reader, readers = self._reader()
        workers = readers // self.world_size
        rng = np.random.default_rng([self.seed, self.epoch, reader])
        decks = [_BlockDeck(p, self.seed, self.epoch, reader, readers) for p in self.plans]
        total = self.tiles_per_worker(reader % workers, workers, multiple)
        schedule = self._schedule(rng, decks, total)
        # Batches being filled: index -> [image, source, tiles still to come].
        filling: dict[int, list] = {}
        inflight: deque = deque()
        nxt = skip // size  # the next batch to yield
        try:
            while nxt * size < total:
                while len(inflight) < max(self.prefetch, 1):
                    step = next(schedule, None)
                    if step is None:
                        break
                    i, origin, axis, tiles, places = step
                    wanted = (places >= skip) & (places < total)  # not skipped, not past the epoch
                    if wanted.any():  # a block none of whose tiles is wanted is not read
                        inflight.append((i, axis, len(tiles), tiles[wanted], places[wanted], self._read_async(i, origin)))
                i, axis, n_cut, tiles, places, fut = inflight.popleft()
                block = np.asarray(fut.result())
                self.counters["blocks"] += 1
                self.counters["voxels_decoded"] += int(block.size)
                self.counters["tiles"] += n_cut
                self._place(i, axis, block, tiles, places, size, total, filling)
                del block
                while nxt in filling and filling[nxt][2] == 0:
                    image, source, _ = filling.pop(nxt)
                    yield image, source
                    nxt += 1
        finally:
            for *_, fut in inflight:  # blocks not needed any more: do not decode them
                fut.cancel()

    def _schedule(self, rng, decks: list["_BlockDeck"], total: int):
        """This reader's blocks for one epoch, in reading order, as (source, origin, axis,
        tiles (n, 3) `_cut` corners, places (n,) int64: each tile's position in the stream).

        Drawn from `rng` and the curation flags alone, never from pixels, so it runs ahead of
        the decoding. Shuffling: whole blocks are gathered until they hold 2 x shuffle_buffer
        tiles, and those tiles are permuted over their run of places. (Simulated with 81-tile
        blocks and batches of 64: the most tiles of one block in a batch averages 8.7 at
        shuffle_buffer 512 and 13.0 at 256, against 9.9 and 15.2 for a classic shuffle buffer
        of that size; benchmarks/RESULTS.md, issue 21 session 11.) Places past `total` (part
        of the last group) are not yielded.
        """
        group = 2 * max(self.shuffle_buffer, 1)
        cum_weights = np.cumsum(self.weights)
        start = empty = 0
        while start < total:
            blocks, n = [], 0
            while n < group and start + n < total:
                # The source by weight, and the tile plane where there is a choice (rng.choice
                # costs 4x more: it shows at 81 tiles a block).
                i = min(int(np.searchsorted(cum_weights, rng.random() * cum_weights[-1], side="right")), len(self.sources) - 1)
                origin = decks[i].next()
                axes = self.plans[i].axes
                axis = axes[int(rng.integers(len(axes)))] if len(axes) > 1 else axes[0]
                tiles = self._cut(i, origin, axis, rng)
                empty = 0 if len(tiles) else empty + 1
                if empty > 1000:
                    raise NoTilesError("1000 blocks in a row gave no unflagged tile; curation left too little data")
                if len(tiles):
                    blocks.append((i, origin, axis, tiles))
                    n += len(tiles)
            places = start + rng.permutation(n)
            for i, origin, axis, tiles in blocks:
                yield i, origin, axis, tiles, places[: len(tiles)]
                places = places[len(tiles) :]
            start += n

    # -- blocks -> tiles --------------------------------------------------------------
    def _read_async(self, i: int, origin: tuple[int, int, int]):
        vol = self.sources[i].levels[self.plans[i].level]
        region = tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, self.plans[i].block, vol.shape))
        if hasattr(vol, "read_async"):
            return vol.read_async(*region)
        return _Done(vol.read(*region))

    def _cut(self, i: int, origin, axis: int, rng) -> np.ndarray:
        """(n, 3) int: (plane, row, column) corners of a block's non-overlapping, jittered
        tiles, curated-out ones dropped, in the block turned plane-normal first
        (`np.moveaxis(block, axis, 0)`). From the block's shape, `rng` and the curation
        flags: no pixel is needed.
        """
        plan, src = self.plans[i], self.sources[i]
        t, d = plan.src_tile, self.depth
        vol_shape = src.levels[plan.level].shape
        shape = [min(o + b, s) - o for o, b, s in zip(origin, plan.block, vol_shape)]  # (z, y, x), clipped at the edge
        ax_rows, ax_cols = [a for a in (0, 1, 2) if a != axis]
        n_planes, R, C = shape[axis], shape[ax_rows], shape[ax_cols]
        nr, nc = R // t, C // t
        if nr == 0 or nc == 0 or n_planes < d:
            return np.empty((0, 3), np.int64)
        cell_r, cell_c = R // nr, C // nc
        # A grid of nr x nc cells per plane (every d-th plane for 3D patches); each tile
        # sits at a random offset in its cell, drawn per plane and row / column.
        planes = np.arange(0, n_planes - d + 1, d)
        r0 = np.arange(nr) * cell_r + rng.integers(0, cell_r - t + 1, size=(len(planes), nr))  # (P, nr)
        c0 = np.arange(nc) * cell_c + rng.integers(0, cell_c - t + 1, size=(len(planes), nc))  # (P, nc)
        p = np.repeat(planes, nr * nc)  # tiles in (plane, row, column) order
        r = np.repeat(r0, nc, axis=1).ravel()
        c = np.tile(c0, (1, nr)).ravel()
        if self.use_curation and src.curation is not None:
            centres = np.empty((len(p), 3))
            centres[:, axis] = origin[axis] + p + d / 2
            centres[:, ax_rows] = origin[ax_rows] + r + t / 2
            centres[:, ax_cols] = origin[ax_cols] + c + t / 2
            keep = self._kept(src, plan, centres)
            p, r, c = p[keep], r[keep], c[keep]
        return np.stack([p, r, c], axis=1).astype(np.int64)

    def _place(self, i: int, axis: int, block: np.ndarray, tiles: np.ndarray, places: np.ndarray, size: int, total: int, filling: dict) -> None:
        """Copy a decoded block's tiles ((n, 3) corners) to their places in the batches being
        filled (resampled first when the level's tile side differs), opening batches as needed."""
        t, d = self.plans[i].src_tile, self.depth
        arr = np.moveaxis(block if block.ndim == 3 else block[None], axis, 0)  # (planes, rows, cols)
        if t == self.tile_size:
            views, dtype = (arr[p : p + d, r : r + t, c : c + t] for p, r, c in tiles.tolist()), block.dtype  # each (d, T, T)
        else:  # resampled: integer dtypes come back as they were, floats as float32
            views = self._resample(torch.from_numpy(np.stack([arr[p : p + d, r : r + t, c : c + t] for p, r, c in tiles.tolist()]))).numpy()
            dtype = views.dtype
        shape = (1, self.tile_size, self.tile_size) if d == 1 else (1, d, self.tile_size, self.tile_size)
        for view, b, k in zip(views, (places // size).tolist(), (places % size).tolist()):
            batch = filling.get(b)
            if batch is None:
                n = min(size, total - b * size)
                batch = filling[b] = [np.empty((n, *shape), dtype), np.empty(n, np.int64), n]
            batch[0][k] = view  # (d, T, T) into (1, [D,] T, T): d == 1 fills the channel axis
            batch[1][k] = i
            batch[2] -= 1

    def _kept(self, src: StreamSource, plan: _Plan, centres: np.ndarray) -> np.ndarray:
        """(N,) bool: tile centres (level coords, (N, 3)) that fall in unflagged curation tiles."""
        # Level-0 voxel -> curation cell: z one per section, y and x one per curation tile.
        cell = (centres * np.array(plan.zoom0) // np.array([1, src.curation_tile, src.curation_tile])).astype(np.int64)
        cz, cy, cx = np.clip(cell, 0, np.array(src.curation.shape) - 1).T
        return src.curation[cz, cy, cx] == 0

    def _resample(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, [D,] t, t) -> (N, [D,] T, T), antialiased; integer dtypes are rounded back."""
        dtype = batch.dtype
        x = batch.float()
        flat = x.reshape(-1, 1, *x.shape[-2:])
        out = F.interpolate(flat, size=(self.tile_size, self.tile_size), mode="bilinear", antialias=True, align_corners=False)
        out = out.reshape(*x.shape[:-2], self.tile_size, self.tile_size)
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            out = out.round_().clamp_(info.min, info.max).to(dtype)
        return out


class TileBatches(IterableDataset):
    """A TileDataset as ready batches, for `DataLoader(TileBatches(ds, B), batch_size=None)`.

    Each pass iterates `ds.batches(B)`; a loader worker gets its own copy of `ds`, so the
    per-(rank, worker) decks and the epoch counter work as for single tiles.
    """

    def __init__(self, tiles: TileDataset, batch_size: int) -> None:
        super().__init__()
        self.tiles, self.batch_size = tiles, batch_size

    def __iter__(self):
        return self.tiles.batches(self.batch_size)

    def __len__(self) -> int:
        # Exactly the batches every rank yields (TileDataset.tiles_per_worker).
        return len(self.tiles) // self.batch_size


class _Done:
    """A finished 'future' for readers without asynchronous reads."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value

    def cancel(self) -> bool:
        return False


class _BlockDeck:
    """This reader's share of an image's blocks, in an order fixed by (seed, epoch).

    All readers permute the block grid identically and each takes every readers-th block,
    so readers cover disjoint blocks; the deck reshuffles when it runs out.
    """

    def __init__(self, plan: _Plan, seed: int, epoch: int, reader: int, readers: int) -> None:
        self.plan, self.seed, self.epoch, self.reader, self.readers = plan, seed, epoch, reader, readers
        self.round = 0
        self._deal()

    def _deal(self) -> None:
        n = int(np.prod(self.plan.n_blocks))
        perm = np.random.default_rng([self.seed, self.epoch, self.round, 7]).permutation(n)
        mine = perm[self.reader % n :: self.readers] if n >= self.readers else perm[[self.reader % n]]
        self.queue = deque(int(b) for b in mine)
        self.round += 1

    def next(self) -> tuple[int, int, int]:
        if not self.queue:
            self._deal()
        bz, by, bx = np.unravel_index(self.queue.popleft(), self.plan.n_blocks)
        return tuple(int(b * s) for b, s in zip((bz, by, bx), self.plan.block))


# -- Lightning ------------------------------------------------------------------------
import hashlib  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ssl_em.data.normalize import normalize  # noqa: E402


def open_sources(data: str | list[str], voxel_size=None, threads: int | None = None) -> tuple[list[StreamSource], str]:
    """Sources from an archive path, or from raw volumes (any format open_volume reads).

    Returns the sources and a data fingerprint.
    """
    paths = [data] if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__") else list(data)
    if len(paths) == 1 and Archive.is_archive(paths[0]):
        archive = Archive(paths[0])
        return StreamSource.from_archive(paths[0], threads=threads), archive.fingerprint
    from ssl_em.data.readers.open import open_volume, source_fingerprint

    sources = [StreamSource.from_volume(open_volume(p, voxel_size=voxel_size)) for p in paths]
    for p, s in zip(paths, sources):  # a constant volume stretches to NaN (lo == hi) and teaches nothing
        if s.stats.hi <= s.stats.lo:
            raise UserError(f"{p}: every sampled voxel is {s.stats.lo:g}: a constant volume has nothing to learn from")
    h = hashlib.sha256("".join(source_fingerprint(p) for p in paths).encode()).hexdigest()[:16]
    return sources, h


def pooled_normalization(sources: list[StreamSource], weights: np.ndarray) -> Normalization:
    """Mean and std of the stretched intensities over the sampling mixture, from recorded stats."""
    means, variances = [], []
    for s in sources:
        st = s.stats
        span = max(st.hi - st.lo, 1e-6)
        means.append(float(np.clip((st.mean - st.lo) / span, 0, 1)))
        variances.append(min((st.std / span) ** 2, 0.25))
    m = float(np.dot(weights, means))
    var = float(np.dot(weights, np.array(variances) + np.array(means) ** 2) - m**2)
    return Normalization(mean=m, std=max(math.sqrt(max(var, 0.0)), 1e-3))


class EMDataModule(pl.LightningDataModule):
    """Tiles for pretraining, from an archive (or raw volumes), normalised on the device.

    Train batches reach the LightningModule as {"image": float32 (B, 1, T, T) or
    (B, 1, D, T, T), normalised; "source": (B,) long}.

    Args:
        data: an ssl_em archive (ARCHIVE.zarr) or a list of raw volumes.
        tile_size: tile side in pixels (T).
        pixel_size_nm: resample every image to this pixel size; None = native.
        depth: 1 for 2D tiles; > 1 for 3D patches of D sections.
        batch_size: per device.
        num_workers: loader processes per device.
        samples_per_epoch: tiles per epoch over all devices.
        gamma: source balance; weight = size ** gamma.
        voxel_size: for raw volumes without one ("z,y,x" nm).
        normalization: override the (mean, std) measured from the data's statistics.
        seed: base seed of the stream.
    """

    def __init__(
        self,
        data: str | list[str] = "",
        tile_size: int = 224,
        pixel_size_nm: float | None = None,
        depth: int = 1,
        batch_size: int = 64,
        num_workers: int = 2,
        samples_per_epoch: int = 100_000,
        gamma: float = 0.5,
        use_curation: bool = True,
        block_size: int = 1024,
        shuffle_buffer: int = 512,
        voxel_size: str | None = None,
        normalization: Normalization | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_at_least(1, {"--data.tile_size": tile_size, "--data.batch_size": batch_size, "--data.samples_per_epoch": samples_per_epoch, "--data.depth": depth})
        check_at_least(0, {"--data.num_workers": num_workers})
        self.save_hyperparameters(ignore=["normalization"])
        self.data, self.tile_size, self.pixel_size_nm, self.depth = data, tile_size, pixel_size_nm, depth
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._user_norm = normalization
        self.dataset: TileDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if not self.data:
            raise UserError("--data: no data given: pass --data ARCHIVE.zarr (make one with `ssl-em ingest SRC... --out ARCHIVE.zarr`)")
        hp = self.hparams
        sources, self.fingerprint = open_sources(self.data, voxel_size=hp.voxel_size)
        self.dataset = TileDataset(
            sources, self.tile_size, hp.samples_per_epoch, self.pixel_size_nm, self.depth, hp.gamma,
            hp.block_size, shuffle_buffer=hp.shuffle_buffer, use_curation=hp.use_curation, seed=self.seed,
        )
        if self.trainer is not None:
            self.dataset.rank, self.dataset.world_size = self.trainer.global_rank, self.trainer.world_size
        self.dataset.epoch = getattr(self, "_resume_epoch", 0)
        self.dataset.skip_batches = getattr(self, "_resume_batches", 0)
        if len(self.dataset) < self.batch_size:
            raise NoTilesError(f"batch size {self.batch_size} is larger than the {len(self.dataset)} tiles per epoch per device; lower data.batch_size or raise data.samples_per_epoch")
        self.normalization = self._user_norm or pooled_normalization(self.dataset.sources, self.dataset.weights)
        self._lo = torch.tensor([s.stats.lo for s in self.dataset.sources], dtype=torch.float32)
        self._hi = torch.tensor([s.stats.hi for s in self.dataset.sources], dtype=torch.float32)

    def train_dataloader(self) -> DataLoader:
        # The dataset assembles whole batches (one numpy copy per tile) and the loader does
        # not batch (batch_size=None): per-tile tensors and collate's torch.stack cost CPU
        # per tile, and far more when torch's intra-op threads spin on a busy machine.
        # tensorstore aborts in a fork()ed child, so workers are spawned; they persist so
        # the start-up cost is paid once per run, not once per epoch.
        return DataLoader(
            TileBatches(self.dataset, self.batch_size), batch_size=None, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
            multiprocessing_context="spawn" if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
        )

    def state_dict(self) -> dict:
        # Saved in Lightning checkpoints: a resumed run continues the stream where it stopped,
        # in the same epoch after the batches already trained on, instead of replaying them.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        batches = self._batches if getattr(self, "_batches_epoch", None) == epoch else 0
        if self.dataset is not None and batches >= self.dataset.batches_per_pass(self.batch_size, self.num_workers):
            epoch, batches = epoch + 1, 0  # saved on the epoch's last batch: the next one starts afresh
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume_epoch = int(state.get("epoch", 0))
        self._resume_batches = int(state.get("batches", 0))
        self._batches_epoch, self._batches = self._resume_epoch, self._resume_batches
        if self.dataset is not None:
            self.dataset.epoch, self.dataset.skip_batches = self._resume_epoch, self._resume_batches

    def normalize_batch(self, batch: dict) -> dict:
        """Percentile-stretch each tile with its source's window, then standardise."""
        src = batch["source"]
        lo, hi = self._lo.to(src.device)[src], self._hi.to(src.device)[src]
        return {**batch, "image": normalize(batch["image"], lo, hi, self.normalization)}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:  # batches of this epoch, for state_dict
            epoch = self.trainer.current_epoch
            self._batches = self._batches + 1 if getattr(self, "_batches_epoch", None) == epoch else 1
            self._batches_epoch = epoch
        return self.normalize_batch(batch)
