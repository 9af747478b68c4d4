"""The ssl_em archive: one OME-Zarr store holding a lab's curated EM, one image per source.

Layout (zarr v2 + NGFF 0.4, which napari and neuroglancer open)::

    ARCHIVE.zarr/                 attrs: {"ssl_em": {"format": "ssl_em.archive", "version": 1},
                                          "bioformats2raw.layout": 3}
      OME/                        attrs: {"series": [complete image names]}
        METADATA.ome.xml          one <Image ID="Image:<name>"> per complete image
      <image name>/               NGFF image group: "multiscales", "omero" (a grey channel named
                                  after the image, its robust contrast) + "ssl_em" attrs
        0/ 1/ 2/ ...              pyramid levels, (z, y, x), level 0 = the source, pixel-exact
        curation                  (z, ceil(y / t), ceil(x / t)) uint8 bit flags per level-0 tile
      .locks/<image name>.lock    writer lock of each image (`ImageLock`); not a zarr group

The root follows the bioformats2raw layout, the form of a collection of images that
napari-ome-zarr (0.10, tested) opens from the root, one layer per image: it lists the
series in OME/.zattrs and finds each image at the path its OME-XML ID names. Each image
stays a plain NGFF image, which any OME-Zarr reader opens as `ARCHIVE.zarr/<image name>`;
ome-zarr-py's own `Reader` (0.18) knows no collection but plates and label groups, so it
opens the images, not the root. ome-zarr-models (1.7, the NGFF reference models) validates
the root as a bioformats2raw group and every image as an NGFF Image, but lists none of the
root's images: it looks only for series named 0, 1, ..., not for the OME `series` list that
names ours (tests/test_ngff.py).

The image's "ssl_em" attributes hold the source path and fingerprint, intensity
statistics, curation settings and counts, and "complete": true, which is written last:
an image without it (a crash, Ctrl-C) is ignored by readers and redone by ingest.
Curation never deletes data; it only flags tiles.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path

import numpy as np

from ssl_em import ngff
from ssl_em.atomic import write_atomic
from ssl_em.data.normalize import IntensityStats
from ssl_em.data.readers.zarr_store import ZarrVolume, group_attributes, ome_zarr_levels
from ssl_em.data.volume import VoxelSize
from ssl_em.errors import UserError

FORMAT = "ssl_em.archive"
VERSION = 1
#: Folder of per-image writer locks inside the archive (not a zarr group: readers skip it).
LOCKS = ".locks"


class TileFlag(IntFlag):
    """Why curation flagged a tile. A tile with flags == 0 is kept."""

    LOW_INFORMATION = 1  # empty resin, blank or nearly uniform regions
    SATURATED = 2  # mostly clipped at the dtype's min or max
    PADDING = 4  # outside the imaged field: constant fill, or past the volume's edge
    DUPLICATE = 8  # perceptual hash within the threshold of an earlier kept tile


@dataclass
class ArchiveImage:
    """One complete image of an archive. Levels are opened lazily (tensorstore)."""

    name: str
    path: Path
    attrs: dict

    @property
    def meta(self) -> dict:
        return self.attrs["ssl_em"]

    @property
    def levels(self) -> list[ZarrVolume]:
        return [ZarrVolume(p, voxel_size=vs) for p, vs in ome_zarr_levels(self.path)]

    @property
    def voxel_sizes(self) -> list[VoxelSize]:
        return [vs for _, vs in ome_zarr_levels(self.path)]

    @property
    def stats(self) -> IntensityStats:
        return IntensityStats.from_dict(self.meta["stats"])

    @property
    def curation_tile(self) -> int:
        return int(self.meta["curation"]["tile_size"])

    @property
    def curation(self) -> np.ndarray:
        """(z, ty, tx) uint8 TileFlag bits for level-0 tiles of `curation_tile` pixels."""
        return ZarrVolume(self.path / "curation").read()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def source(self) -> str:
        return self.meta["source"]


class Archive:
    """Read side of an archive: the complete images and a fingerprint of the data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        attrs = group_attributes(self.path)
        if attrs.get("ssl_em", {}).get("format") != FORMAT:
            raise FileNotFoundError(f"{path}: not an ssl_em archive (run `ssl-em ingest SRC... --out {path}` first)")
        self.images: list[ArchiveImage] = []
        self.incomplete: list[str] = []
        for child in sorted(p for p in self.path.iterdir() if p.is_dir() and p.name != LOCKS):
            child_attrs = group_attributes(child)
            if "ssl_em" not in child_attrs:
                continue
            if child_attrs["ssl_em"].get("complete"):
                self.images.append(ArchiveImage(child.name, child, child_attrs))
            else:
                self.incomplete.append(child.name)

    @staticmethod
    def is_archive(path: str | Path) -> bool:
        return group_attributes(Path(path)).get("ssl_em", {}).get("format") == FORMAT

    def __getitem__(self, name: str) -> ArchiveImage:
        for im in self.images:
            if im.name == name:
                return im
        raise KeyError(f"{self.path}: no complete image named {name!r}")

    @property
    def fingerprint(self) -> str:
        """A short hash of what the archive holds: names, shapes, sources' fingerprints, curation counts."""
        h = hashlib.sha256()
        for im in self.images:
            m = im.meta
            h.update(json.dumps([im.name, m["shape"], m.get("source_fingerprint"), m["curation"].get("counts")], sort_keys=True).encode())
        return h.hexdigest()[:16]


