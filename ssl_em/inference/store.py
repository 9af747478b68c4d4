"""The OUT.zarr store of a prediction: its layout, its identity, and the record of finished slabs.

OUT is OME-Zarr (zarr v2, NGFF 0.4)::

    OUT.zarr/                 image: class probabilities (c, z, y, x) uint8, p * 255, one
      0/                      named channel per class (omero), + "ssl_em" attrs
      labels/semantic/0       argmax class + 1 (z, y, x) uint8; 0 = not predicted
      labels/instances/0      instance ids (z, y, x) uint32, 0 = background (task "instance")
      planes/{xz,yz}/0        per-plane probabilities when --planes asks for more than xy

Every array carries the input's voxel size in nanometres, so it lies over the raw image in
napari and neuroglancer. Probabilities are uint8 because neuroglancer reads no float16 and
1/255 is finer than any threshold on a softmax (`ssl_em.ngff`); read them back with
`read_probabilities`. Semantic labels are shifted by one because viewers draw 0 as
background: class k is k + 1, named and coloured in the labels' `image-label` metadata.
Each finished slab is recorded as its own marker file (OUT.zarr/.progress/PLANE/START), not in
a shared attribute, so processes sharing a prediction never overwrite each other's record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_em import ngff
from ssl_em.data.volume import Volume, VoxelSize

FORMAT = "ssl_em.prediction"
#: Layout of OUT (uint8 probabilities, labels shifted by one): part of a prediction's identity,
#: so a store written by an older ssl_em is never resumed into.
LAYOUT = 2
#: plane -> (axis sliced, output axes of the 2D image in (z, y, x) order)
PLANES = {"xy": 0, "xz": 1, "yz": 2}


class PredictionExistsError(FileExistsError):
    """OUT already holds another prediction; nothing was written."""


@dataclass
class PredictSettings:
    window: int
    overlap: int
    slab: int = 8
    batch_size: int = 4
    planes: tuple[str, ...] = ("xy",)
    instances: str | None = None  # None, "2d" or "3d"
    seed_threshold: float = 0.5
    min_size: int = 16
    block: tuple[int, int, int] = (64, 512, 512)  # 3D instances: segmented block by block
    halo: int = 8  # 3D instances: context voxels around each block

    def identity(self) -> dict:
        """What makes two predictions the same (batch size and slab do not change results)."""
        blocks = {"block": list(self.block), "halo": self.halo} if self.instances == "3d" else {}
        return {"window": self.window, "overlap": self.overlap, "planes": list(self.planes), "instances": self.instances, "seed_threshold": self.seed_threshold, "min_size": self.min_size} | blocks


class Prediction:
    """The OUT.zarr store: creation, the identity check, and the record of finished slabs."""

    def __init__(self, path: str | Path, identity: dict, shape: tuple[int, int, int], classes: list[str], settings: PredictSettings, overwrite: bool = False, label_values: list[int] | None = None, voxel_size: VoxelSize | None = None) -> None:
        import zarr

        self.path = Path(path)
        existing = self._read_attrs(self.path)
        if self.check(self.path, identity, overwrite):
            shutil.rmtree(self.path)
            existing = None
        self.root = zarr.open_group(str(self.path), mode="a", zarr_format=2)
        K, (Z, Y, X) = len(classes), shape
        cy, cx = min(Y, 512), min(X, 512)
        if existing is None:
            # Marked as ours before anything else is written: a store cut short by a crash is
            # still recognisably a prediction that --overwrite may replace (its identity, None
            # until the end, matches no run, so none resumes into it).
            self.root.attrs["ssl_em"] = {"format": FORMAT, "identity": None, "complete": False}
            # voxel_size None (the input records none): one per voxel and no unit, rather
            # than a 1 nm that viewers would show as a measurement.
            zyx, units = list((voxel_size or VoxelSize(1.0, 1.0, 1.0)).as_tuple()), voxel_size is not None
            image_attrs = {"multiscales": [ngff.multiscales("probabilities", "czyx", [[1.0, *zyx]], units=units)], "omero": ngff.omero(classes, (0, ngff.PROBABILITY_SCALE))}
            self.root.create_array("0", shape=(K, Z, Y, X), chunks=(1, settings.slab, cy, cx), dtype="uint8", fill_value=0, overwrite=True)
            labels = self.root.require_group("labels")
            names = ["semantic"] + ["instances"] * bool(settings.instances)
            labels.attrs["labels"] = names
            # Class k is stored as k + 1: uint8 holds 254 classes, more need uint16.
            semantic_dtype = "uint8" if K + ngff.LABEL_OFFSET <= np.iinfo(np.uint8).max else "uint16"
            for name, dtype in zip(names, (semantic_dtype, "uint32")):
                g = labels.require_group(name)
                g.create_array("0", shape=(Z, Y, X), chunks=(settings.slab, cy, cx), dtype=dtype, fill_value=0, overwrite=True)
                # Instance ids name no class: image-label without colours (the viewer picks them).
                label = ngff.image_label(classes) if name == "semantic" else {"version": ngff.VERSION, "source": {"image": "../../"}}
                g.attrs.update({"multiscales": [ngff.multiscales(name, "zyx", [zyx], units=units)], "image-label": label})
            for plane in settings.planes[1:] if len(settings.planes) > 1 else ():
                # A slab along the sliced axis fills whole chunks: processes never share one.
                chunks = [1, min(Z, 64), min(Y, 256), min(X, 256)]
                chunks[1 + PLANES[plane]] = settings.slab
                g = self.root.require_group("planes").require_group(plane)
                g.create_array("0", shape=(K, Z, Y, X), chunks=tuple(chunks), dtype="uint8", fill_value=0, overwrite=True)
                g.attrs.update(image_attrs | {"multiscales": [ngff.multiscales(f"probabilities {plane}", "czyx", [[1.0, *zyx]], units=units)]})
            meta = {"format": FORMAT, "identity": identity, "classes": classes, "label_values": label_values, "label_offset": ngff.LABEL_OFFSET, "complete": False}
            self.root.attrs.update(image_attrs | {"ssl_em": meta})
        self.meta = dict(self.root.attrs["ssl_em"])
        self.progress = self.path / ".progress"

    @staticmethod
    def _read_attrs(path: Path) -> dict | None:
        """The "ssl_em" attributes at `path`; None when there are none or they are unreadable
        (a foreign or damaged store: `check` then refuses it)."""
        f = path / ".zattrs"
        try:
            attrs = json.loads(f.read_text()) if f.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return attrs.get("ssl_em") if isinstance(attrs, dict) else None

    @classmethod
    def check(cls, path: str | Path, identity: dict, overwrite: bool) -> bool:
        """True if `path` holds something to replace; PredictionExistsError if it may not be.
        --overwrite replaces an earlier ssl_em prediction only (its "ssl_em" attributes say
        so): anything else at `path` (the input, a model, an archive, the user's files) is
        refused, never deleted."""
        path = Path(path)
        existing = cls._read_attrs(path)
        if isinstance(existing, dict) and existing.get("format") == FORMAT and existing.get("identity") == identity:
            gone = [a for a in cls.arrays(identity) if not (path / a / ".zarray").is_file()]
            if not gone:
                return False  # this very prediction: resume it (or nothing to do)
            if not overwrite:  # e.g. labels/ deleted by hand: do not report it done
                raise PredictionExistsError(f"{path}: holds this prediction but {', '.join(gone)} is missing (deleted?); "
                                            "pass --overwrite to predict it again")
            return True
        if not (path.exists() and any(path.iterdir())):
            return False
        if not isinstance(existing, dict) or existing.get("format") != FORMAT:
            raise PredictionExistsError(f"{path}: is not an ssl_em prediction; refusing to write there, even with --overwrite, "
                                        "which only replaces an earlier prediction (choose another --out)")
        if not overwrite:
            theirs = (existing or {}).get("identity", {})
            what = "is not an ssl_em prediction" if existing is None else "holds another prediction (different " + ", ".join(sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))) + ")"
            raise PredictionExistsError(f"{path}: {what}; refusing to overwrite (pass --overwrite, or choose another --out)")
        return True

    @staticmethod
    def arrays(identity: dict) -> list[str]:
        """The arrays a prediction with this identity holds, relative to OUT."""
        planes = identity.get("planes") or ["xy"]
        return (["0", "labels/semantic/0"] + ["labels/instances/0"] * bool(identity.get("instances"))
                + [f"planes/{p}/0" for p in planes[1:]] * (len(planes) > 1))

    def done(self, step: str) -> set[int]:
        folder = self.progress / step
        return {int(f.name) for f in folder.iterdir()} if folder.is_dir() else set()

    def mark(self, step: str, item: int, rank: int = 0) -> None:
        """Record a finished slab (after its data, so a crash redoes it at worst). One file per
        slab, holding the rank that wrote it: processes sharing a prediction never rewrite each
        other's record."""
        (self.progress / step).mkdir(parents=True, exist_ok=True)
        (self.progress / step / str(item)).write_text(str(rank))

    def update(self, **meta) -> None:
        """Rank 0 only: the instance id offset, and `complete` once everything is written."""
        self.meta = {**self.meta, **meta}
        self.root.attrs["ssl_em"] = self.meta

    def array(self, name: str):
        return self.root[name]


def read_probabilities(array, region: tuple = ()) -> np.ndarray:
    """Stored probabilities (OUT.zarr's "0" or planes/*/0, or a region of them) as float32
    in [0, 1]; predictions written as float16 by earlier versions read the same."""
    return ngff.decode_probabilities(array[region] if region else array[...])


def semantic_classes(stored: np.ndarray, meta: dict) -> np.ndarray:
    """labels/semantic values -> class indices (int64); -1 where nothing was predicted.

    `meta`: the prediction's "ssl_em" attributes; stores without "label_offset" (written
    before labels were shifted) hold class indices as they are."""
    offset = int(meta.get("label_offset", 0))
    stored = np.asarray(stored).astype(np.int64)
    return np.where(stored >= offset, stored - offset, -1) if offset else stored


def volume_fingerprint(volume: Volume, spec: str | Path | None = None) -> str:
    """Identity of the input: the source's files (size, mtime) when it is a path, else shape,
    dtype and a hash of a few slices."""
    if spec is not None and not isinstance(spec, (np.ndarray, Volume)):
        from ssl_em.data.readers.open import source_fingerprint

        return source_fingerprint(spec)
    h = hashlib.sha256(f"{volume.shape}{np.dtype(volume.dtype)}".encode())
    for z in {0, volume.shape[0] // 2, volume.shape[0] - 1}:
        h.update(np.ascontiguousarray(volume.read(z)).tobytes())
    return h.hexdigest()[:16]


def prediction_identity(volume: Volume, settings: PredictSettings, model_id: str, input_id: str | None = None) -> dict:
    """What OUT must hold for a run to resume it rather than refuse it."""
    return {"model": model_id, "input": input_id or volume_fingerprint(volume), "shape": list(volume.shape), "layout": LAYOUT, **settings.identity()}


def model_fingerprint(path: str | Path) -> str:
    from ssl_em.finetune.model_folder import WEIGHTS

    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
