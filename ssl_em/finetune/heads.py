"""Light segmentation heads over a backbone's multi-level features.

Every head is built as `Head(spec: FeatureSpec, num_classes: int, **hyper)` and called as
`head(features, image) -> logits (B, K, H, W)`, where features is the list of
(B, C_i, H / r_i, W / r_i) maps a `FeatureExtractor` yields (shallow to deep) and image is
the normalised input (B, in_chans, H, W). Recipes choose a head by class path and set only
the hyper-parameters; (spec, num_classes) come from the backbone and the data, which is why
the fine-tuning module takes a head *factory* (`Callable[[FeatureSpec, int], nn.Module]`).

Each head keeps its hyper-parameters in `self.init_args` so an export can rebuild it.

- `LinearProbe`: BatchNorm + 1x1 conv over the concatenated levels, bilinear upsampling.
  Linear in the features: it measures what the frozen backbone already knows.
- `UNETRHead` (ViTs): all levels share the patch resolution; level j (from the deep end) is
  lifted by j transposed convolutions to patch/2^j and fused into a progressive upsampling
  decoder, as in UNETR (Hatamizadeh et al. 2022).
- `UNetHead` (CNNs): a U-Net/FPN decoder over stages at reductions 2..32.

Both decoders add a shallow full-resolution conv stem on the raw image: EM membranes are
1-3 px wide, far below a 16 px patch, and only a full-resolution path can place them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.features import FeatureSpec
from ssl_em.layers import conv_block


def _log2(r: int) -> int:
    k = int(round(math.log2(r)))
    if 2**k != r:
        raise ValueError(f"feature reduction {r} is not a power of two; the decoders upsample by 2 per stage")
    return k


class LinearProbe(nn.Module):
    """logits = upsample(conv1x1(BN(concat_i resize(f_i)))).

    features: list of (B, C_i, h_i, w_i); all are resized (bilinear) to the finest level.
    Returns (B, K, H, W) with (H, W) from `image`, or finest level x its reduction.
    """

    def __init__(self, spec: FeatureSpec, num_classes: int) -> None:
        super().__init__()
        self.init_args: dict = {}
        self.spec = spec
        c = sum(spec.channels)
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], 1)
        out = (image.shape[-2:] if image is not None else (size[0] * self.spec.reductions[0], size[1] * self.spec.reductions[0]))
        return F.interpolate(self.classifier(self.norm(x)), size=out, mode="bilinear", align_corners=False)


class _Decoder(nn.Module):
    """Shared plumbing: progressive x2 upsampling from reduction R down to 1.

    skips: {reduction: channels} available at each resolution (the image stem at 1).
    widths: decoder channels at each reduction R, R/2, ..., 1 (halving, floored at `min_width`).
    """

    def __init__(self, top_channels: int, skips: dict[int, int], top_reduction: int, num_classes: int, width: int, min_width: int) -> None:
        super().__init__()
        n = _log2(top_reduction)
        self.reductions = [top_reduction >> s for s in range(n + 1)]  # R, R/2, ..., 1
        widths = [max(min_width, width >> s) for s in range(n + 1)]
        self.top = conv_block(top_channels + skips.get(top_reduction, 0), widths[0])
        self.stages = nn.ModuleList(conv_block(widths[s - 1] + skips.get(r, 0), widths[s]) for s, r in enumerate(self.reductions) if s > 0)
        self.out = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, top: torch.Tensor, skips: dict[int, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """top: (B, C, H/R, W/R); skips[r]: (B, C_r, H/r, W/r); returns (B, K, H, W)."""
        x = self.top(_cat(top, skips.get(self.reductions[0])))
        for r, stage in zip(self.reductions[1:], self.stages):
            x = F.interpolate(x, size=(size[0] // r, size[1] // r), mode="bilinear", align_corners=False)
            x = stage(_cat(x, skips.get(r)))
        return self.out(x)


def _cat(x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    return x if skip is None else torch.cat([x, skip], 1)


class UNETRHead(nn.Module):
    """UNETR-like decoder for ViTs: features all (B, D, H/p, W/p).

    The deepest level starts the decoder at H/p; the j-th next shallower level is lifted by
    j transposed convs (x2 each) to H/(p/2^j) and concatenated there. A full-resolution
    conv stem over the image joins at the last stage.
    """

    def __init__(self, spec: FeatureSpec, num_classes: int, width: int = 128, min_width: int = 32, skip_width: int = 64, stem_width: int = 32) -> None:
        super().__init__()
        self.init_args = dict(width=width, min_width=min_width, skip_width=skip_width, stem_width=stem_width)
        if not spec.columnar:
            raise ValueError(f"UNETRHead needs ViT features at one resolution, got reductions {spec.reductions}; use UNetHead for CNNs")
        p = spec.reductions[0]
        n_up = _log2(p)
        if len(spec.channels) - 1 > n_up:
            raise ValueError(f"UNETRHead: {len(spec.channels)} feature levels but only {n_up} upsampling stages for patch {p}; pass fewer feature indices")
        # lifts[j] takes the level that is j+1 steps from the deep end up by j+1 doublings.
        self.lifts = nn.ModuleList()
        skips: dict[int, int] = {}
        for j, c in enumerate(reversed(spec.channels[:-1]), start=1):
            layers: list[nn.Module] = [nn.Conv2d(c, skip_width, 1)]
            for _ in range(j):
                layers += [nn.ConvTranspose2d(skip_width, skip_width, 2, stride=2), nn.BatchNorm2d(skip_width), nn.ReLU(inplace=True)]
            self.lifts.append(nn.Sequential(*layers))
            skips[p >> j] = skip_width
        self.stem = conv_block(spec.in_chans, stem_width)
        skips[1] = skips.get(1, 0) + stem_width
        self.decoder = _Decoder(spec.channels[-1], skips, p, num_classes, width, min_width)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """features: list of (B, D_i, H/p, W/p); image: (B, in_chans, H, W) -> (B, K, H, W)."""
        p = self.decoder.reductions[0]
        skips = {p >> j: lift(f) for j, (lift, f) in enumerate(zip(self.lifts, reversed(features[:-1])), start=1)}
        stem = self.stem(image)
        skips[1] = stem if 1 not in skips else torch.cat([skips[1], stem], 1)
        return self.decoder(features[-1], skips, image.shape[-2:])


class UNetHead(nn.Module):
    """U-Net/FPN decoder for CNN stages: features (B, C_i, H/r_i, W/r_i), r_i increasing.

    Each stage is projected (1x1) to `skip_width` channels and concatenated where the
    decoder reaches its resolution; a full-resolution conv stem joins at the end.
    """

    def __init__(self, spec: FeatureSpec, num_classes: int, width: int = 128, min_width: int = 32, skip_width: int = 64, stem_width: int = 32) -> None:
        super().__init__()
        self.init_args = dict(width=width, min_width=min_width, skip_width=skip_width, stem_width=stem_width)
        if len(set(spec.reductions)) != len(spec.reductions):
            raise ValueError(f"UNetHead needs one feature level per resolution, got reductions {spec.reductions}; use UNETRHead for ViTs")
        for r in spec.reductions:
            _log2(r)
        self.proj = nn.ModuleList(nn.Conv2d(c, skip_width, 1) for c in spec.channels[:-1])
        skips = {r: skip_width for r in spec.reductions[:-1]}
        self.stem = conv_block(spec.in_chans, stem_width)
        skips[1] = skips.get(1, 0) + stem_width
        self.decoder = _Decoder(spec.channels[-1], skips, spec.reductions[-1], num_classes, width, min_width)
        self.reductions = spec.reductions

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """features: list of (B, C_i, H/r_i, W/r_i); image: (B, in_chans, H, W) -> (B, K, H, W)."""
        skips = {r: proj(f) for r, proj, f in zip(self.reductions, self.proj, features)}
        stem = self.stem(image)
        skips[1] = stem if 1 not in skips else torch.cat([skips[1], stem], 1)
        return self.decoder(features[-1], skips, image.shape[-2:])


def default_head(spec: FeatureSpec, num_classes: int, **kwargs) -> nn.Module:
    """UNETRHead for ViT-like backbones (one resolution), UNetHead for CNNs; kwargs (e.g.
    width, min_width) go to the chosen head, default sizes otherwise."""
    return (UNETRHead if spec.columnar else UNetHead)(spec, num_classes, **kwargs)


#: ssl_em's own heads: the only classes a fine-tuned model folder may name (`head.class_path`).
HEADS: tuple[type[nn.Module], ...] = (LinearProbe, UNETRHead, UNetHead)