class ImageBusyError(UserError):
    """Another live process is writing this image; the message names it."""


class ImageLock:
    """One writer per image: an exclusive `flock` on ARCHIVE/.locks/NAME.lock, which holds
    the writer's pid, host and source for the message others get.

    The kernel drops a flock when its process dies (kill -9 included), so a crashed ingest
    never leaves an image locked; the file stays behind, harmless. Locks are per image, so
    several processes can ingest into one archive at once (each writing whole images, as
    `ingest --shard` does) while two writers of the same image are impossible."""

    def __init__(self, archive: Path, name: str) -> None:
        self.path = Path(archive) / LOCKS / f"{name}.lock"
        self.name = name
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """Who holds the lock now ({"pid", "host", "source", "since"}), or None if nobody."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read() or {"pid": "?", "host": "?", "source": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, source: str) -> None:
        """Take the lock or raise ImageBusyError naming the process that has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                h = self._read()
                raise ImageBusyError(f"{self.path.parent.parent / self.name}: being written by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                                     f"since {h.get('since', '?')} (source {h.get('source', '?')}); wait for it, or run again when it ends") from None
            # The file may have been replaced between open and flock; lock the one on disk.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "source": source,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ImageLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ArchiveWriter:
    """Write side: create image groups with NGFF metadata, then mark them complete.

    The OME listing of complete images (`write_listing`) is rewritten as images finish. It
    covers every image, so listing after each one is quadratic in the image count: 150
    small patches spent 44% of their ingest in it. Two things bound it: attributes are
    re-read only for images whose `.zattrs` changed since this writer last listed them, and
    a finished image is listed at once only while listing is cheap; once a listing costs
    more than `LISTING_SHARE` of the time since the last one, listings wait. `close` lists
    what is left; ssl_em's own reader never needs the listing.
    """

    #: Upper bound on the share of wall time spent rewriting the listing during an ingest.
    LISTING_SHARE = 0.1

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{path}: is a file, not an archive folder; choose another --out")
        # A folder with .locks is an archive another writer is creating (checked again below,
        # under the lock); without, a non-empty folder that is no archive is the user's.
        if self.path.exists() and not (self.path / LOCKS).is_dir():
            self._refuse_foreign()
        self.path.mkdir(parents=True, exist_ok=True)  # OSError naming the path: under a file, unwritable...
        with self._root_lock():  # shards starting at once: one creates the root, the others see it
            self._refuse_foreign()
            self.root = zarr.open_group(str(self.path), mode="a", zarr_format=2)
            wanted = {"ssl_em": {"format": FORMAT, "version": VERSION}} | ngff.collection_attrs()
            # Written only when missing: processes sharing an archive (ingest --shard) must not
            # rewrite the root's attributes while another reads them.
            if any(self.root.attrs.get(k) != v for k, v in wanted.items()):
                self.root.attrs.update(wanted)
        # image name -> (identity of its .zattrs, listing entry or None when not complete)
        self._entries: dict[str, tuple[tuple, tuple | None]] = {}
        self._listed_at, self._listing_cost, self._unlisted = 0.0, 0.0, False
        self.write_listing()

    def close(self) -> None:
        """List the images finished since the last listing."""
        if self._unlisted:
            self.write_listing()

    def _refuse_foreign(self) -> None:
        if any(p.name != LOCKS for p in self.path.iterdir()) and not Archive.is_archive(self.path):
            raise UserError(f"{self.path}: exists and is not an ssl_em archive; refusing to write into it")

    @contextlib.contextmanager
    def _root_lock(self):
        """Exclusive flock on ARCHIVE/.locks/.archive.lock, for what several writers of one
        archive change together: the root's creation and the listing of complete images."""
        (self.path / LOCKS).mkdir(exist_ok=True)
        fd = os.open(self.path / LOCKS / ".archive.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def lock(self, name: str) -> ImageLock:
        return ImageLock(self.path, name)

    def write_listing(self) -> None:
        """List the complete images as bioformats2raw series (OME/.zattrs and OME-XML), so
        collection readers see exactly what ssl_em's own `Archive` sees."""
        start = time.monotonic()
        with self._root_lock():  # else a shard's older listing could replace a newer one
            listing = self._complete_images()
            ome = self.path / "OME"
            ome.mkdir(exist_ok=True)
            ngff.write_json(ome / ".zgroup", {"zarr_format": 2})
            ngff.write_json(ome / ".zattrs", ngff.series_metadata([name for name, *_ in listing]))
            write_atomic(ome / "METADATA.ome.xml", ngff.ome_xml(listing))
        self._listed_at = time.monotonic()
        self._listing_cost, self._unlisted = self._listed_at - start, False

    def _complete_images(self) -> list[tuple]:
        """(name, shape, dtype, level-0 voxel size) of every complete image, by name: what
        `Archive(path).images` holds. Images another shard wrote are read once; an image
        is read again only when its .zattrs is another file (inode, size or time)."""
        entries = {}
        for child in sorted(p for p in self.path.iterdir() if p.is_dir() and p.name not in (LOCKS, "OME")):
            try:
                st = (child / ".zattrs").stat()
            except FileNotFoundError:
                continue  # not an image group (yet)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._entries.get(child.name)
            if cached is None or cached[0] != stamp:
                cached = (stamp, self._entry(child))
            entries[child.name] = cached
        self._entries = entries
        return [entry for _, entry in entries.values() if entry is not None]

    @staticmethod
    def _entry(path: Path) -> tuple | None:
        attrs = group_attributes(path)
        if not attrs.get("ssl_em", {}).get("complete"):
            return None
        im = ArchiveImage(path.name, path, attrs)
        return im.name, im.shape, im.meta.get("dtype") or str(im.levels[0].dtype), im.voxel_sizes[0].as_tuple()

    def status(self, name: str) -> dict | None:
        """The image's ssl_em attrs if it exists (complete or not), else None."""
        p = self.path / name
        return group_attributes(p).get("ssl_em") if p.is_dir() else None

    def remove(self, name: str) -> None:
        listed = (self.path / name / ".zattrs").is_file() and group_attributes(self.path / name).get("ssl_em", {}).get("complete")
        shutil.rmtree(self.path / name, ignore_errors=True)
        if listed:
            self.write_listing()

    def create_image(
        self,
        name: str,
        level_shapes: list[tuple[int, int, int]],
        level_voxel_sizes: list[VoxelSize],
        dtype,
        chunks: tuple[int, int, int],
        curation_shape: tuple[int, int, int],
        meta: dict,
        compression_level: int = 3,
    ) -> list:
        """Create the level arrays and curation array; returns the zarr arrays of the levels.

        `meta` becomes the image's "ssl_em" attrs, with "complete": false until `finish`.
        """
        import numcodecs

        self.remove(name)
        group = self.root.create_group(name)
        compressor = numcodecs.Blosc(cname="zstd", clevel=compression_level, shuffle=numcodecs.Blosc.BITSHUFFLE)
        arrays = []
        for i, shape in enumerate(level_shapes):
            c = tuple(min(c, s) for c, s in zip(chunks, shape))
            arrays.append(group.create_array(str(i), shape=shape, chunks=c, dtype=dtype, compressors=compressor, fill_value=0))
        group.create_array("curation", shape=curation_shape, chunks=(min(64, curation_shape[0]),) + curation_shape[1:], dtype="uint8", compressors=compressor, fill_value=0)
        group.attrs["multiscales"] = [ngff_multiscales(name, level_voxel_sizes)]
        group.attrs["ssl_em"] = {**meta, "complete": False}
        return arrays

    def curation_array(self, name: str):
        import zarr

        return zarr.open_array(str(self.path / name / "curation"), mode="r+")

    def finish(self, name: str, meta: dict) -> None:
        """Record the final metadata and mark the image complete (the last write)."""
        import zarr

        group = zarr.open_group(str(self.path / name), mode="r+", zarr_format=2)
        stats = meta.get("stats")
        # omero: viewers name the layer after the image and open it at the EM's robust
        # contrast. One attrs write: other shards' listings read these attrs meanwhile.
        shown = {"omero": ngff.omero([name], (stats["lo"], stats["hi"]), (stats["min"], stats["max"]), grey=True)} if stats else {}
        group.attrs.update(shown | {"ssl_em": {**meta, "complete": True}})
        self._unlisted = True
        if time.monotonic() - self._listed_at >= self._listing_cost / self.LISTING_SHARE:
            self.write_listing()


def ngff_multiscales(name: str, voxel_sizes: list[VoxelSize]) -> dict:
    """NGFF 0.4 multiscales metadata for a (z, y, x) pyramid in nanometres."""
    return ngff.multiscales(name, "zyx", [vs.as_tuple() for vs in voxel_sizes], kind="mean")
