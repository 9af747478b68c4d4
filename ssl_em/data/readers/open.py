"""`open_volume`: turn a path (or `file.h5:/dataset`) into a `Volume`, whatever the format.

The format is found by walking `FORMATS`, a table of (name, probe, opener): the first
probe that recognises the path wins. Adding a format is adding a row. Probes look only
at suffixes and metadata files; nothing is decoded until the opener runs.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ssl_em.data.readers.hdf5 import Hdf5Volume
from ssl_em.data.readers.image_stack import IMAGE_SUFFIXES, PIL_SUFFIXES, ImageStackVolume
from ssl_em.data.readers.mrc import MrcVolume
from ssl_em.data.readers.tiff import TiffVolume
from ssl_em.data.readers.zarr_store import (
    ZarrVolume,
    _metadata_driver,
    group_attributes,
    incomplete_archive_image,
    is_group,
    open_ome_zarr,
    open_single_array_group,
)
from ssl_em.data.volume import ArrayVolume, Volume, VolumeError, VoxelSize

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".ali", ".map")


@dataclass(frozen=True)
class Format:
    """One row of the format table. `open(path, inner)` gets the inner path of a
    `file:inner` spec (an HDF5 dataset), or None."""

    name: str
    probe: Callable[[Path], bool]
    open: Callable[[Path, str | None], Volume]


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda p: p.is_file() and p.suffix.lower() in suffixes


def _is_ome_zarr(p: Path) -> bool:
    attrs = group_attributes(p) if p.is_dir() else {}
    return "multiscales" in attrs.get("ome", attrs)


def _is_bioformats2raw(p: Path) -> bool:
    return p.is_dir() and "bioformats2raw.layout" in group_attributes(p)


def open_bioformats2raw(path: Path) -> Volume:
    """A bioformats2raw store (what converting a microscope file gives, and the root of an
    ssl_em archive): one OME-Zarr image per series, in the groups OME/.zattrs "series" lists
    or else in groups 0, 1, ... Its only series opens as is; with several, one must be named
    (`store.zarr:1`), as for a zarr group holding several arrays."""
    listed = group_attributes(path / "OME").get("series") if (path / "OME").is_dir() else None
    series = [s for s in listed if _is_ome_zarr(path / s)] if listed else sorted((c.name for c in path.iterdir() if c.name.isdigit() and _is_ome_zarr(c)), key=int)
    if len(series) != 1:
        problem = "holds no OME-Zarr series" if not series else f"holds {len(series)} series ({', '.join(series[:8])}); open one as {path}:N"
        cut = sorted(c.name for c in path.iterdir() if c.is_dir() and incomplete_archive_image(c))
        if cut:  # what a killed ingest left: say which, rather than only "no series"
            problem += f"; incomplete after an interrupted ingest: {', '.join(cut[:8])} (re-run the ingest to finish)"
        raise VolumeError(f"{path}: bioformats2raw store {problem}")
    return open_ome_zarr(path / series[0])


def _is_image_folder(p: Path) -> bool:
    return p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())


def _no_inner(opener: Callable[[Path], Volume]) -> Callable[[Path, str | None], Volume]:
    return lambda p, inner: opener(p)


FORMATS: tuple[Format, ...] = (
    Format("ome-zarr", _is_ome_zarr, _no_inner(open_ome_zarr)),
    Format("bioformats2raw", _is_bioformats2raw, _no_inner(open_bioformats2raw)),
    Format("zarr", lambda p: p.is_dir() and _metadata_driver(p) in ("zarr", "zarr3"), _no_inner(ZarrVolume)),
    Format("n5", lambda p: p.is_dir() and _metadata_driver(p) == "n5", _no_inner(ZarrVolume)),
    Format("zarr-group", lambda p: p.is_dir() and is_group(p), _no_inner(open_single_array_group)),
    Format("hdf5", _suffix(*HDF5_SUFFIXES), lambda p, inner: Hdf5Volume(p, inner)),
    Format("tiff", _suffix(".tif", ".tiff"), _no_inner(TiffVolume)),
    Format("image", _suffix(*PIL_SUFFIXES), _no_inner(lambda p: ImageStackVolume([p], p))),
    Format("mrc", _suffix(*MRC_SUFFIXES), _no_inner(MrcVolume)),
    Format("image-folder", _is_image_folder, _no_inner(ImageStackVolume.from_folder)),
)


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """`file.h5:/raw` -> (Path("file.h5"), "/raw"); a plain existing path -> (path, None).

    The split is at the first ':' whose left side exists on disk, so drive letters and
    colons inside folder names are left alone.
    """
    text = str(spec)
    if os.path.exists(text) or ":" not in text:
        return Path(text), None
    for i, ch in enumerate(text):
        if ch == ":" and i > 0 and os.path.exists(text[:i]):
            return Path(text[:i]), text[i + 1 :] or None
    # Nothing exists: still split after a container suffix, so errors name the file.
    match = re.match(r"^(.+?\.(?:h5|hdf5|hdf|he5|zarr|n5)):(.*)$", text, re.IGNORECASE)
    return (Path(match[1]), match[2] or None) if match else (Path(text), None)


def detect_format(spec: str | Path) -> Format:
    """The table row that reads `spec`; VolumeError if none does."""
    path, inner = split_spec(spec)
    if not path.exists():
        raise VolumeError(f"{spec}: no such file or folder")
    if inner is not None and path.is_dir():
        path, inner = path / inner.strip("/"), None  # `store.zarr:group/array`
        if not path.exists():
            raise VolumeError(f"{spec}: no such array inside the store")
    for fmt in FORMATS:
        if fmt.probe(path):
            return fmt
    if path.is_dir():
        raise VolumeError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}) and no zarr/N5 metadata")
    raise VolumeError(f"{path}: unsupported format {path.suffix or '(no suffix)'!r}")


def open_volume(spec: str | Path, voxel_size: VoxelSize | str | float | tuple | None = None) -> Volume:
    """Open any supported source lazily as a (z, y, x) `Volume`.

    spec: a file, a folder of 2D images, a zarr/N5/OME-Zarr store, or `file.h5:/dataset`.
    voxel_size: nm, (z, y, x) or isotropic; overrides whatever the file says.
    """
    fmt = detect_format(spec)
    path, inner = split_spec(spec)
    if inner is not None and path.is_dir():
        path, inner = path / inner.strip("/"), None
    volume = fmt.open(path, inner)
    if any(s == 0 for s in volume.shape):
        raise VolumeError(f"{volume.path}: empty volume (shape {volume.shape})")
    if np.dtype(volume.dtype).kind not in "uifb":
        raise VolumeError(f"{volume.path}: unsupported dtype {np.dtype(volume.dtype)} (need integer or float pixels)")
    if voxel_size is not None:
        volume.voxel_size, volume.voxel_size_known = VoxelSize.parse(voxel_size), True
    return volume


def source_fingerprint(spec: str | Path) -> str:
    """A cheap identity of a source: relative names, sizes and mtimes of its files, hashed.

    Never reads pixels, so re-running ingest over a large archive is fast; any rewrite of
    a file (new mtime or size) changes the fingerprint.
    """
    path, inner = split_spec(spec)
    h = hashlib.sha256(f"{inner or ''}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not path.exists():
        raise VolumeError(f"{spec}: no such file or folder")
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def as_volume(source: "str | Path | Volume | np.ndarray", voxel_size=None) -> Volume:
    """A Volume from a path/spec (any format `open_volume` reads), a Volume, or an array."""
    if isinstance(source, Volume):
        return source
    if isinstance(source, np.ndarray):
        return ArrayVolume(source)
    return open_volume(source, voxel_size=voxel_size)
