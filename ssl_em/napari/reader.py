"""napari reader for `ssl-em predict` outputs: labels shown, named and coloured by class.

napari-ome-zarr (0.10) opens every label image hidden and named after its path
("labels/labels/semantic"). Its only hook for a name and visibility is an `omero` block on
the label image, whose contrast window (required by NGFF 0.4's models) it then hands to the
labels layer, which refuses it; so ssl_em's stores stay valid NGFF and this reader names them.
Where both plugins are installed napari asks which to use (or `napari --plugin ssl_em OUT.zarr`).

Layers (all at the prediction's voxel size, in nm): "<name>: classes" (class k stored as k + 1,
the store's colours, class names as features), "<name>: instances" when present, and one
hidden probability image per class, "<name>: p(<class>)".
"""

from __future__ import annotations

from pathlib import Path

from ssl_em import ngff

FORMAT = "ssl_em.prediction"  # ssl_em.inference.store.FORMAT, without importing torch


def _attrs(path: Path) -> dict:
    import json

    f = path / ".zattrs"
    try:
        return json.loads(f.read_text()).get("ssl_em", {}) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def get_reader(path):
    """npe2 reader: `read_prediction` for a complete ssl_em prediction folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    meta = _attrs(Path(path))
    return read_prediction if meta.get("format") == FORMAT and meta.get("complete") else None


def read_prediction(path) -> list[tuple]:
    """[(data, layer kwargs, "labels" | "image"), ...] for napari; data stays lazy (zarr)."""
    import zarr

    from ssl_em.data.readers.zarr_store import ome_zarr_levels

    path = Path(path[0] if isinstance(path, list) else path)
    meta, root = _attrs(path), zarr.open_group(str(path), mode="r")
    classes = [str(c) for c in meta.get("classes", [])]
    offset = int(meta.get("label_offset", 0))
    name = path.name.removesuffix(".zarr")
    common = {"units": ("nanometer",) * 3}
    layers = []
    if classes and "0" in root:
        from napari.utils.colormaps import Colormap

        maps = [Colormap([[0, 0, 0], _rgb(k)], name=f"ssl_em {c}") for k, c in enumerate(classes)]
        layers.append((root["0"], {"channel_axis": 0, "name": [f"{name}: p({c})" for c in classes], "scale": ome_zarr_levels(path)[0][1].as_tuple(), "visible": False,
                                   "contrast_limits": [[0, ngff.PROBABILITY_SCALE]] * len(classes), "colormap": maps, "blending": "additive", **common}, "image"))
    group = path / "labels" / "semantic"
    if group.is_dir():
        scale = ome_zarr_levels(group)[0][1].as_tuple()
        colors = {0: [0, 0, 0, 0], None: [0, 0, 0, 0]} | {k + offset: _rgb(k) + [1.0] for k in range(len(classes))}
        features = {"index": [k + offset for k in range(len(classes))], "class": classes}
        layers.append((root["labels/semantic/0"], {"name": f"{name}: classes", "scale": scale, "visible": True, "colormap": colors, "features": features, **common}, "labels"))
    group = path / "labels" / "instances"
    if group.is_dir():
        scale = ome_zarr_levels(group)[0][1].as_tuple()
        layers.append((root["labels/instances/0"], {"name": f"{name}: instances", "scale": scale, "visible": True, **common}, "labels"))
    return layers


def _rgb(k: int) -> list[float]:
    """Class k's colour in [0, 1], as the store's image-label lists it (ssl_em.ngff.PALETTE)."""
    hexa = ngff.PALETTE[k % len(ngff.PALETTE)]
    return [int(hexa[i : i + 2], 16) / 255 for i in (0, 2, 4)]
