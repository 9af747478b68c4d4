"""Chunked stores read through tensorstore: zarr v2, zarr v3, N5 and OME-Zarr.

tensorstore decodes chunks in C++ on its own thread pool, which is what lets the tile
stream approach the raw decode rate (zarr-python pays a per-chunk Python overhead), and
it still reads N5, which zarr 3 dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VolumeError, VoxelSize
from ssl_em.errors import read_json_object


def _metadata_driver(path: Path) -> str | None:
    """Which tensorstore driver reads the array at `path`, or None if it is no array."""
    if (path / ".zarray").is_file():
        return "zarr"
    if (path / "zarr.json").is_file():
        meta = json.loads((path / "zarr.json").read_text())
        return "zarr3" if meta.get("node_type") == "array" else None
    if (path / "attributes.json").is_file():
        meta = json.loads((path / "attributes.json").read_text())
        return "n5" if "dimensions" in meta else None
    return None


def group_attributes(path: Path) -> dict:
    """Attributes of a zarr v2/v3 or N5 group (empty dict when there are none).
    VolumeError naming the file when the metadata is not a JSON object."""
    for name, key in ((".zattrs", None), ("zarr.json", "attributes"), ("attributes.json", None)):
        f = path / name
        if f.is_file():
            meta = read_json_object(f, "zarr metadata", VolumeError)
            return meta.get(key, {}) if key else meta
    return {}


class ZarrVolume(Volume):
    """One array of a zarr v2/v3 or N5 store. Reads only the chunks a region touches."""

    def __init__(self, path: str | Path, voxel_size=None, cache_bytes: int = 0, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        p = Path(path)
        self.driver = _metadata_driver(p)
        if self.driver is None:
            raise VolumeError(f"{path}: not a zarr or N5 array (no .zarray, zarr.json or attributes.json)")
        self.cache_bytes = cache_bytes
        # tensorstore decodes on a thread pool sized to the machine; `threads` caps it,
        # e.g. to measure per-core speed or to share cores between loader workers.
        self.threads = threads
        store = self.handle
        shape = tuple(int(s) for s in store.shape)
        if len(shape) == 2:
            shape = (1,) + shape
        elif len(shape) > 3:
            # OME-Zarr allows (t, c, z, y, x); ssl_em reads single-channel volumes, so
            # leading axes must be singletons.
            if any(s != 1 for s in shape[:-3]):
                raise VolumeError(f"{path}: array of shape {shape} has non-singleton leading axes; ssl_em reads (z, y, x)")
        elif len(shape) != 3:
            raise VolumeError(f"{path}: expected a 2D or 3D array, got shape {shape}")
        self._lead = len(store.shape) - 3 if len(store.shape) >= 3 else -1
        self.shape = shape[-3:]
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        if voxel_size is None and self.driver == "n5":
            voxel_size = n5_voxel_size(group_attributes(p))
        if voxel_size is None:
            self.voxel_size, self.voxel_size_known = UNKNOWN_VOXEL_SIZE, False
        else:
            self.voxel_size = VoxelSize.parse(voxel_size)
        chunks = store.chunk_layout.read_chunk.shape
        self.chunks = tuple(int(c) for c in (chunks if len(chunks) >= 3 else (1,) + tuple(chunks)))[-3:]

    def _open(self):
        import tensorstore as ts

        spec = {"driver": self.driver, "kvstore": {"driver": "file", "path": self.path}}
        context = {"cache_pool": {"total_bytes_limit": self.cache_bytes}}
        if self.threads:
            context["data_copy_concurrency"] = {"limit": self.threads}
            context["file_io_concurrency"] = {"limit": self.threads}
        try:
            store = ts.open(spec, read=True, context=ts.Context(context)).result()
            # N5 lists dimensions fastest first (x, y, z: the Java convention, which tensorstore
            # keeps); reversed they are ssl_em's (z, y, x), as z5py and zarr's N5 store read them.
            return store.T if self.driver == "n5" else store
        except Exception as err:  # tensorstore raises ValueError with long JSON payloads
            raise VolumeError(f"{self.path}: cannot open {self.driver} array ({str(err).splitlines()[0][:200]})") from None

    def _read(self, zs, ys, xs) -> np.ndarray:
        return self.read_async(zs, ys, xs).result()

    def read_async(self, zs: slice, ys: slice, xs: slice):
        """Start a region read and return a future; `.result()` gives the (z, y, x) array.

        The tile stream issues several block reads at once so tensorstore decodes them
        in parallel while Python cuts tiles from the previous block.
        """
        store = self.handle
        index = (0,) * max(self._lead, 0) + (zs, ys, xs) if self._lead >= 0 else (ys, xs)
        return _Read(store[index].read(), f"{self.path}: cannot read z {zs.start}..{zs.stop - 1}, y {ys.start}..{ys.stop - 1}, x {xs.start}..{xs.stop - 1}",
                     self._lead < 0)


class _Read:
    """A tensorstore read in flight. A chunk that fails to decode (corrupt, truncated, a
    codec error) becomes a VolumeError naming the array and the region, not tensorstore's
    ValueError deep inside a loader; `flat`: a 2D array, given a z axis on the way out."""

    def __init__(self, future, where: str, flat: bool = False) -> None:
        self.future, self.where, self.flat = future, where, flat

    def result(self) -> np.ndarray:
        try:
            out = self.future.result()
        except ValueError as err:  # tensorstore reports I/O and decoding failures so
            raise VolumeError(f"{self.where} ({str(err).splitlines()[0][:300]}); the store is damaged") from None
        return out[None] if self.flat else out

    def cancel(self) -> bool:
        return self.future.cancel()


def n5_voxel_size(attrs: dict) -> VoxelSize | None:
    """Voxel size in nm from an N5 dataset's attributes, or None if they hold none.

    Reads the conventions EM tools write: "pixelResolution" ({"dimensions": [x, y, z],
    "unit": ...} from n5-viewer/BigDataViewer, or a plain [x, y, z] list), "resolution"
    ([x, y, z], nm, as Paintera and elf write it) and "transform" (COSEM/OpenOrganelle:
    named "axes" with "scale" and "units")."""
    pixel = attrs.get("pixelResolution")
    if isinstance(pixel, dict) and "dimensions" in pixel:
        xyz, unit = pixel["dimensions"], pixel.get("unit")
    elif isinstance(pixel, list):
        xyz, unit = pixel, None
    elif isinstance(attrs.get("resolution"), list):
        xyz, unit = attrs["resolution"], attrs.get("unit")
    elif isinstance(attrs.get("transform"), dict) and {"axes", "scale"} <= set(attrs["transform"]):
        t = attrs["transform"]
        named = {a: float(s) * _unit_to_nm(u) for a, s, u in zip(t["axes"], t["scale"], t.get("units") or [None] * len(t["axes"]))}
        return VoxelSize(*(named.get(a, 1.0) for a in "zyx"))
    else:
        return None
    xyz = [float(v) for v in xyz][:3] + [1.0] * max(0, 3 - len(xyz))  # 2D: one z-slice
    return VoxelSize(*(v * _unit_to_nm(unit) for v in reversed(xyz)))


def ome_zarr_levels(path: str | Path) -> list[tuple[str, VoxelSize]]:
    """(array path, voxel size in nm) for each level of an OME-Zarr multiscale image.

    Reads NGFF 0.4 (`.zattrs`) and 0.5 (`zarr.json` attributes under "ome"). Only the
    last three axes are used; units other than nanometre are converted.
    """
    path = Path(path)
    attrs = group_attributes(path)
    attrs = attrs.get("ome", attrs)
    multiscales = attrs.get("multiscales")
    if not multiscales:
        raise VolumeError(f"{path}: no NGFF 'multiscales' metadata")
    ms = multiscales[0]
    axes = ms.get("axes", [])
    factors = [_unit_to_nm(a.get("unit") if isinstance(a, dict) else None) for a in axes][-3:]
    while len(factors) < 3:
        factors.insert(0, 1.0)
    global_scale = _scale_of(ms.get("coordinateTransformations", []))
    out = []
    for ds in ms["datasets"]:
        scale = _scale_of(ds.get("coordinateTransformations", [])) or [1.0, 1.0, 1.0]
        if global_scale:
            scale = [a * b for a, b in zip(scale[-3:], global_scale[-3:])]
        scale = list(scale[-3:])
        while len(scale) < 3:
            scale.insert(0, 1.0)
        out.append((str(path / ds["path"]), VoxelSize(*(s * f for s, f in zip(scale, factors)))))
    return out


_UNITS_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "um": 1e3, "µm": 1e3, "angstrom": 0.1, "millimeter": 1e6}


def _unit_to_nm(unit: str | None) -> float:
    return _UNITS_NM.get(unit or "nanometer", 1.0)


def _scale_of(transforms: list[dict]) -> list[float] | None:
    for t in transforms:
        if t.get("type") == "scale":
            return [float(s) for s in t["scale"]]
    return None


def open_ome_zarr(path: str | Path, level: int = 0, voxel_size=None) -> ZarrVolume:
    """Open one level of an OME-Zarr image; voxel size from the NGFF metadata. An ssl_em
    archive image whose ingest was interrupted (not marked complete) is refused, named."""
    check_archive_image_complete(Path(path))
    levels = ome_zarr_levels(path)
    if level >= len(levels):
        raise VolumeError(f"{path}: level {level} requested but the image has {len(levels)} levels")
    array_path, vs = levels[level]
    return ZarrVolume(array_path, voxel_size=voxel_size if voxel_size is not None else vs)


def incomplete_archive_image(path: Path) -> bool:
    """True for an ssl_em archive image that an ingest created but never marked complete
    (killed or failed midway): its pyramid and statistics may be partial."""
    meta = group_attributes(path).get("ssl_em")
    return isinstance(meta, dict) and "source" in meta and meta.get("complete") is False


def check_archive_image_complete(path: Path) -> None:
    if incomplete_archive_image(path):
        raise VolumeError(f"{path}: archive image left incomplete by an interrupted ingest; re-run that `ssl-em ingest` to finish it")


def is_group(path: Path) -> bool:
    """True for a zarr v2/v3 or N5 group (not an array)."""
    if (path / ".zgroup").is_file():
        return True
    if (path / "zarr.json").is_file():
        return json.loads((path / "zarr.json").read_text()).get("node_type") == "group"
    if (path / "attributes.json").is_file():
        return "dimensions" not in json.loads((path / "attributes.json").read_text())
    return False


def find_arrays(group: Path, max_depth: int = 4) -> list[Path]:
    """Paths of the zarr/N5 arrays under a group, depth-first, names sorted."""
    found: list[Path] = []
    for child in sorted(p for p in group.iterdir() if p.is_dir()):
        if _metadata_driver(child) is not None:
            found.append(child)
        elif max_depth > 1 and is_group(child):
            found.extend(find_arrays(child, max_depth - 1))
    return found


def open_single_array_group(path: str | Path) -> ZarrVolume:
    """Open the one array a zarr/N5 group holds (a common way to save a single volume)."""
    arrays = find_arrays(Path(path))
    if len(arrays) != 1:
        names = ", ".join(str(a.relative_to(path)) for a in arrays[:8])
        problem = "holds no arrays" if not arrays else f"holds {len(arrays)} arrays ({names}); open one of them by its path"
        raise VolumeError(f"{path}: zarr group {problem}")
    return ZarrVolume(arrays[0])
