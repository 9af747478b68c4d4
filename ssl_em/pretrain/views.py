"""The default pair of views for contrastive methods.

A view is any nn.Module over a normalised float batch (B, C, H, W) -> (B, C, size, size)
that draws fresh random parameters on each call; the method calls it once per view. The EM
augmentations live in `ssl_em.data.augment`; a recipe can pass any other module as `views`.
"""

from __future__ import annotations

from torch import nn

from ssl_em.data.augment import em_view


def default_views(img_size: int) -> nn.Module:
    """Random resized crop (25-100 % of the tile), dihedral flips/rotations, brightness,
    contrast, gamma, blur, noise and the occasional knife-mark stripe (see `em_view`)."""
    return em_view(img_size)
