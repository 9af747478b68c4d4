"""Intensity statistics and the normalisation every stage of ssl_em shares.

EM contrast differs wildly between instruments and even between sessions, so intensities
are first stretched *per volume* with that volume's own robust percentiles (`lo`, `hi`),
then standardised with a fixed (mean, std) that the backbone records in its checkpoint.
Fine-tuning on a new lab's data computes the new volume's percentiles and reuses the
backbone's (mean, std), so the backbone sees the intensity distribution it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that ingest and inspect start fast
    import torch

    from ssl_em.data.volume import Volume

#: Percentiles recorded for every source; (0.5, 99.5) are the stretch window.
PERCENTILES = (0.1, 0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5, 99.9)


@dataclass
class IntensityStats:
    """Robust intensity statistics of one volume, in its raw units."""

    lo: float
    hi: float
    mean: float
    std: float
    min: float = 0.0
    max: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)

    @classmethod
    def compute(cls, values: np.ndarray) -> "IntensityStats":
        """Statistics of a sample of voxel values (any shape, any real dtype)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("cannot compute intensity statistics of an empty sample")
        q = np.percentile(v, PERCENTILES)
        pct = {f"p{p:g}": float(x) for p, x in zip(PERCENTILES, q)}
        lo, hi = pct["p0.5"], pct["p99.5"]
        if hi <= lo:  # nearly constant data: fall back to the full range
            lo, hi = float(v.min()), float(v.max())
        return cls(lo=lo, hi=hi, mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()), percentiles=pct)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityStats":
        return cls(**{k: d[k] for k in ("lo", "hi", "mean", "std", "min", "max", "percentiles") if k in d})


@dataclass(frozen=True)
class Normalization:
    """Standardisation after the percentile stretch: z = (stretch(x) - mean) / std.

    The defaults describe a stretched volume whose intensities fill [0, 1] roughly
    uniformly; a pretraining run measures and records its own.
    """

    mean: float = 0.5
    std: float = 0.25

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "stretch": "per-volume percentiles p0.5..p99.5"}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(mean=float(d["mean"]), std=float(d["std"]))


def normalize(x: "torch.Tensor", lo: "torch.Tensor | float", hi: "torch.Tensor | float", norm: Normalization) -> "torch.Tensor":
    """Stretch raw intensities to [0, 1] with (lo, hi), clip, then standardise.

    x: (B, C, ...) any dtype; lo, hi: scalars or (B,) per-sample windows.
    Returns float32 of the same shape.
    """
    import torch  # here, not at module level: ingest/inspect never need torch

    x = x.float()
    if isinstance(lo, torch.Tensor) and lo.ndim == 1:
        shape = (-1,) + (1,) * (x.ndim - 1)
        lo, hi = lo.view(shape).to(x), hi.view(shape).to(x)
    x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return (x - norm.mean) / norm.std


def normalize_numpy(x: np.ndarray, stats: IntensityStats, norm: Normalization) -> np.ndarray:
    """The same as `normalize` for one numpy array and one volume's statistics."""
    x = np.clip((x.astype(np.float32) - stats.lo) / (stats.hi - stats.lo), 0.0, 1.0)
    return (x - norm.mean) / norm.std


def sample_stats(volume: Volume, max_slices: int = 16) -> IntensityStats:
    """Intensity statistics from up to `max_slices` evenly spaced z-slices (bounded memory)."""
    from ssl_em.data.volume import VolumeError, check_finite

    zs = np.unique(np.linspace(0, volume.shape[0] - 1, min(max_slices, volume.shape[0])).round().astype(int))
    values = np.concatenate([volume.read(int(z)).ravel() for z in zs])
    where = f"{volume.path} (z {', '.join(map(str, zs[:8]))}{'...' if len(zs) > 8 else ''})"
    check_finite(values, where)
    if values.size and values.min() == values.max():
        # The percentile stretch would divide by zero: NaN tiles in training, all-zero
        # probabilities in prediction. A blank image has nothing to segment.
        raise VolumeError(f"{where}: every voxel is {values.min()}: a constant image has no contrast to learn from or segment")
    return IntensityStats.compute(values)
