"""Labeled slices for few-label fine-tuning: an images volume, a labels volume, and which
z-slices train and which validate.

Only the chosen slices are read (a few, by design), so they are held in memory. Images
are stretched to [0, 1] with the volume's own percentiles (`IntensityStats`, p0.5..p99.5);
the backbone's recorded (mean, std) is applied by the module on the device, because only
the module knows the backbone.

Targets are int64 class maps with -1 on unannotated pixels:
- semantic: raw label values map to classes by `label_values` (raw value of each class, in
  order; default: the sorted values found in the chosen slices); `ignore_value` marks
  unannotated pixels.
- instance: labels are instance ids; targets are background / boundary / interior
  (`ssl_em.finetune.instance.instance_targets`), which the watershed turns back into ids.

Batches: {"image": (B, 1, T, T) float32 in [0, 1], "target": (B, T, T) int64}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_em.data.normalize import IntensityStats
from ssl_em.data.volume import ArrayVolume, Volume
from ssl_em.errors import UserError, check_at_least
from ssl_em.finetune.instance import INSTANCE_CLASSES, instance_targets

IGNORE = -1


class LabelError(UserError):
    """Labels do not fit the images or the classes; the message names files, shapes or values."""


def as_volume(source: "str | Path | Volume | np.ndarray", voxel_size=None) -> Volume:
    """A Volume from a path/spec (any format `open_volume` reads), a Volume, or an array."""
    if isinstance(source, Volume):
        return source
    if isinstance(source, np.ndarray):
        return ArrayVolume(source)
    from ssl_em.data.readers.open import open_volume

    return open_volume(source, voxel_size=voxel_size)


def parse_slices(spec: "str | Sequence[int] | None", n: int, what: str = "slices") -> list[int]:
    """"0,1" / "20-29" (inclusive) / "0,5-7" / [3, 4] / negative ints from the end -> sorted indices.
    `what` names the flag in errors (LabelError)."""
    if spec is None:
        return []
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            a, sep, b = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
            except ValueError:
                raise LabelError(f"{what} {spec!r}: {part!r} is not a slice number or range like 20-29") from None
        spec = out
    try:
        idx = sorted({i % n if -n <= i < n else i for i in (int(s) for s in spec)})
    except (TypeError, ValueError):
        raise LabelError(f"{what} {spec!r}: not a list of slice numbers") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise LabelError(f"{what}: slice indices {bad[:10]} outside the volume's {n} z-slices (0..{n - 1})")
    return idx


def sample_stats(volume: Volume, max_slices: int = 16) -> IntensityStats:
    """Intensity statistics from up to `max_slices` evenly spaced z-slices (bounded memory)."""
    from ssl_em.data.volume import check_finite

    zs = np.unique(np.linspace(0, volume.shape[0] - 1, min(max_slices, volume.shape[0])).round().astype(int))
    values = np.concatenate([volume.read(int(z)).ravel() for z in zs])
    check_finite(values, f"{volume.path} (z {', '.join(map(str, zs[:8]))}{'...' if len(zs) > 8 else ''})")
    return IntensityStats.compute(values)


def semantic_targets(raw: np.ndarray, label_values: Sequence[int], ignore_value: int | None, where: str) -> np.ndarray:
    """Map raw label values to class indices 0..K-1 (and ignore_value to -1); name stray values."""
    lut = {int(v): k for k, v in enumerate(label_values)}
    if ignore_value is not None:
        lut[int(ignore_value)] = IGNORE
    values, inverse = np.unique(raw, return_inverse=True)
    stray = [int(v) for v in values if int(v) not in lut]
    if stray:
        raise LabelError(f"{where}: label values {stray[:10]} are not among the classes' values {list(label_values)} (ignore value: {ignore_value})")
    return np.array([lut[int(v)] for v in values], np.int64)[inverse].reshape(raw.shape)


class TrainTiles(Dataset):
    """`length` random tiles from the training slices; a tile with no labeled pixel is redrawn
    (at most `retries` times). Randomness is torch's, so seed_everything(workers=True) fixes it."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, tile: int, length: int, retries: int = 10) -> None:
        self.images, self.targets = _pad_to(images, targets, tile)
        self.tile, self.length, self.retries = tile, length, retries

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        n, H, W = self.targets.shape
        for _ in range(self.retries + 1):
            z = int(torch.randint(n, ()))
            y, x = int(torch.randint(H - self.tile + 1, ())), int(torch.randint(W - self.tile + 1, ()))
            target = self.targets[z, y : y + self.tile, x : x + self.tile]
            if (target != IGNORE).any():
                break
        image = self.images[z, y : y + self.tile, x : x + self.tile]
        return {"image": torch.from_numpy(image[None].copy()), "target": torch.from_numpy(target.copy())}


