"""A folder of 2D images (PNG, TIFF, JPEG), one per z-slice, or a single 2D image file.

A folder means a z-stack when all its images share one shape and dtype. A folder of
images of different sizes (CEM500K's patches, crops from many sessions) is a set of
separate 2D images instead: `split_folder` says so, and ingest opens each file on its own.

Slices are ordered by a natural sort of their file names (`2.png` before `10.png`), the
order acquisition software numbers them in. Every file's header is checked when the
volume is opened, so a slice of the wrong size is reported up front, by name, instead of
failing hours into an ingest. Pixels are decoded only when a region is read, one file per
z-slice it covers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VolumeError

#: Suffixes read as 2D images, by decoder. TIFF goes through tifffile (16-bit, float,
#: every compression); the rest through Pillow.
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
#: What Pillow must recognise in a file of each suffix (it also opens HDF5 headers, as 0x0).
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES

#: Pillow modes that are already grayscale, and their numpy dtype.
_PIL_GRAY = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": np.float32, "1": np.uint8}


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: "2.png" < "10.png"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    """The 2D image files directly inside `folder`, naturally sorted (hidden files skipped)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


class ImageStackVolume(Volume):
    """2D image files stacked along z. All must share one shape and dtype."""

    def __init__(self, files: list[Path], path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self.files = [str(f) for f in files]
        if not self.files:
            raise VolumeError(f"{self.path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        first_shape, self.dtype = _header(self.files[0])
        for f in self.files[1:]:
            shape, dtype = _header(f)
            if (shape, dtype) != (first_shape, self.dtype):
                raise VolumeError(
                    f"{f}: image is {shape[0]}x{shape[1]} {np.dtype(dtype)} but {Path(self.files[0]).name} "
                    f"is {first_shape[0]}x{first_shape[1]} {np.dtype(self.dtype)}; all slices of {self.path} must match"
                )
        self.shape = (len(self.files),) + first_shape
        self.voxel_size, self.voxel_size_known = UNKNOWN_VOXEL_SIZE, False

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageStackVolume":
        return cls(image_files(Path(folder)), folder)

    def _open(self) -> list[str]:
        return self.files  # nothing stays open: each read decodes its files

    def _read(self, zs, ys, xs) -> np.ndarray:
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), self.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            out[i] = _decode(self.files[z], self.shape[1:])[ys, xs]
        return out


def split_folder(folder: str | Path) -> dict[Path, tuple[int, int]] | None:
    """{file: (height, width)} of the folder's images when they differ in shape or dtype
    (each one a 2D image of its own); None when they form one z-stack (or the folder is
    not an image folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    headers = {f: _header(str(f)) for f in image_files(folder)}
    if len(set(headers.values())) < 2:
        return None
    return {f: shape for f, (shape, _) in headers.items()}


def _header(file: str) -> tuple[tuple[int, int], np.dtype]:
    """(height, width) and dtype of a 2D image, from its header only."""
    try:
        if file.lower().endswith(TIFF_SUFFIXES):
            import tifffile

            with tifffile.TiffFile(file) as tif:
                page = tif.pages[0]
                if page.samplesperpixel not in (1, 3, 4) or len(tif.pages) > 1 and len(tif.series[0].shape) > 2:
                    raise VolumeError(f"{file}: not a 2D grayscale image (shape {tif.series[0].shape}); give multi-page TIFFs on their own")
                return (int(page.shape[0]), int(page.shape[1])), np.dtype(page.dtype)
        from PIL import Image

        with Image.open(file) as im:
            expected = _PIL_FORMATS.get(Path(file).suffix.lower())
            if im.format != expected or min(im.size) == 0:
                raise VolumeError(f"{file}: is not a {expected} image (its bytes are {im.format}, {im.width}x{im.height}); give it its real suffix")
            return (im.height, im.width), np.dtype(_PIL_GRAY.get(im.mode, np.uint8))
    except VolumeError:
        raise
    except Exception as err:
        raise VolumeError(f"{file}: unreadable image ({_first_line(err)})") from None


def _decode(file: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode one slice as a 2D array. Colour images become luminance: EM is grayscale,
    and a gray PNG saved as RGB by some viewer has three equal channels anyway."""
    try:
        if file.lower().endswith(TIFF_SUFFIXES):
            import tifffile

            arr = tifffile.imread(file, key=0)
            if arr.ndim == 3:  # RGB(A) samples: luminance, in the file's dtype
                arr = luminance(arr)
        else:
            from PIL import Image

            with Image.open(file) as im:
                im.load()  # decodes now, so a truncated file fails here, with its name
                arr = np.asarray(im if im.mode in _PIL_GRAY else im.convert("L"))
    except Exception as err:  # Pillow raises OSError("image file is truncated"), SyntaxError...
        raise VolumeError(f"{file}: unreadable or truncated image ({_first_line(err)})") from None
    if arr.shape != shape:
        raise VolumeError(f"{file}: decoded shape {arr.shape} differs from its header {shape}")
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) RGB(A) -> (...) ITU-R BT.601 luma in the input's dtype (rounded for integers)."""
    luma = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if rgb.dtype.kind in "ui":
        info = np.iinfo(rgb.dtype)
        luma = np.clip(np.rint(luma), info.min, info.max)
    return luma.astype(rgb.dtype)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
