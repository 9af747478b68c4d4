"""Blocks held as column strips, and read straight from a zarr v2 array's chunk files.

The tile stream decodes every voxel once and copies each tile once, into its batch. Read
through tensorstore, a block cost a second copy: each chunk was decoded into a buffer of
tensorstore's and then copied into a row-major block, where each of its 256 rows lands on
another 4 KB page. Decoding each chunk straight into the block needs a layout in which a
chunk is one contiguous run of memory: column *strips*, `data[s, z, y, w]`, one strip per
column of chunks, so chunk (z, cy, s) is the contiguous `data[s, z, cy*H:(cy+1)*H]`. A tile
is then copied into its batch in one piece per strip it overlaps (two for 224 px tiles in
256 px chunks), each piece read from a few contiguous pages.

Measured on the 2-core development machine (benchmarks/RESULTS.md, issue 21 session 10):
tensorstore's block read cost about 120-140 us of CPU per 256 x 256 chunk, decoding the
chunk files into strips about the read + decompress ceiling's 110.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ssl_em.data.volume import VolumeError


class Strips:
    """A (Z, R, C) block stored as `data` (S, Z, R', W): block column x is strip x // W,
    column x % W; R' >= R and S * W >= C (edge chunks are decoded whole).

    A row-major block is the case S = 1, W = C, wrapped without a copy (`Strips.of`).
    """

    def __init__(self, data: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.data, self.shape, self.width = data, shape, data.shape[-1]

    @classmethod
    def of(cls, block: np.ndarray) -> "Strips":
        """A (Z, R, C) array (a view is fine) as one strip."""
        return cls(block[None], block.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def array(self) -> np.ndarray:
        """The block as a row-major (Z, R, C) array (a copy unless it is one strip)."""
        S, Z, R, W = self.data.shape
        if S == 1:
            return self.data[0, :, : self.shape[1], : self.shape[2]]
        return self.data.transpose(1, 2, 0, 3).reshape(Z, R, S * W)[:, : self.shape[1], : self.shape[2]]

    def copy_to(self, out: np.ndarray, p: int, r: int, c: int) -> None:
        """out[...] = block[p, r:r+t, c:c+t] for out (t, t), or block[p:p+D, r:r+t, c:c+t]
        for out (D, t, t): one copy per strip the tile overlaps."""
        t, w = out.shape[-1], self.width
        z = p if out.ndim == 2 else slice(p, p + out.shape[0])
        s, o = divmod(c, w)
        if o + t <= w:  # inside one strip (always, for a row-major block)
            out[...] = self.data[s, z, r : r + t, o : o + t]
            return
        done = 0
        while done < t:
            n = min(t - done, w - o)
            out[..., done : done + n] = self.data[s, z, r : r + t, o : o + n]
            done, s, o = done + n, s + 1, 0

    def tile(self, p: int, r: int, c: int, shape: tuple[int, ...]) -> np.ndarray:
        """The tile at (p, r, c) of `shape` ([D,] t, t): a view when it lies in one strip."""
        t = shape[-1]
        s, o = divmod(c, self.width)
        if o + t <= self.width:
            z = p if len(shape) == 2 else slice(p, p + shape[0])
            return self.data[s, z, r : r + t, o : o + t]
        out = np.empty(shape, self.dtype)
        self.copy_to(out, p, r, c)
        return out


class ChunkFiles:
    """A 3D zarr v2 array (blosc, as archives are written; C order, no filters, one z-section
    per chunk) read chunk file by chunk file with numcodecs, straight into `Strips`, on a thread pool of its own (file
    reads and decompression release the GIL).

    `open` returns None for any array it cannot read this way; its caller reads those
    through tensorstore. Missing chunk files read as the fill value, as zarr's do.
    """

    def __init__(self, path: str, shape, chunks, dtype: np.dtype, codec, fill, separator: str, threads: int | None) -> None:
        self.path, self.shape, self.chunks, self.dtype = path, tuple(shape), tuple(chunks), dtype
        self.codec, self.fill, self.separator, self.threads = codec, fill, separator, threads
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, path: str | Path, threads: int | None = None) -> "ChunkFiles | None":
        import numcodecs

        try:
            meta = json.loads((Path(path) / ".zarray").read_text())
            dtype = np.dtype(meta["dtype"])
            codec = numcodecs.get_codec(meta["compressor"]) if (meta.get("compressor") or {}).get("id") == "blosc" else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not zarr v2, or a dtype or codec numcodecs does not know: tensorstore reads it
        native = dtype.byteorder in ("=", "|") or (dtype.byteorder == "<") == (sys.byteorder == "little")
        if (meta.get("zarr_format") != 2 or meta.get("order", "C") != "C" or meta.get("filters") or len(meta["shape"]) != 3
                or meta["chunks"][0] != 1 or not native or dtype.hasobject or codec is None
                or not isinstance(meta.get("fill_value") or 0, (int, float))):
            return None
        fill = meta.get("fill_value") or 0
        return cls(str(path), meta["shape"], meta["chunks"], dtype, codec, fill, meta.get("dimension_separator", "."), threads)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"] = None  # threads do not pickle; a loader worker starts its own
        return state

    def aligned(self, zs: slice, ys: slice, xs: slice) -> bool:
        """Whether the region starts on a chunk boundary (a block of the stream does)."""
        return ys.start % self.chunks[1] == 0 and xs.start % self.chunks[2] == 0

    def read_async(self, zs: slice, ys: slice, xs: slice) -> Future:
        """Start reading a chunk-aligned region (slices within the array); a future of `Strips`."""
        if self._pool is None:
            blosc_global_context()
            self._pool = ThreadPoolExecutor(self.threads or len(os.sched_getaffinity(0)), thread_name_prefix="ssl_em-chunks")
        # Allocated here, not in the pool's thread: glibc gives each thread its own arena, and
        # blocks freed back to the main one are reused without page faults (ssl_em.data.heap).
        data = self._empty(zs, ys, xs)
        return self._pool.submit(self.read, zs, ys, xs, data)

    def _empty(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        _, H, W = self.chunks
        n_rows, n_strips = -(-(ys.stop - ys.start) // H), -(-(xs.stop - xs.start) // W)
        return np.empty((n_strips, zs.stop - zs.start, n_rows * H, W), self.dtype)

    def read(self, zs: slice, ys: slice, xs: slice, data: np.ndarray | None = None) -> Strips:
        """The chunk-aligned region as `Strips`, decoded into `data` (from `_empty`) if given."""
        _, H, W = self.chunks
        cy0, cx0 = ys.start // H, xs.start // W
        data = self._empty(zs, ys, xs) if data is None else data
        n_strips, _, n_rows, _ = data.shape
        n_rows //= H
        sep = self.separator
        for z in range(zs.start, zs.stop):
            for s in range(n_strips):
                for k in range(n_rows):
                    out = data[s, z - zs.start, k * H : (k + 1) * H]
                    name = f"{self.path}/{z}{sep}{cy0 + k}{sep}{cx0 + s}"
                    try:
                        with open(name, "rb") as f:
                            buf = f.read()
                    except FileNotFoundError:
                        out.fill(self.fill)  # never written: the fill value, as zarr reads it
                        continue
                    except OSError as err:
                        raise VolumeError(f"{name}: cannot read chunk ({err.strerror}); the store is damaged or unreadable") from None
                    try:
                        # blosc writes the size its header gives (bytes 4-8 of the blosc 1 format)
                        # into a larger `out` without a word: a chunk of another size is damage.
                        nbytes = int.from_bytes(buf[4:8], "little")
                        if nbytes != out.nbytes:
                            raise ValueError(f"it holds {nbytes} bytes, not {out.nbytes}")
                        self.codec.decode(buf, out=out)
                    except (RuntimeError, ValueError, TypeError) as err:  # numcodecs' decode errors
                        raise VolumeError(f"{name}: cannot decode chunk ({str(err).splitlines()[0][:200]}); the store is damaged") from None
        return Strips(data, (zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start))


def blosc_global_context() -> None:
    """Decode blosc in blosc's global context, one thread, from every thread of this process.

    numcodecs uses the global context only in the main thread of the main process; in any
    other thread, or in any loader worker process, each call builds and frees a context of
    its own (`blosc_decompress_ctx`). Measured in the tile stream on the development
    machine (benchmarks/RESULTS.md, issue 21 session 10): 158-173 us of CPU per tile with
    a context per chunk, 120-125 with the global one. One thread, because blosc's own
    threads only contend with the stream's on a busy machine. The global context sits
    behind numcodecs' lock, so within a process chunks decompress one at a time (file
    reads and the stream's other work still overlap); loader workers are processes, each
    with its own. It applies to every numcodecs blosc call in the process.
    """
    import numcodecs.blosc

    numcodecs.blosc.use_threads = True
    numcodecs.blosc.set_nthreads(1)
