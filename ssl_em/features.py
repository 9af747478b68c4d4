"""Multi-level feature maps from any timm backbone, through one mechanism.

timm 1.0 gives ViTs and CNNs alike `forward_intermediates(x, indices, intermediates_only=True)`
(returning NCHW maps) and a `feature_info` list of {num_chs, reduction, module}. ViTs list
one entry per block, all at reduction = patch size; CNNs one entry per stage at growing
reductions (2, 4, ..., 32). `FeatureExtractor` wraps the *unmodified* backbone, so its
`state_dict` keys are the backbone's own under `backbone.`, and picks which levels to return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """What the heads need to know about the feature maps a backbone yields.

    channels[i], reductions[i]: level i is (B, channels[i], H / reductions[i], W / reductions[i]).
    in_chans: channels of the input image (1 for EM).
    """

    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    in_chans: int = 1

    @property
    def columnar(self) -> bool:
        """True for ViT-like backbones whose levels all share one resolution."""
        return len(set(self.reductions)) == 1

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the coarsest reduction)."""
        return max(self.reductions)


def feature_info(backbone: nn.Module) -> list[dict]:
    """timm's per-level feature description; a clear error for models without one."""
    info = getattr(backbone, "feature_info", None)
    info = getattr(info, "info", info)  # features_only models hold a FeatureInfo object
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{type(backbone).__name__} has no timm feature_info/forward_intermediates; ssl_em heads need a timm >= 1.0 backbone")
    return list(info)


def default_indices(info: list[dict], num_levels: int = 4) -> list[int]:
    """ViTs: `num_levels` blocks evenly spaced and ending at the last (UNETR's 3, 6, 9, 12).
    CNNs: every stage."""
    n = len(info)
    if len({i["reduction"] for i in info}) > 1:
        return list(range(n))
    k = min(num_levels, n)
    return sorted({round((j + 1) * n / k) - 1 for j in range(k)})


class FeatureExtractor(nn.Module):
    """backbone(x: (B, in_chans, H, W)) -> list of (B, C_i, H / r_i, W / r_i), shallow to deep."""

    def __init__(self, backbone: nn.Module, indices: list[int] | None = None, in_chans: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        info = feature_info(backbone)
        n = len(info)
        # Checked before negative indices are wrapped: `i % n` maps any integer into range,
        # so 7 on a 4-level backbone silently became level 3.
        if indices is not None and (not indices or any(not -n <= i < n for i in indices)):
            raise ValueError(f"feature indices {list(indices)} out of range for a backbone with {n} levels (-{n}..{n - 1})")
        indices = default_indices(info) if indices is None else [i % n for i in indices]
        self.indices = sorted(set(indices))
        in_chans = in_chans if in_chans is not None else getattr(backbone, "in_chans", None) or _guess_in_chans(backbone)
        self.spec = FeatureSpec(
            channels=tuple(int(info[i]["num_chs"]) for i in self.indices),
            reductions=tuple(int(info[i]["reduction"]) for i in self.indices),
            in_chans=int(in_chans),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # stop_early: blocks past the deepest requested level are not run.
        return self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True, stop_early=True)


def _guess_in_chans(backbone: nn.Module) -> int:
    """Input channels from the first convolution (timm CNNs do not all store `in_chans`)."""
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 1
