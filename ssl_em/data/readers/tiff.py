"""Multi-page and 2D TIFF through tifffile, memory-mapped when the file allows it.

Uncompressed, contiguous TIFFs (what ImageJ and most acquisition software write) are
memory-mapped, so a region read touches only the bytes of that region. Compressed or
scattered files are read through tifffile's zarr view of the file (`aszarr`), which
decodes only the strips or tiles of the pages a region covers, never the whole stack.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ssl_em.data.readers.image_stack import luminance
from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VolumeError, VoxelSize

#: Length units found in ImageJ and OME metadata, in nanometres.
_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0,
    "um": 1e3, "\u00b5m": 1e3, "\u03bcm": 1e3, "micron": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "mm": 1e6, "millimeter": 1e6, "å": 0.1, "angstrom": 0.1, "a": 0.1,
}


class TiffVolume(Volume):
    """A 2D or 3D grayscale (or RGB, read as luminance) TIFF as a (z, y, x) volume; voxel
    size from ImageJ/OME metadata."""

    def __init__(self, path: str | Path) -> None:
        import tifffile

        super().__init__()
        self.path = str(path)
        try:
            with _TiffComplaints() as complaints, tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                _check_complete(self.path, tif, series, complaints)
                # `tifffile.imwrite(path, stack)` of a (3, H, W) or (4, H, W) stack writes one
                # planar page that tifffile labels RGB(A) samples (axes "SYX") and reads back
                # as the stack it was given; so do we: its planes are slices, not colours.
                axes = "Z" + series.axes[1:] if series.axes == "SYX" else series.axes
                self.shape = _zyx_shape(self.path, series.shape, axes)
                self._axes = axes
                # The one axis the pages are stacked along (Z, T, I, Q...), or None for 2D.
                self._z_axis = next((a for a, n in zip(axes[:-2], series.shape[:-2]) if a not in "YXS" and n > 1), None)
                self.dtype = np.dtype(series.dtype)
                self._samples = int(dict(zip(axes, series.shape)).get("S", 1))  # 3/4: RGB(A)
                # dataoffset is set only for uncompressed data stored in one contiguous run.
                self._memmappable = series.dataoffset is not None
                voxel_size = _tiff_voxel_size(tif)
        except VolumeError:
            raise
        except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error...
            raise VolumeError(f"{self.path}: not a readable TIFF ({_first_line(err)})") from None
        self.voxel_size, self.voxel_size_known = (voxel_size, True) if voxel_size else (UNKNOWN_VOXEL_SIZE, False)

    def _open(self):
        import tifffile

        if self._memmappable:
            return tifffile.memmap(self.path, mode="r").reshape(self.shape + ((self._samples,) if self._samples > 1 else ()))
        import zarr

        return zarr.open_array(tifffile.TiffFile(self.path).aszarr(), mode="r")  # the store keeps the file open

    def _read(self, zs, ys, xs) -> np.ndarray:
        handle = self.handle
        if isinstance(handle, np.ndarray):
            return self._gray(np.array(handle[zs, ys, xs]))  # copy out of the memory map
        index = tuple(zs if a == self._z_axis else ys if a == "Y" else xs if a == "X" else slice(None) if a == "S" else 0 for a in self._axes)
        try:
            region = self._gray(handle[index])
        except Exception as err:
            raise VolumeError(f"{self.path}: cannot decode pages {zs.start}..{zs.stop - 1} ({_first_line(err)})") from None
        return region if self._z_axis else region[None]

    def _gray(self, region: np.ndarray) -> np.ndarray:
        """(..., S) colour samples -> luminance (a gray stack some viewer saved as RGB, an
        overlay export), as colour PNGs in image folders; grayscale passes through."""
        return region if self._samples == 1 else luminance(region)


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs while it parses a file. tifffile only *logs* a broken page
    chain (a file cut short) and then reads the pages before the break as the whole file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_TiffComplaints":
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("tifffile").removeHandler(self)


#: What tifffile logs when the page chain or the data is cut short.
_BROKEN = ("invalid page offset", "corrupted", "truncated", "invalid tag", "data are not contiguous")


def _check_complete(path: str, tif, series, complaints: _TiffComplaints) -> None:
    """Refuse a TIFF that is cut short, instead of reading the pages before the cut as the
    whole volume: tifffile's complaints, ImageJ's recorded page count, and the end of the
    pixel data against the file size."""
    pages = len(tif.pages)
    broken = [m for m in complaints.messages if any(b in m for b in _BROKEN)]
    expected = tif.imagej_metadata.get("images") if tif.is_imagej and tif.imagej_metadata else None
    if broken or (expected is not None and int(expected) > pages):
        what = f"holds {pages} readable page(s)" + (f" of the {expected} its metadata records" if expected else "")
        raise VolumeError(f"{path}: truncated or corrupt multi-page TIFF: {what} ({(broken or ['page count short'])[0].split('> ')[-1]})")
    if series.dataoffset is not None:
        end, size = series.dataoffset + series.nbytes, os.path.getsize(path)
        if end > size:
            page = series.nbytes // max(1, pages)
            raise VolumeError(f"{path}: truncated TIFF: pixel data end at byte {end} but the file has {size} bytes "
                              f"(pages {(size - series.dataoffset) // max(1, page)}..{pages - 1} are cut)")


def _zyx_shape(path: str, shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """Map a tifffile series shape to (z, y, x): singleton axes are dropped, and at most
    one other axis (Z, T, I, Q: whatever the pages are stacked along) becomes z."""
    if not axes.endswith("YX") and not axes.endswith("YXS"):
        raise VolumeError(f"{path}: TIFF axes {axes!r} have no Y, X plane")
    named = dict(zip(axes, shape))
    if named.get("S", 1) not in (1, 3, 4) or named.get("C", 1) > 1:
        raise VolumeError(f"{path}: TIFF has {max(named.get('S', 1), named.get('C', 1))} channels; ssl_em reads grayscale (or RGB, as luminance) volumes")
    stacked = [(a, n) for a, n in zip(axes[:-2], shape[:-2]) if a not in "YXS" and n > 1]
    if len(stacked) > 1:
        raise VolumeError(f"{path}: TIFF stacks pages along several axes {axes!r} {shape}; ssl_em reads (z, y, x)")
    z = stacked[0][1] if stacked else 1
    return (int(z), int(named["Y"]), int(named["X"]))


def _tiff_voxel_size(tif) -> VoxelSize | None:
    """Voxel size from OME-XML or ImageJ metadata; None when the file carries none.

    Plain TIFF resolution tags without ImageJ/OME metadata are ignored on purpose: they
    are usually a default of 72 dpi, not a pixel size.
    """
    if tif.is_ome and tif.ome_metadata:
        return _ome_voxel_size(tif.ome_metadata)
    if tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        scale = _UNIT_NM.get(str(meta.get("unit", "")).strip().lower())
        page = tif.pages[0]
        x_res, y_res = page.tags.get("XResolution"), page.tags.get("YResolution")
        if scale is None or x_res is None or y_res is None:
            return None
        x = x_res.value[1] / x_res.value[0] * scale  # tags hold pixels per unit as a fraction
        y = y_res.value[1] / y_res.value[0] * scale
        # ImageJ writes "spacing" only for stacks; a missing one means it was never set.
        z = float(meta["spacing"]) * scale if "spacing" in meta else x
        return VoxelSize(z, y, x)
    return None


def _ome_voxel_size(xml: str) -> VoxelSize | None:
    from tifffile import xml2dict

    try:
        image = xml2dict(xml)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, TypeError, IndexError):
        return None
    sizes = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = _UNIT_NM.get(str(pixels.get(f"PhysicalSize{axis}Unit", "µm")).lower())  # OME's default unit is µm
        sizes.append(None if value is None or unit is None else float(value) * unit)
    if sizes[1] is None or sizes[2] is None:
        return None
    return VoxelSize(sizes[0] if sizes[0] is not None else sizes[2], sizes[1], sizes[2])


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
