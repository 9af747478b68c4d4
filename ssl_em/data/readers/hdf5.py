"""HDF5 datasets through h5py: `file.h5:/path/in/file`, or `file.h5` when it holds one dataset.

h5py reads only the chunks a region touches (LZF, gzip and the other built-in filters
included). The file handle is per process: `Volume.__getstate__` drops it and each
data-loader worker reopens the file on its first read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VolumeError, VoxelSize


class Hdf5Volume(Volume):
    """One 2D or 3D dataset of an HDF5 file as a (z, y, x) volume.

    Voxel size comes from the dataset's attributes when present: `resolution` (z, y, x in
    nm, the CREMI convention) or `element_size_um` (z, y, x in µm, ilastik and ImageJ).
    """

    def __init__(self, path: str | Path, dataset: str | None = None) -> None:
        import h5py

        super().__init__()
        self.file = str(path)
        try:
            with h5py.File(self.file, "r") as f:
                self.dataset = dataset.strip("/") if dataset else _only_dataset(self.file, f)
                if self.dataset not in f or not isinstance(f[self.dataset], h5py.Dataset):
                    raise VolumeError(f"{self.file}: no dataset {self.dataset!r} (datasets: {', '.join(_datasets(f)) or 'none'})")
                ds = f[self.dataset]
                self.path = f"{self.file}:/{self.dataset}"
                self.shape = _zyx(self.path, ds.shape)
                self.dtype = np.dtype(ds.dtype)
                _check_mostly_written(self.path, ds)
                voxel_size = _voxel_size(ds.attrs)
        except VolumeError:
            raise
        except Exception as err:  # h5py raises OSError for truncated or non-HDF5 files
            raise VolumeError(f"{self.file}: not a readable HDF5 file ({str(err).splitlines()[0][:200]})") from None
        self.voxel_size, self.voxel_size_known = (voxel_size, True) if voxel_size else (UNKNOWN_VOXEL_SIZE, False)

    def _open(self):
        import h5py

        return h5py.File(self.file, "r")[self.dataset]

    def _read(self, zs, ys, xs) -> np.ndarray:
        ds = self.handle
        try:
            if ds.ndim == 2:
                return ds[ys, xs][None]
            lead = (0,) * (ds.ndim - 3)  # singleton leading axes, checked in _zyx
            return ds[lead + (zs, ys, xs)]
        except OSError as err:  # a corrupt chunk surfaces only when it is read
            raise VolumeError(f"{self.path}: cannot read region ({str(err).splitlines()[0][:200]})") from None


def _datasets(f) -> list[str]:
    import h5py

    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 else None)
    return found


def _only_dataset(file: str, f) -> str:
    names = _datasets(f)
    if len(names) != 1:
        listed = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        problem = "holds no 2D or 3D dataset" if not names else f"holds {len(names)} datasets ({listed}); name one as {file}:/NAME"
        raise VolumeError(f"{file}: {problem}")
    return names[0]


def _zyx(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 2:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) < 2 or any(s != 1 for s in shape[:-3]):
        raise VolumeError(f"{path}: dataset of shape {shape} is not a (z, y, x) volume")
    return tuple(int(s) for s in shape[-3:])


def _voxel_size(attrs) -> VoxelSize | None:
    for key, scale in (("resolution", 1.0), ("element_size_um", 1e3)):
        if key in attrs:
            value = np.atleast_1d(np.asarray(attrs[key], dtype=np.float64)) * scale
            if value.size in (1, 3) and np.all(value > 0):
                return VoxelSize.parse(tuple(value[-3:]))
    return None


#: A chunked dataset declared larger than this must store at least 1/MAX_UNWRITTEN_RATIO of it.
CHECK_ABOVE_BYTES, MAX_UNWRITTEN_RATIO = 1 << 30, 1000


def _check_mostly_written(path: str, ds) -> None:
    """VolumeError when a chunked dataset declares far more than it stores: HDF5 creates a
    100000^3 dataset in kilobytes and reads its unwritten chunks as the fill value, so it
    would be ingested (and curated, with a flag per tile held in memory) as petabytes of
    nothing. EM compresses a few-fold, never a thousand-fold."""
    declared = int(np.prod(ds.shape, dtype=np.float64) * ds.dtype.itemsize)
    if ds.chunks is None or declared < CHECK_ABOVE_BYTES:
        return
    stored = int(ds.id.get_storage_size())
    if stored * MAX_UNWRITTEN_RATIO < declared:
        raise VolumeError(f"{path}: declares shape {tuple(ds.shape)} ({declared / 2**30:.3g} GiB) but stores only {stored / 2**20:.3g} MiB: "
                          "mostly unwritten chunks; write the data, or copy the written region into a dataset of its own")