class GridTiles(Dataset):
    """Validation: each slice cut into non-overlapping tiles (padded with ignore), so every
    labeled pixel is scored exactly once."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, tile: int) -> None:
        n, H, W = targets.shape
        Hp, Wp = -(-H // tile) * tile, -(-W // tile) * tile
        self.images, self.targets = _pad_to(images, targets, tile, (Hp, Wp))
        self.tile = tile
        self.index = [(z, y, x) for z in range(n) for y in range(0, Hp, tile) for x in range(0, Wp, tile)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        z, y, x = self.index[i]
        t = self.tile
        return {"image": torch.from_numpy(self.images[z, None, y : y + t, x : x + t].copy()), "target": torch.from_numpy(self.targets[z, y : y + t, x : x + t].copy())}


def _pad_to(images: np.ndarray, targets: np.ndarray, tile: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad (n, H, W) images (reflect) and targets (ignore) to at least `size` (default tile x tile)."""
    H, W = targets.shape[1:]
    Hp, Wp = size or (max(H, tile), max(W, tile))
    if (Hp, Wp) == (H, W):
        return images, targets
    pad = ((0, 0), (0, Hp - H), (0, Wp - W))
    return np.pad(images, pad, mode="reflect" if min(H, W) > 1 else "edge"), np.pad(targets, pad, constant_values=IGNORE)


class LabeledSlicesDataModule(pl.LightningDataModule):
    """Few labeled z-slices of an images/labels volume pair.

    images, labels: paths (any format `open_volume` reads; HDF5 as `file.h5:/dataset`),
    Volumes or arrays. train_slices, val_slices: "0,1", "20-29", or lists of z indices.
    task: "semantic" (labels are class values) or "instance" (labels are instance ids;
    `zero_is_boundary`: id 0 marks boundaries between instances rather than background).
    tile_size: training tile side; tiles_per_epoch: random tiles per training epoch.
    """

    def __init__(
        self,
        images: "str | Path | Volume | np.ndarray",
        labels: "str | Path | Volume | np.ndarray",
        train_slices: "str | list[int]" = "0",
        val_slices: "str | list[int] | None" = None,
        task: Literal["semantic", "instance"] = "semantic",
        classes: list[str] | None = None,
        label_values: list[int] | None = None,
        ignore_value: int | None = None,
        zero_is_boundary: bool = True,
        tile_size: int = 128,
        tiles_per_epoch: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        voxel_size: str | None = None,
    ) -> None:
        super().__init__()
        check_at_least(1, {"--tile-size": tile_size, "--data.batch_size": batch_size, "--data.tiles_per_epoch": tiles_per_epoch}, LabelError)
        self.images_volume, self.labels_volume = as_volume(images, voxel_size), as_volume(labels, voxel_size)
        iv, lv = self.images_volume, self.labels_volume
        if tuple(iv.shape) != tuple(lv.shape):
            raise LabelError(f"labels {lv.path} shape {tuple(lv.shape)} != images {iv.path} shape {tuple(iv.shape)}")
        n = iv.shape[0]
        self.train_slices = parse_slices(train_slices, n, "--train-slices")
        self.val_slices = parse_slices(val_slices, n, "--val-slices")
        if not self.train_slices:
            raise LabelError("--train-slices: no training slices given")
        overlap = sorted(set(self.train_slices) & set(self.val_slices))
        if overlap:
            raise LabelError(f"--train-slices / --val-slices: slices {overlap} are both training and validation slices")
        self.task, self.tile_size, self.tiles_per_epoch = task, tile_size, tiles_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers
        self.stats = sample_stats(iv)

        raw = {z: lv.read(z)[0] for z in self.train_slices + self.val_slices}
        if task == "instance":
            self.classes = list(classes or INSTANCE_CLASSES)
            if len(self.classes) != len(INSTANCE_CLASSES):
                raise LabelError(f"instance task predicts {list(INSTANCE_CLASSES)}; got classes {self.classes}")
            self.label_values = None
            to_target = lambda r, z: instance_targets(r, zero_is_boundary=zero_is_boundary)  # noqa: E731
        else:
            found = sorted({int(v) for r in raw.values() for v in np.unique(r)} - {ignore_value})
            self.label_values = list(label_values) if label_values is not None else list(range(len(classes))) if classes else found
            self.classes = list(classes) if classes else [str(v) for v in self.label_values]
            if len(self.classes) != len(self.label_values):
                raise LabelError(f"{len(self.classes)} classes {self.classes} but {len(self.label_values)} label values {self.label_values}")
            to_target = lambda r, z: semantic_targets(r, self.label_values, ignore_value, f"labels {lv.path} slice {z}")  # noqa: E731
        self.ignore_value = ignore_value
        targets = {z: to_target(r, z) for z, r in raw.items()}
        stretch = lambda z: np.clip((iv.read(z)[0].astype(np.float32) - self.stats.lo) / (self.stats.hi - self.stats.lo), 0, 1)  # noqa: E731
        self._train = (np.stack([stretch(z) for z in self.train_slices]), np.stack([targets[z] for z in self.train_slices]))
        self._val = (np.stack([stretch(z) for z in self.val_slices]), np.stack([targets[z] for z in self.val_slices])) if self.val_slices else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_dataloader(self) -> DataLoader:
        ds = TrainTiles(*self._train, self.tile_size, self.tiles_per_epoch)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=False, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self._val is None:
            return []
        return DataLoader(GridTiles(*self._val, self.tile_size), batch_size=self.batch_size, num_workers=self.num_workers)
