"""`ssl-em ingest SRC... --out ARCHIVE.zarr`: copy sources into one curated OME-Zarr archive.

For each source: open it lazily, copy level 0 pixel-exactly block by block (a block is a
few full-width slices, fewer rows when a plane is huge, so memory stays bounded), flag
curation tiles and sample kept voxels for intensity statistics on the way, then build the
pyramid level by level from the previous level, and mark the image complete last.
Re-running skips images already complete with the same source fingerprint; an image left
incomplete by a crash or Ctrl-C is redone. A bad source is reported in one line and the
others still ingest (exit code 2 if any failed). Sources are only ever read.

Each image is written under a lock (ARCHIVE/.locks/NAME.lock, see `ImageLock`): several
processes may ingest into one archive at once, each writing whole images, and a second
writer of the same source is refused with the pid and host of the first. A killed
process's lock goes with it.

Sharding (`--shard i/N`): N processes given the same sources ingest one archive together,
with nothing but the archive between them (a SLURM array, say). Image names are decided
from the whole source list, the same way in every process, and process i ingests sources
i, i+N, i+2N...: each writes (and, redoing a crashed image, removes) only its own images,
under their locks, so the archive ends as one process would have left it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_em.data.archive import ArchiveWriter, ImageBusyError, TileFlag
from ssl_em.data.curation import Curator, sample_value_range
from ssl_em.data.normalize import IntensityStats
from ssl_em.data.readers.image_stack import split_folder
from ssl_em.data.readers.open import detect_format, open_volume, source_fingerprint, split_spec
from ssl_em.data.volume import Volume, VolumeError, VoxelSize
from ssl_em.errors import UserError

#: Chunks of anisotropic data (and of data whose voxel size is unknown): whole tiles of
#: single sections, the unit the tile stream reads.
ANISOTROPIC_CHUNKS = (1, 256, 256)
#: Chunks of near-isotropic data, which the stream may also cut along xz and yz.
ISOTROPIC_CHUNKS = (32, 128, 128)
#: The pyramid stops before the smaller in-plane side would drop below this.
MIN_LEVEL_SIDE = 64
#: Kept-tile voxels sampled for intensity statistics, per image at most.
STATS_SAMPLE = 1_000_000


@dataclass
class SourceResult:
    """What happened to one source. status: "ingested", "skipped" (already complete) or "failed"."""

    source: str
    status: str
    name: str | None = None
    shape: tuple[int, int, int] | None = None
    dtype: str | None = None
    voxel_size: VoxelSize | None = None
    voxel_size_known: bool = False
    levels: int = 0
    counts: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class IngestSummary:
    archive: Path
    results: list[SourceResult]

    @property
    def failed(self) -> list[SourceResult]:
        return [r for r in self.results if r.status == "failed"]

    def table(self):
        """A rich Table: one row per source; tile counts are level-0 curation tiles."""
        from rich.table import Table

        table = Table(title=f"ssl-em ingest -> {self.archive}")
        for col in ("image", "source", "status", "shape z,y,x", "dtype", "voxel nm z,y,x", "levels", "kept/tiles", "low-info", "saturated", "padding", "duplicate", "s"):
            table.add_column(col, justify="left" if col in ("image", "source", "status", "shape z,y,x", "dtype", "voxel nm z,y,x") else "right")
        for r in self.results:
            c = r.counts
            vs = "-" if r.voxel_size is None else ",".join(f"{v:g}" for v in r.voxel_size.as_tuple()) + ("" if r.voxel_size_known else " ?")
            table.add_row(
                r.name or "-", _short(r.source), "[red]failed[/red]" if r.status == "failed" else r.status,
                ",".join(map(str, r.shape)) if r.shape else "-", r.dtype or "-", vs, str(r.levels or "-"),
                f"{c['kept']}/{c['total']}" if c else "-",
                *(str(c.get(k, "-")) if c else "-" for k in ("low_information", "saturated", "padding", "duplicate")),
                f"{r.seconds:.1f}",
            )
        unknown = any(r.voxel_size is not None and not r.voxel_size_known for r in self.results)
        table.caption = ("voxel size '?': not in the file and not given (--voxel-size); " if unknown else "") + "a tile can carry several flags"
        return table


def ingest(
    sources: list[str | Path],
    out: str | Path,
    voxel_size: VoxelSize | str | None = None,
    tile_size: int = 256,
    chunks: tuple[int, int, int] | None = None,
    workers: int = 2,
    curator: Curator | None = None,
    memory_mb: int = 256,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> IngestSummary:
    """Ingest `sources` into the archive at `out` (created if needed); returns what happened.

    voxel_size: nm, overrides the files' metadata for every source.
    chunks: level-0 chunk shape (z, y, x); default by anisotropy (see ANISOTROPIC_CHUNKS).
    workers: threads decoding source blocks ahead of the writer.
    memory_mb: rough bound on the block size, the memory one source needs.
    shard: (i, N): ingest only sources i, i+N, ... (see the module's docstring).
    """
    index, count = shard
    check_settings(tile_size if curator is None else curator.tile_size, chunks, workers, memory_mb)
    if voxel_size is not None:
        voxel_size = VoxelSize.parse(voxel_size)
    curator = curator or Curator(tile_size=tile_size)
    writer = ArchiveWriter(out)
    expanded = expand_sources(sources)
    # Sharded: names decided from the whole list up front, the same in every shard.
    names = _names(writer, expanded) if count > 1 else None
    results, used_names = [], set()
    try:
        for k, (spec, base) in enumerate(expanded):
            if k % count != index:
                continue
            start = time.perf_counter()
            lock = None
            try:
                volume = open_volume(spec, voxel_size)
                if np.dtype(volume.dtype).kind == "b":
                    raise VolumeError(f"{spec}: a bool (mask) volume; ingest takes grayscale EM images")
                if names is None:
                    name, lock = _claim_name(writer, spec, used_names, base)
                else:  # sharded: the name every shard agreed on, locked against a second writer
                    name = names[k]
                    if isinstance(name, Exception):
                        raise name
                    held = writer.lock(name)
                    held.acquire(_resolved(spec))
                    lock = held
                used_names.add(name)
                result = _ingest_one(writer, spec, volume, name, curator, chunks, workers, memory_mb << 20, progress, voxel_size is not None)
            except (VolumeError, ImageBusyError, OSError, ValueError) as err:
                message = _ingest_error(err, spec, out)
                print(f"ssl-em ingest: error: {message.splitlines()[0]}", file=sys.stderr)  # once, as it happens
                result = SourceResult(str(spec), "failed", error=message)
            finally:
                if lock is not None:
                    lock.release()
            result.seconds = time.perf_counter() - start
            results.append(result)
    finally:  # the images finished since the last listing, after an error too
        writer.close()
    return IngestSummary(Path(out), results)


def _ingest_error(err: BaseException, spec, out) -> str:
    """One line for a failed source, blaming what is at fault: a full or unwritable disk is
    the archive's (named by the file being written), not the source's."""
    import errno

    text = str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in text:
        where = getattr(err, "filename", None) or out
        return f"{where}: no space left on device while ingesting {spec}; free space or choose another --out"
    if isinstance(err, OSError) and err.filename is not None and not str(err.filename).startswith(str(spec)):
        return f"{err.filename}: {err.strerror or type(err).__name__} (while ingesting {spec})"
    return text if text.startswith(str(spec)) or isinstance(err, (VolumeError, ImageBusyError)) else f"{spec}: {err}"


def expand_sources(sources: list[str | Path]) -> list[tuple[str | Path, str | None]]:
    """(spec, archive name or None for the default) per image to ingest. A folder of 2D
    images that differ in size or dtype becomes one 2D image per file, named
    `<folder>-<file>`, and a note says so; every other source passes as is."""
    out: list[tuple[str | Path, str | None]] = []
    for spec in sources:
        try:
            files = split_folder(spec)
        except VolumeError:
            files = None  # an unreadable file: opening the folder reports it
        if files is None:
            out.append((spec, None))
            continue
        sizes = sorted({f"{h}x{w}" for h, w in files.values()})
        print(f"note: {spec}: its {len(files)} images differ in size ({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}); "
              "each is ingested as its own 2D image", file=sys.stderr)
        out += [(str(f), f"{image_name(spec)}-{image_name(f)}") for f in files]
    return out


def check_settings(tile_size: int, chunks, workers: int, memory_mb: int) -> None:
    """UserError naming the flag, before anything is written."""
    if tile_size < 1:
        raise UserError(f"--tile-size {tile_size}: must be a positive number of pixels")
    if chunks is not None and (len(chunks) != 3 or min(chunks) < 1):
        raise UserError(f"--chunks {','.join(map(str, chunks))}: give three positive sizes Z,Y,X, e.g. 1,256,256")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be >= 0")
    if memory_mb < 0:
        raise UserError(f"--memory-mb {memory_mb}: must be >= 0 MiB")


def _is_current(existing: dict | None, fingerprint: str, curator: Curator, volume: Volume, voxel_size_given: bool) -> bool:
    """An image can be skipped when it is complete, from the same source bytes, curated
    with the same settings, and no different voxel size was asked for."""
    if not existing or not existing.get("complete") or existing.get("source_fingerprint") != fingerprint:
        return False
    if existing.get("curation", {}).get("settings") != curator.settings():
        return False
    return not voxel_size_given or existing.get("voxel_size_nm") == list(volume.voxel_size.as_tuple())


def _ingest_one(writer: ArchiveWriter, spec, volume: Volume, name: str, curator: Curator, chunks, workers: int, budget: int, progress: bool, voxel_size_given: bool) -> SourceResult:
    fingerprint = source_fingerprint(spec)
    existing = writer.status(name)
    result = SourceResult(str(spec), "skipped", name, volume.shape, str(np.dtype(volume.dtype)), volume.voxel_size, volume.voxel_size_known)
    if _is_current(existing, fingerprint, curator, volume, voxel_size_given):
        result.levels = len(writer.root[name].attrs["multiscales"][0]["datasets"])
        result.counts = existing["curation"]["counts"]
        result.voxel_size, result.voxel_size_known = VoxelSize(*existing["voxel_size_nm"]), existing["voxel_size_known"]
        return result

    vs = volume.voxel_size
    z_too = volume.near_isotropic
    chunks = tuple(chunks) if chunks else (ISOTROPIC_CHUNKS if z_too else ANISOTROPIC_CHUNKS)
    shapes = pyramid_shapes(volume.shape, z_too)
    factors = [(2**i if z_too else 1, 2**i, 2**i) for i in range(len(shapes))]
    t = curator.tile_size
    meta = {
        "source": _resolved(spec),
        "source_format": detect_format(spec).name,
        "source_fingerprint": fingerprint,
        "shape": list(volume.shape),
        "dtype": str(np.dtype(volume.dtype)),
        "voxel_size_nm": list(vs.as_tuple()),
        "voxel_size_known": volume.voxel_size_known,
    }
    arrays = writer.create_image(
        name, shapes, [VoxelSize(*(v * f for v, f in zip(vs.as_tuple(), fs))) for fs in factors], volume.dtype, chunks,
        (volume.shape[0], math.ceil(volume.shape[1] / t), math.ceil(volume.shape[2] / t)), meta,
    )
    try:
        level0 = _blocks(volume.shape, chunks, t, np.dtype(volume.dtype).itemsize, budget)
        # A pyramid block reads 4 (or 8) source voxels per output voxel.
        later = [_blocks(s, chunks, t, np.dtype(volume.dtype).itemsize * (8 if z_too else 4), budget) for s in shapes[1:]]
        with _progress(name, len(level0) + sum(map(len, later)), progress) as bar:
            flags, stats = _copy_and_curate(writer, name, volume, arrays[0], level0, curator, workers, bar)
            for k in range(1, len(shapes)):
                _downsample_level(arrays[k - 1], arrays[k], later[k - 1], z_too, bar)
    except BaseException:
        writer.remove(name)  # a failed image leaves nothing behind (Ctrl-C included)
        raise
    counts = {"total": int(flags.size), "kept": int((flags == 0).sum())}
    counts.update({f.name.lower(): int(((flags & f) > 0).sum()) for f in TileFlag})
    meta["stats"] = stats.to_dict()
    meta["curation"] = {"tile_size": t, "dhash_max_distance": curator.dhash_max_distance, "counts": counts, "settings": curator.settings()}
    writer.finish(name, meta)
    result.status, result.levels, result.counts = "ingested", len(shapes), counts
    return result


def _copy_and_curate(writer, name, volume: Volume, level0, blocks, curator: Curator, workers: int, bar) -> tuple[np.ndarray, IntensityStats]:
    """Copy level 0, flag tiles and sample kept voxels, one block at a time.
    Returns all flags (z, ty, tx) (small: one byte per tile) and the intensity stats."""
    t = curator.tile_size
    with np.errstate(invalid="ignore"):  # NaN/Inf are refused by name at the first block below
        value_range = sample_value_range(volume)
    run = curator.start(volume.shape, volume.dtype, value_range, volume.voxel_size if volume.voxel_size_known else None)
    flags = np.zeros(run.grid_shape, np.uint8)
    kept, anywhere = VoxelSample(STATS_SAMPLE, seed=0), VoxelSample(STATS_SAMPLE, seed=1)
    lo, hi = np.inf, -np.inf
    read = lambda b: volume.read(slice(b[0], b[1]), slice(b[2], b[3]))  # noqa: E731
    for (z0, z1, y0, y1), block in _prefetch(read, blocks, workers):
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            # NaN/Inf would poison the statistics and every model fed from this image.
            bad = int(np.count_nonzero(~np.isfinite(block)))
            raise VolumeError(f"{volume.path}: {bad} non-finite voxels (NaN/Inf) in z {z0}..{z1 - 1}, y {y0}..{y1 - 1}; "
                              "replace them (e.g. with the background value) before ingest")
        level0[z0:z1, y0:y1, :] = block
        f = run.flag(block, z0, y0)
        flags[z0:z1, y0 // t : y0 // t + f.shape[1]] = f
        kept.add_tiles(block, f == 0, t)
        anywhere.add_tiles(block, np.ones_like(f, bool), t)
        lo, hi = min(lo, block.min()), max(hi, block.max())
        bar.update()
    if lo == hi:
        raise VolumeError(f"{volume.path}: constant volume (every voxel is {lo}); nothing to learn from")
    writer.curation_array(name)[...] = flags
    # An image with every tile flagged still needs statistics to be normalised by.
    stats = IntensityStats.compute(kept.values if kept.values.size else anywhere.values)
    return flags, stats


def _downsample_level(src, dst, blocks, z_too: bool, bar) -> None:
    """Fill pyramid level `dst` with 2x means of level `src`, block by block."""
    fz = 2 if z_too else 1
    for z0, z1, y0, y1 in blocks:
        dst[z0:z1, y0:y1, :] = downsample2(src[z0 * fz : z1 * fz, y0 * 2 : y1 * 2, :], z_too)
        bar.update()


def downsample2(block: np.ndarray, z_too: bool) -> np.ndarray:
    """2x mean in y, x (and z when `z_too`), rounding to the dtype. An odd last row or
    column is averaged on its own (edge replication), so shapes are ceil(n / 2).
    block: (z, y, x) -> (ceil(z/2) or z, ceil(y/2), ceil(x/2))."""
    f = (2 if z_too else 1, 2, 2)
    pad = [(0, (-n) % k) for n, k in zip(block.shape, f)]
    b = np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block
    # Sum the 4 (or 8) strided views one at a time: memory is one output-sized float64
    # array, not a float copy of the whole input block.
    total = np.zeros(tuple(n // k for n, k in zip(b.shape, f)), np.float64)
    for dz in range(f[0]):
        for dy in range(2):
            for dx in range(2):
                total += b[dz :: f[0], dy::2, dx::2]
    mean = total / (f[0] * 4)
    return (np.rint(mean) if block.dtype.kind in "uib" else mean).astype(block.dtype)


def pyramid_shapes(shape: tuple[int, int, int], z_too: bool, min_side: int = MIN_LEVEL_SIDE) -> list[tuple[int, int, int]]:
    """Level shapes: halve y, x (and z when `z_too`) while the smaller in-plane side stays >= min_side."""
    shapes = [tuple(shape)]
    while True:
        z, y, x = shapes[-1]
        nxt = (math.ceil(z / 2) if z_too else z, math.ceil(y / 2), math.ceil(x / 2))
        if min(nxt[1], nxt[2]) < min_side:
            return shapes
        shapes.append(nxt)


def _blocks(shape, chunks, tile: int, itemsize: int, budget: int) -> list[tuple[int, int, int, int]]:
    """(z0, z1, y0, y1) blocks of full-width rows: chunk-deep in z, and as many rows as fit
    the budget, a multiple of both the y chunk and the curation tile (whole planes usually)."""
    Z, Y, X = shape
    dz = min(chunks[0], Z)
    unit = math.lcm(tile, chunks[1])
    # x4: the float copies curation and downsampling make of a block.
    rows = max(unit, (budget // max(1, dz * X * itemsize * 4)) // unit * unit)
    by = Y if rows >= Y else rows
    return [(z, min(z + dz, Z), y, min(y + by, Y)) for z in range(0, Z, dz) for y in range(0, Y, by)]


def _prefetch(fn, items, workers: int):
    """Yield (item, fn(item)) in order, with up to `workers` calls running ahead in threads
    (decoders release the GIL), so memory holds at most workers + 1 results."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()


class VoxelSample:
    """A uniform random sample of voxels from chosen tiles, at most `capacity` of them.

    Each added tile contributes `per_tile` random voxels; every voxel gets a random key
    and the `capacity` smallest keys are kept (bottom-k sampling: uniform over everything
    seen, in bounded memory, whatever the number of blocks)."""

    def __init__(self, capacity: int, per_tile: int = 256, seed: int = 0) -> None:
        self.capacity, self.per_tile = capacity, per_tile
        self.rng = np.random.default_rng(seed)
        self.values = np.empty(0, np.float64)
        self.keys = np.empty(0, np.float64)

    def add_tiles(self, block: np.ndarray, chosen: np.ndarray, tile: int) -> None:
        """block: (dz, by, X); chosen: (dz, ty, tx) bool over the block's tiles."""
        iz, iy, ix = np.nonzero(chosen)
        if iz.size == 0:
            return
        iz, iy, ix = (np.repeat(a, self.per_tile) for a in (iz, iy, ix))
        h = np.minimum(tile, block.shape[1] - iy * tile)  # edge tiles: stay inside the block
        w = np.minimum(tile, block.shape[2] - ix * tile)
        y = iy * tile + (self.rng.random(iy.size) * h).astype(int)
        x = ix * tile + (self.rng.random(ix.size) * w).astype(int)
        self.values = np.concatenate([self.values, block[iz, y, x].astype(np.float64)])
        self.keys = np.concatenate([self.keys, self.rng.random(iz.size)])
        if self.values.size > self.capacity:
            keep = np.argpartition(self.keys, self.capacity)[: self.capacity]
            self.values, self.keys = self.values[keep], self.keys[keep]


def image_name(spec: str | Path) -> str:
    """Archive name from a source's file or folder name: `train-image.h5:/raw` ->
    "train-image-raw". Only letters, digits, '-', '_' and '.' survive."""
    path, inner = split_spec(spec)
    base = path.name
    for suffix in (".zarr", ".n5", ".ome", ".h5", ".hdf5", ".hdf", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".mrc", ".rec"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    if inner and inner.strip("/"):
        base += "-" + inner.strip("/").replace("/", "-")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")
    return name or "image"


def parse_shard(text: str) -> tuple[int, int]:
    """"i/N" -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in 0..N-1")
    return i, n


def _names(writer: ArchiveWriter, sources: list[tuple[str | Path, str | None]]) -> list[str | VolumeError]:
    """Every (source, base name)'s image name, decided in source order from the whole list, so
    every shard agrees on all of them (an error in place of a name that cannot be had)."""
    used: set[str] = set()
    out: list[str | VolumeError] = []
    for spec, base in sources:
        try:
            name = _unique_name(writer, spec, used, base)
            used.add(name)
            out.append(name)
        except VolumeError as e:
            out.append(e)
    return out


def _unique_name(writer: ArchiveWriter, spec, used: set[str], base: str | None = None) -> str:
    """The first of name, name-2, name-3... not taken in this run, nor by another source's
    image, nor being written by another process for another source; name: `base`, or
    `image_name(spec)`."""
    base, source = base or image_name(spec), _resolved(spec)
    for i in range(1, 10_000):
        name = base if i == 1 else f"{base}-{i}"
        existing = writer.status(name)
        holder = writer.lock(name).holder()
        if name not in used and (existing is None or existing.get("source") == source) and (holder is None or holder.get("source") == source):
            return name
    raise VolumeError(f"{spec}: no free image name")


def _claim_name(writer: ArchiveWriter, spec, used: set[str], base: str | None = None):
    """(name, held ImageLock): the image this source goes to, locked against other writers.
    ImageBusyError when another process is writing this very source; a name taken by another
    process for another source in the meantime is passed over."""
    taken = set(used)
    for _ in range(100):
        name = _unique_name(writer, spec, taken, base)
        lock = writer.lock(name)
        try:
            lock.acquire(_resolved(spec))
        except ImageBusyError:
            holder = lock.holder()
            if holder is None or holder.get("source") == _resolved(spec):
                raise
            taken.add(name)
            continue
        # Another process may have finished an image of another source under this name
        # between the check and the lock.
        existing = writer.status(name)
        if existing is not None and existing.get("source") != _resolved(spec):
            lock.release()
            taken.add(name)
            continue
        return name, lock
    raise VolumeError(f"{spec}: no free image name")


def _resolved(spec) -> str:
    path, inner = split_spec(spec)
    return str(path.resolve()) + (f":{inner}" if inner else "")


def _short(source: str) -> str:
    """The last two parts of a source path: enough to recognise it in a table."""
    return str(Path(*Path(source).parts[-2:]))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(name: str, total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="block", leave=False, dynamic_ncols=True)


# -- command line ---------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC", help="files, image folders (a z-stack when all images share one size; "
                        "one 2D image per file otherwise), zarr/N5/OME-Zarr stores, or file.h5:/dataset")
    parser.add_argument("--out", required=True, help="archive to create or extend (ARCHIVE.zarr)")
    parser.add_argument("--voxel-size", default=None, help="Z,Y,X in nm (or one number), overriding the files' metadata")
    parser.add_argument("--tile-size", type=int, default=256, help="curation tile edge in pixels (default 256)")
    parser.add_argument("--chunks", default=None, help="level-0 chunks Z,Y,X (default 1,256,256 anisotropic, 32,128,128 isotropic)")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding sources ahead of the writer (default 2)")
    parser.add_argument("--memory-mb", type=int, default=256, help="rough bound on the memory of one block (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--shard", default="0/1", metavar="i/N", help="ingest sources i, i+N, ... of the list: N processes share one archive (default 0/1)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else None
    except ValueError:
        raise UserError(f"--chunks {args.chunks}: give three positive sizes Z,Y,X, e.g. 1,256,256") from None
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise UserError(str(e)) from None
    start = time.perf_counter()
    summary = ingest(args.sources, args.out, voxel_size=args.voxel_size, tile_size=args.tile_size, chunks=chunks,
                     workers=args.workers, memory_mb=args.memory_mb, progress=not args.quiet, shard=shard)
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs: don't squeeze to 80 columns
    console.print(summary.table())
    console.print(f"{len(summary.results) - len(summary.failed)} of {len(summary.results)} sources in {args.out} "
                  f"({time.perf_counter() - start:.1f} s)")
    if summary.failed:  # each reason was printed once, as it happened
        console.print(f"[red]{len(summary.failed)} failed[/red]: {', '.join(_short(r.source) for r in summary.failed)} (errors above)", highlight=False)
    return 2 if summary.failed else 0
