"""MRC / CCP4 maps and stacks (cryo-ET tomograms, SerialEM montages) through mrcfile.

The file is memory-mapped read-only, so a region read touches only its bytes. The
header's voxel size is in ångström, in x, y, z order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VolumeError, VoxelSize


class MrcVolume(Volume):
    """An MRC file as a (z, y, x) volume; voxel size from the header, Å -> nm."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        mrc = self._open_mrc()
        try:
            data = mrc.data
            if data is None or data.ndim not in (2, 3):
                raise VolumeError(f"{self.path}: MRC data of shape {None if data is None else data.shape} is not a 2D or 3D image")
            self.shape = (1,) + data.shape if data.ndim == 2 else tuple(int(s) for s in data.shape)
            self.dtype = np.dtype(data.dtype).newbyteorder("=")
            vs = mrc.voxel_size  # record (x, y, z) in Å; all zero when unset
            sizes = (float(vs.z), float(vs.y), float(vs.x))
        finally:
            mrc.close()
        if min(sizes) > 0:
            self.voxel_size, self.voxel_size_known = VoxelSize(*(s / 10.0 for s in sizes)), True
        else:
            self.voxel_size, self.voxel_size_known = UNKNOWN_VOXEL_SIZE, False

    def _open_mrc(self):
        import mrcfile

        try:
            return mrcfile.mmap(self.path, mode="r")
        except Exception as err:  # mrcfile raises ValueError for bad headers and short files
            raise VolumeError(f"{self.path}: not a readable MRC file ({str(err).splitlines()[0][:200]})") from None

    def _open(self):
        mrc = self._open_mrc()
        data = mrc.data
        return data[None] if data.ndim == 2 else data

    def _read(self, zs, ys, xs) -> np.ndarray:
        return np.array(self.handle[zs, ys, xs], dtype=self.dtype)  # copy out of the map, native byte order
