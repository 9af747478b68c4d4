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
  (`ssl_em.inference.instance.instance_targets`), which the watershed turns back into ids.

Batches: {"image": (B, 1, T, T) float32 in [0, 1], "target": (B, T, T) int64}, and with
unlabeled slices (semi-supervised fine-tuning) "unlabeled": (B, 1, T, T) float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_em.data.labels import IGNORE, LabelError, parse_slices, semantic_targets
from ssl_em.data.normalize import IntensityStats, sample_stats
from ssl_em.data.readers.open import as_volume
from ssl_em.data.volume import Volume
from ssl_em.errors import check_at_least
from ssl_em.inference.instance import INSTANCE_CLASSES, instance_targets
from ssl_em.seeding import derive_seed, process_rank, process_world, run_seed

class SeededTiles(IterableDataset):
    """Plumbing of a random tile stream: `length` tiles per epoch over all ranks, each rank
    yielding ceil(length / ranks), split between its loader workers, each (epoch, rank,
    worker) drawing with its own generator seeded from (seed, epoch, rank, worker, *STREAM);
    seed None = the run's seed. Subclasses set `length`, `seed`, `epoch` and `draw(g)`."""

    #: Extra seed words that keep one stream's draws apart from another's.
    STREAM: tuple[int, ...] = ()

    def __len__(self) -> int:
        """Tiles per rank."""
        return -(-self.length // process_world())

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        base, extra = divmod(len(self), workers)
        seed = self.seed if self.seed is not None else run_seed()
        g = torch.Generator().manual_seed(derive_seed(seed, self.epoch, process_rank(), worker, *self.STREAM))
        self.epoch += 1  # counted by each copy (the main process's, or a persistent worker's)
        for _ in range(base + (worker < extra)):
            yield self.draw(g)


class TrainTiles(SeededTiles):
    """About `length` random tiles per epoch over all ranks: each rank yields ceil(length /
    ranks), split between its loader workers, so every rank has the same number of batches.
    Each (epoch, rank, worker) draws from its own generator seeded from (seed, epoch, rank,
    worker); seed None = the run's seed (`seed_everything`). A tile with no labeled pixel is
    redrawn (at most `retries` times).

    class_balance: with this probability a tile is centred on a labeled pixel of a class
    drawn uniformly among the classes present, otherwise placed uniformly. Rare classes
    (mitochondria are ~9% of pixels) then appear in about class_balance / K of the tiles'
    centres at least, instead of almost never in a batch of four.

    images: (n, H, W) float32; targets: (n, H, W) int64 with IGNORE; yields
    {"image": (1, T, T), "target": (T, T)}.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, tile: int, length: int, retries: int = 10, class_balance: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        self.images, self.targets = _pad_to(images, targets, tile)
        self.tile, self.length, self.retries, self.class_balance, self.seed = tile, length, retries, class_balance, seed
        flat = self.targets.ravel()
        # Flat indices of each present class's pixels, drawn from when a tile is class-balanced.
        self.by_class = [idx for idx in (np.flatnonzero(flat == k) for k in range(int(flat.max(initial=-1)) + 1)) if idx.size]
        # Counted by each copy (the main process's, or a persistent worker's): one pass = one epoch.
        self.epoch = 0

    def _corner(self, g: torch.Generator) -> tuple[int, int, int]:
        """(z, y, x) of a tile's corner: class-balanced with probability class_balance."""
        n, H, W = self.targets.shape
        t = self.tile
        if self.by_class and float(torch.rand((), generator=g)) < self.class_balance:
            idx = self.by_class[int(torch.randint(len(self.by_class), (), generator=g))]
            z, cy, cx = np.unravel_index(int(idx[int(torch.randint(idx.size, (), generator=g))]), (n, H, W))
            return int(z), int(np.clip(cy - t // 2, 0, H - t)), int(np.clip(cx - t // 2, 0, W - t))
        return int(torch.randint(n, (), generator=g)), int(torch.randint(H - t + 1, (), generator=g)), int(torch.randint(W - t + 1, (), generator=g))

    def draw(self, g: torch.Generator) -> dict:
        """One random tile {"image": (1, T, T), "target": (T, T)} drawn with `g`."""
        for _ in range(self.retries + 1):
            z, y, x = self._corner(g)
            target = self.targets[z, y : y + self.tile, x : x + self.tile]
            if (target != IGNORE).any():
                break
        image = self.images[z, y : y + self.tile, x : x + self.tile]
        return {"image": torch.from_numpy(image[None].copy()), "target": torch.from_numpy(target.copy())}


class UnlabeledTiles(SeededTiles):
    """Random tiles of unlabeled z-slices for semi-supervised fine-tuning, read from the
    volume as they are drawn (hundreds of slices need not fit in memory; a Volume reopens
    itself in each loader worker) and stretched to [0, 1] with the labeled data's `stats`.

    Per (epoch, rank, worker) a generator seeded from (seed, epoch, rank, worker, UNLABELED)
    places the tiles, so the labeled tiles (`TrainTiles`) are drawn exactly as without this
    stream. Slices smaller than the tile are padded by reflection. Yields
    {"unlabeled": (1, T, T) float32}; `length` tiles per epoch over all ranks.
    """

    #: Keeps this stream apart from `TrainTiles`' (seed, epoch, rank, worker) stream.
    UNLABELED = 0x5EED
    STREAM = (UNLABELED,)

    def __init__(self, volume: Volume, slices: list[int], stats: IntensityStats, tile: int, length: int, seed: int | None = None) -> None:
        super().__init__()
        if not slices:
            raise LabelError("no unlabeled slices to draw from")
        self.volume, self.slices, self.stats, self.tile, self.length, self.seed = volume, list(slices), stats, tile, length, seed
        self.epoch = 0

    def draw(self, g: torch.Generator) -> dict:
        """One tile {"unlabeled": (1, T, T)} of a random unlabeled slice, drawn with `g`."""
        _, H, W = self.volume.shape
        t = self.tile
        z = self.slices[int(torch.randint(len(self.slices), (), generator=g))]
        y, x = int(torch.randint(max(H - t, 0) + 1, (), generator=g)), int(torch.randint(max(W - t, 0) + 1, (), generator=g))
        raw = self.volume.read(z, slice(y, y + t), slice(x, x + t))[0].astype(np.float32)
        image = np.clip((raw - self.stats.lo) / (self.stats.hi - self.stats.lo), 0, 1)
        if image.shape != (t, t):
            image = np.pad(image, ((0, t - image.shape[0]), (0, t - image.shape[1])), mode="reflect" if min(image.shape) > 1 else "edge")
        return {"unlabeled": torch.from_numpy(image[None].copy())}


class WithUnlabeled(IterableDataset):
    """Each labeled tile of `labeled` (`TrainTiles`) with an unlabeled one of `unlabeled`
    (`UnlabeledTiles`) in the same sample: {"image", "target", "unlabeled"}, so one loader
    serves both and a batch holds as many unlabeled tiles as labeled ones."""

    def __init__(self, labeled: TrainTiles, unlabeled: UnlabeledTiles) -> None:
        super().__init__()
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return len(self.labeled)

    def __iter__(self):
        for a, b in zip(self.labeled, self.unlabeled, strict=True):
            yield {**a, **b}


#: `unlabeled_slices` value: every slice that is neither trained on nor scored.
REST = "rest"


def unlabeled_slices_for(spec: "str | Sequence[int] | None", n: int, train: list[int], scored: list[int]) -> list[int]:
    """The unlabeled slices semi-supervised fine-tuning may read: `spec` ("0-99", a list),
    or REST: every slice of the volume that is neither a training nor a validation/scored
    slice. None: none. A slice that trains or is scored is refused (LabelError): the scored
    slices must stay unseen, and a training slice is labeled already."""
    if spec is None:
        return []
    if isinstance(spec, str) and spec.strip() == REST:
        return sorted(set(range(n)) - set(train) - set(scored))
    idx = parse_slices(spec, n, "--unlabeled-slices")
    for what, taken in (("training", train), ("validation (scored)", scored)):
        clash = sorted(set(idx) & set(taken))
        if clash:
            raise LabelError(f"--unlabeled-slices: slices {clash} are also {what} slices")
    return idx


def split_holdout(images: np.ndarray, targets: np.ndarray, fraction: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Cut the bottom `fraction` of every labeled slice's rows off for model selection.

    images, targets: (n, H, W). Returns ((train images, train targets), (held-out images,
    held-out targets) or None). A band of every slice, not whole slices, so one labeled
    slice still leaves something to train on and something to validate with; the band is
    removed from training entirely, pixels and labels alike.
    """
    H = targets.shape[1]
    rows = int(round(H * fraction))
    if rows <= 0:
        return (images, targets), None
    if rows >= H:
        raise ValueError(f"holdout fraction {fraction} leaves no rows of the {H}-row slices to train on")
    return (images[:, : H - rows], targets[:, : H - rows]), (images[:, H - rows :], targets[:, H - rows :])


class GridTiles(IterableDataset):
    """Validation: each slice cut into non-overlapping tiles (padded with ignore), so every
    labeled pixel is scored exactly once, also over several ranks: rank r takes tiles r,
    r + ranks, r + 2 ranks..., with no tile repeated to even the shares out (a
    DistributedSampler would repeat some, and count their pixels twice). Instead every rank
    yields ceil(tiles / ranks), the short ones topped up with blank tiles that are all
    ignore (scored as nothing), and its loader worker w takes every workers-th of those: all
    ranks then run the same number of validation batches. A rank without a tile of its own
    (one held-out band over 8 GPUs) had an empty loader, which stops a DDP run (Lightning
    refuses it); and DDP syncs buffers (BatchNorm's) at the first validation forward, a
    collective every rank must reach."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, tile: int) -> None:
        n, H, W = targets.shape
        Hp, Wp = -(-H // tile) * tile, -(-W // tile) * tile
        self.images, self.targets = _pad_to(images, targets, tile, (Hp, Wp))
        self.tile = tile
        self.index = [(z, y, x) for z in range(n) for y in range(0, Hp, tile) for x in range(0, Wp, tile)]

    def __len__(self) -> int:
        """Tiles each rank yields (its share, topped up with blank ones)."""
        return -(-len(self.index) // process_world())

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = process_rank(), process_world()
        for k in range(worker, len(self), workers):
            i = rank + k * world
            yield self[i] if i < len(self.index) else self.blank()

    def __getitem__(self, i: int) -> dict:
        z, y, x = self.index[i]
        t = self.tile
        return {"image": torch.from_numpy(self.images[z, None, y : y + t, x : x + t].copy()), "target": torch.from_numpy(self.targets[z, y : y + t, x : x + t].copy())}

    def blank(self) -> dict:
        """A tile with no labeled pixel: {"image": (1, T, T) zeros, "target": (T, T) ignore}."""
        t = self.tile
        return {"image": torch.zeros(1, t, t, dtype=torch.from_numpy(self.images[:1, :1, :1]).dtype), "target": torch.full((t, t), IGNORE, dtype=torch.int64)}


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
    class_balance: chance that a training tile is centred on a pixel of a randomly chosen
    class (`TrainTiles`). holdout: fraction of every training slice's rows (a bottom band)
    kept out of training for model selection (`split_holdout`); when > 0 the validation
    loader serves that band, never the scored `val_slices`, which only `score_val_slices`
    reads. unlabeled_slices: z-slices whose images (never their labels) feed semi-supervised
    fine-tuning, "rest" for every slice neither trained on nor scored, None for none; then
    every training sample also holds an unlabeled tile ({"unlabeled": (1, T, T)},
    `UnlabeledTiles`). Training and validation slices are refused as unlabeled slices.
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
        class_balance: float = 0.5,
        holdout: float = 0.0,
        unlabeled_slices: "str | list[int] | None" = None,
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
        self.class_balance, self.holdout = class_balance, holdout
        self.stats = sample_stats(iv)

        raw = {z: lv.read(z)[0] for z in self.train_slices + self.val_slices}
        for z, r in raw.items():  # labels are whole numbers; NaN would fail as int(nan) below
            if r.dtype.kind == "f" and not (np.isfinite(r).all() and np.array_equal(r, np.round(r))):
                raise LabelError(f"labels {lv.path} slice {z}: holds NaN/Inf or fractional values; labels are class values or instance ids")
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
        self._train, self._holdout = split_holdout(np.stack([stretch(z) for z in self.train_slices]), np.stack([targets[z] for z in self.train_slices]), holdout)
        self._val = (np.stack([stretch(z) for z in self.val_slices]), np.stack([targets[z] for z in self.val_slices])) if self.val_slices else None
        self.unlabeled_slices = unlabeled_slices_for(unlabeled_slices, n, self.train_slices, self.val_slices)
        if unlabeled_slices is not None and not self.unlabeled_slices:
            raise LabelError(f"--unlabeled-slices {unlabeled_slices}: no slice of the volume's {n} is left unlabeled (all train or are scored)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labeled_pixels(self) -> int:
        """Labeled pixels the model trains on (held-out band excluded)."""
        return int((self._train[1] != IGNORE).sum())

    def train_dataloader(self) -> DataLoader:
        ds = TrainTiles(*self._train, self.tile_size, self.tiles_per_epoch, class_balance=self.class_balance)
        if self.unlabeled_slices:
            ds = WithUnlabeled(ds, UnlabeledTiles(self.images_volume, self.unlabeled_slices, self.stats, self.tile_size, self.tiles_per_epoch))
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=False, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out band of the training slices when there is one (model selection must
        not see the scored slices), else the validation slices (monitoring only)."""
        val = self._holdout if self._holdout is not None else self._val
        if val is None:
            return []
        return DataLoader(GridTiles(*val, self.tile_size), batch_size=self.batch_size, num_workers=self.num_workers)
