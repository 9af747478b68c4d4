"""NGFF (OME-Zarr 0.4) metadata that every ssl_em store writes, in one place.

What the viewers labs use need from a store, and why each choice here:

- `multiscales` with the true voxel size (nm) of every level, so a prediction lies exactly
  over its raw image in napari and neuroglancer.
- dtypes that neuroglancer's zarr reader knows (uint8/16/32/64, int8/16/32, float32; no
  float16). Probabilities are stored as uint8, p * 255 rounded (`encode_probabilities`):
  1/255 resolution is finer than any threshold one sets on a softmax, the store is half
  the size of float16 and a quarter of float32, and every viewer shows it without a
  contrast setting.
- `omero` channel names and colours, so napari names each probability layer after its class
  and each archive image after itself, opened at its robust contrast in grey.
- `image-label` colours and properties for label images, so each class has a name and a
  colour. Label value 0 is drawn as background by napari and neuroglancer, so class k is
  stored as k + LABEL_OFFSET and 0 means "not predicted".
- bioformats2raw layout for a collection of images (`collection_attrs`, `series_metadata`),
  the form of a multi-image store that napari-ome-zarr opens from its root (ome-zarr-py's
  `Reader` opens each image group).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

VERSION = "0.4"
#: Stored semantic label = class index + LABEL_OFFSET; 0 is left for "not predicted".
LABEL_OFFSET = 1
#: Probabilities p in [0, 1] are stored as round(p * PROBABILITY_SCALE) in uint8.
PROBABILITY_SCALE = 255

_AXIS_TYPES = {"c": "channel", "t": "time", "z": "space", "y": "space", "x": "space"}
#: Distinct colours (hex RGB) for classes and channels, in order; repeats past the end.
PALETTE = ("E6194B", "3CB44B", "4363D8", "FFE119", "F58231", "911EB4", "42D4F4", "F032E6", "BFEF45", "FABED4", "469990", "DCBEFF")


def axes(names: str | Sequence[str], units: bool = True) -> list[dict]:
    """NGFF axes; spatial ones in nanometres, or without a unit when the voxel size is not
    known (a scale of 1 per voxel then, which a unit would pass off as a measurement)."""
    return [{"name": a, "type": _AXIS_TYPES[a]} | ({"unit": "nanometer"} if units and _AXIS_TYPES[a] == "space" else {}) for a in names]


def multiscales(name: str, axis_names: str | Sequence[str], scales: Sequence[Sequence[float]], paths: Sequence[str] | None = None, kind: str | None = None, units: bool = True) -> dict:
    """One NGFF 0.4 multiscales entry: `scales[i]` is level i's spacing per axis (1 for c);
    units False: spatial axes carry no unit (the voxel size is unknown)."""
    paths = list(paths) if paths is not None else [str(i) for i in range(len(scales))]
    entry = {
        "version": VERSION,
        "name": name,
        "axes": axes(axis_names, units),
        "datasets": [{"path": p, "coordinateTransformations": [{"type": "scale", "scale": [float(v) for v in s]}]} for p, s in zip(paths, scales)],
    }
    return entry | ({"type": kind} if kind else {})


def omero(channel_names: Sequence[str], window: tuple[float, float], limits: tuple[float, float] | None = None, grey: bool = False) -> dict:
    """OMERO rendering metadata: one named channel per name, shown over `window` (the
    contrast limits viewers open with) within `limits` (the data's range; default `window`).
    Coloured channels by default; `grey` draws them black to white, as EM is looked at."""
    lo, hi = (float(v) for v in window)
    low, high = (float(v) for v in (limits or window))
    channels = [{"label": str(n), "color": "FFFFFF" if grey else PALETTE[k % len(PALETTE)], "active": True, "coefficient": 1.0, "family": "linear",
                 "inverted": False, "window": {"start": lo, "end": hi, "min": low, "max": high}} for k, n in enumerate(channel_names)]
    return {"version": VERSION, "channels": channels, "rdefs": {"model": "greyscale" if grey else "color"}}


def image_label(classes: Sequence[str], source: str = "../../", offset: int = LABEL_OFFSET) -> dict:
    """`image-label` of a label image whose value k + offset is class k (0: background)."""
    rgba = [[int(PALETTE[k % len(PALETTE)][i : i + 2], 16) for i in (0, 2, 4)] + [255] for k in range(len(classes))]
    return {
        "version": VERSION,
        "source": {"image": source},
        "colors": [{"label-value": k + offset, "rgba": c} for k, c in enumerate(rgba)],
        "properties": [{"label-value": k + offset, "class": str(n)} for k, n in enumerate(classes)],
    }


def encode_probabilities(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any float dtype) -> uint8 0..255."""
    return np.rint(np.clip(p, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint8)


def decode_probabilities(stored: np.ndarray) -> np.ndarray:
    """What `encode_probabilities` stored -> float32 in [0, 1]. Float arrays (predictions
    written before probabilities were uint8) are returned as they are."""
    stored = np.asarray(stored)
    if stored.dtype.kind == "f":
        return stored.astype(np.float32)
    return stored.astype(np.float32) / PROBABILITY_SCALE


# -- collections of images (bioformats2raw layout) -------------------------------------------


def collection_attrs() -> dict:
    """Root attributes of a bioformats2raw-layout store (images in numbered or named groups
    listed by OME/METADATA.ome.xml and OME/.zattrs "series")."""
    return {"bioformats2raw.layout": 3}


def series_metadata(names: Sequence[str]) -> dict:
    """Attributes of the OME group: the image groups in order."""
    return {"series": list(names)}


def ome_xml(images: Sequence[tuple[str, tuple[int, ...], str, tuple[float, float, float] | None]]) -> str:
    """A minimal OME-XML listing (name, (z, y, x) shape, numpy dtype, (z, y, x) nm) per image,
    as bioformats2raw writes beside the series. Each Image's ID is "Image:<group path>":
    napari-ome-zarr opens the group the ID names (bioformats2raw itself numbers the groups,
    so its IDs are "Image:0", "Image:1"...). Names must hold no whitespace (OME IDs)."""
    # OME's PixelType has no 64-bit integers and no half floats: such images are listed with
    # the type a reader should convert them to (never a narrower one that would wrap values).
    types = {"uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "int8": "int8", "int16": "int16", "int32": "int32", "float32": "float", "float64": "double",
             "float16": "float", "int64": "double", "uint64": "double", "bool": "bit"}
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
           'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd">']
    for i, (name, shape, dtype, vs) in enumerate(images):
        z, y, x = shape
        size = "" if vs is None else f' PhysicalSizeZ="{vs[0]:g}" PhysicalSizeZUnit="nm" PhysicalSizeY="{vs[1]:g}" PhysicalSizeYUnit="nm" PhysicalSizeX="{vs[2]:g}" PhysicalSizeXUnit="nm"'
        out += [f'  <Image ID="Image:{_xml_escape(name)}" Name="{_xml_escape(name)}">',
                f'    <Pixels ID="Pixels:{i}" DimensionOrder="XYZCT" Type="{_pixel_type(types, dtype)}" SizeX="{x}" SizeY="{y}" SizeZ="{z}" SizeC="1" SizeT="1"{size}>',
                f'      <Channel ID="Channel:{i}:0" SamplesPerPixel="1"/>',
                "    </Pixels>",
                "  </Image>"]
    return "\n".join(out + ["</OME>", ""])


def _pixel_type(types: dict, dtype) -> str:
    """OME PixelType of a numpy dtype (any byte order); "double" holds any other real type."""
    return types.get(np.dtype(dtype).name, "double")


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_json(path: Path, attrs: dict) -> None:
    """A zarr v2 .zattrs/.zgroup file, written whole then renamed."""
    import json

    from ssl_em.atomic import write_atomic

    write_atomic(path, json.dumps(attrs, indent=2) + "\n")
