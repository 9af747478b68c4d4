"""The one volume interface every reader in ssl_em provides.

A `Volume` is a lazily opened 3D image with axes (z, y, x). A 2D image is a volume
with one z-slice. Reading a region never loads more than that region (plus whatever
the storage's chunking forces). Readers must be picklable *without* their open file
handles so that data-loader workers can reopen them: implement `_open()` to (re)create
the handle and keep it in `self._handle`, which `__getstate__` drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ssl_em.errors import UserError


class VolumeError(UserError):
    """A source cannot be read as a volume. The message names the file and the problem."""


@dataclass(frozen=True)
class VoxelSize:
    """Voxel spacing in nanometres, (z, y, x) order."""

    z: float
    y: float
    x: float

    @classmethod
    def parse(cls, value: "VoxelSize | str | float | tuple[float, ...] | list[float]") -> "VoxelSize":
        """Accept 4 (isotropic), (z, y, x), "50,4,4" or "4" (isotropic)."""
        if isinstance(value, VoxelSize):
            return value
        given = value
        try:
            if isinstance(value, str):
                value = tuple(float(v) for v in value.replace("x", ",").split(",") if v.strip())
            if isinstance(value, (int, float)):
                value = (float(value),) * 3
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            value = ()
        if len(value) == 1:
            value = value * 3
        if len(value) != 3 or not all(np.isfinite(value)) or min(value) <= 0:
            raise VolumeError(f"voxel size (--voxel-size) {given!r}: must be one or three positive numbers z,y,x in nm, e.g. 50,4,4")
        return cls(*value)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.z, self.y, self.x)

    def is_near_isotropic(self, tolerance: float = 0.25) -> bool:
        """True when z spacing is within `tolerance` of the in-plane spacing.

        CEM500K used the orthogonal planes only when z was within 25% of xy.
        """
        xy = (self.y + self.x) / 2
        return abs(self.z - xy) <= tolerance * xy


#: Used when a file carries no voxel size and none was given. 1 nm means "unknown":
#: pixel-size-aware sampling then degenerates to using level 0 as is.
UNKNOWN_VOXEL_SIZE = VoxelSize(1.0, 1.0, 1.0)


class Volume:
    """Base class: a lazily opened (z, y, x) array with a voxel size in nm.

    Subclasses set `path`, `shape`, `dtype`, `voxel_size` in `__init__` (reading only
    metadata) and implement `_open()` and `_read(zs, ys, xs)`.
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: VoxelSize
    voxel_size_known: bool = True

    def __init__(self) -> None:
        self._handle: Any = None

    # -- what subclasses implement -------------------------------------------------
    def _open(self) -> Any:
        raise NotImplementedError

    def _read(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        raise NotImplementedError

    # -- shared plumbing -----------------------------------------------------------
    @property
    def handle(self) -> Any:
        if self._handle is None:
            self._handle = self._open()
        return self._handle

    def __getstate__(self) -> dict:
        # Open file handles (h5py, tensorstore, zarr) do not survive pickling into
        # worker processes; each worker reopens lazily on first read.
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    @property
    def name(self) -> str:
        return self.path

    @property
    def near_isotropic(self) -> bool:
        """A 3D volume whose known z spacing is within 25% of xy: xz and yz planes look like
        xy ones (pyramids halve z too; prediction averages the three planes)."""
        return self.voxel_size_known and self.voxel_size.is_near_isotropic() and self.shape[0] > 1

    @property
    def ndim_effective(self) -> int:
        return 2 if self.shape[0] == 1 else 3

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def read(self, z: slice | int | None = None, y: slice | None = None, x: slice | None = None) -> np.ndarray:
        """Read a region; returns a (z, y, x) numpy array (z kept even for an int index).

        Slices are clipped to the volume like numpy slicing; steps are not supported.
        """
        if isinstance(z, (int, np.integer)):
            z = slice(int(z), int(z) + 1)
        zs, ys, xs = (_clip(s, n) for s, n in zip((z, y, x), self.shape))
        out = self._read(zs, ys, xs)
        return np.asarray(out).reshape(zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        return self.read(*key)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.read()
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        vs = "x".join(f"{v:g}" for v in self.voxel_size.as_tuple())
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={np.dtype(self.dtype)}, voxel={vs} nm)"


def check_finite(block: np.ndarray, where: str) -> None:
    """VolumeError when a float block holds NaN or Inf: they would poison statistics and
    every model fed from them, so they must never pass silently."""
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise VolumeError(f"{where}: {int(np.count_nonzero(~np.isfinite(block)))} non-finite voxels (NaN/Inf); "
                          "replace them (e.g. with the background value) first")


def _clip(s: slice | None, n: int) -> slice:
    if s is None:
        return slice(0, n)
    if s.step not in (None, 1):
        raise ValueError("Volume.read does not support slice steps")
    start, stop, _ = s.indices(n)
    return slice(start, max(start, stop))


class ArrayVolume(Volume):
    """An in-memory numpy array as a Volume (tests, synthetic data, already-loaded images)."""

    def __init__(self, array: np.ndarray, voxel_size=UNKNOWN_VOXEL_SIZE, path: str = "<array>") -> None:
        super().__init__()
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise VolumeError(f"{path}: expected a 2D or 3D array, got shape {array.shape}")
        self._array = array
        self.path = path
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = array.dtype
        self.voxel_size = VoxelSize.parse(voxel_size)
        self.voxel_size_known = voxel_size is not UNKNOWN_VOXEL_SIZE

    def _open(self) -> np.ndarray:
        return self._array

    def _read(self, zs, ys, xs) -> np.ndarray:
        return self._array[zs, ys, xs]
