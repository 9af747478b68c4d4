"""Views for the joint-embedding methods: the default contrastive view and multi-crop.

A view is any nn.Module over a normalised float batch (B, C, H, W) -> (B, C, size, size)
that draws fresh random parameters on each call. `MultiCrop` calls views to make the list a
method trains on: `n_global` calls of its global view (the size the backbone is built for),
then `n_local` calls of its local view (smaller crops of a smaller part of the tile, DINO's
multi-crop, Caron et al. 2020). The EM augmentations live in `ssl_em.data.augment`; a
recipe can pass any other module as a view.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_em.data.augment import em_view


def default_views(img_size: int) -> nn.Module:
    """Random resized crop (25-100 % of the tile), dihedral flips/rotations, brightness,
    contrast, gamma, blur, noise and the occasional knife-mark stripe (see `em_view`)."""
    return em_view(img_size)


class MultiCrop(nn.Module):
    """`n_global` views from `global_view`, then `n_local` from `local_view`.

    x: (B, C, H, W) -> list of n_global tensors (B, C, Sg, Sg) followed by n_local tensors
    (B, C, Sl, Sl). Global views come first: teachers see those only. Two views of one module
    are two calls of it (fresh draws each call); `local_view` must draw from other random
    streams than `global_view` (`em_view(..., stream=...)`), or at a given step its crops
    would repeat the global ones' parameters.
    """

    def __init__(self, global_view: nn.Module, n_global: int = 2, local_view: nn.Module | None = None, n_local: int = 0) -> None:
        super().__init__()
        if n_global < 1 or n_local < 0 or (n_local and local_view is None):
            raise ValueError(f"MultiCrop needs n_global >= 1 and a local view for n_local > 0 (got n_global={n_global}, n_local={n_local})")
        self.global_view, self.local_view = global_view, local_view
        self.n_global, self.n_local = n_global, n_local

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = [self.global_view(x) for _ in range(self.n_global)]
        return views + [self.local_view(x) for _ in range(self.n_local)]


def em_multicrop(global_size: int, local_size: int, n_local: int, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4)) -> MultiCrop:  # fmt: skip
    """DINO's multi-crop for EM tiles: two global EM views of `global_size` px from
    `global_scale` of the tile's area and `n_local` EM views of `local_size` px from
    `local_scale` of it (the paper's 224/96 px at (0.4, 1) and (0.05, 0.4) of ImageNet
    images), each with its own random streams."""
    return MultiCrop(em_view(global_size, crop_scale=global_scale, stream="multicrop.global"), 2,
                     em_view(local_size, crop_scale=local_scale, stream="multicrop.local") if n_local else None, n_local)


def by_size(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive views of one size, so a backbone runs once
    per size on their concatenation (DINO's MultiCropWrapper) instead of once per view."""
    runs: list[tuple[int, int]] = []
    for i, v in enumerate(views):
        if runs and views[runs[-1][0]].shape[-2:] == v.shape[-2:]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
