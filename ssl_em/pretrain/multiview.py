"""What the joint-embedding methods share (MoCo v3, SimCLR, BYOL, DINO): a timm backbone,
a list of augmented views of every tile (two of one size, or multi-crop's several sizes),
an optional teacher kept as the EMA of the student, and a training step that logs the loss
and the spread of features and projections (a collapsing run shows both falling towards 0).

Shapes: B batch, C channels, S a view's side.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_em.ema import cosine_momentum, ema_pairs, ema_update_
from ssl_em.backbones import build_backbone
from ssl_em.pretrain.base import PretrainMethod, embedding_std


class MultiViewMethod(PretrainMethod):
    """A timm backbone and `views` (x: (B, C, H, W) -> list of N views (B, C, S_i, S_i),
    e.g. `ssl_em.pretrain.views.MultiCrop`). Subclasses define `forward(*views)` returning
    {loss, features, projection} and, when they hold an EMA teacher, `ema_modules()` and
    `base_momentum`.

    The backbone is built for `img_size` (ViTs fix their input size unless
    `backbone_kwargs` sets `dynamic_img_size: true`, which views of several sizes need)."""

    #: Momentum at step 0 of the teacher, rising to 1 along a cosine (`cosine_momentum`).
    base_momentum: float = 0.99

    def __init__(self, backbone: str, img_size: int, backbone_kwargs: dict | None, views: nn.Module, **optim) -> None:
        super().__init__(**optim)
        self.backbone = build_backbone(backbone, in_chans=1, img_size=img_size, **(backbone_kwargs or {}))
        self.views = views
        self._momentum_step = -1  # the optimizer step the teacher was last updated for

    # -- EMA teacher ----------------------------------------------------------------------

    def ema_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(teacher modules, the student modules they average), paired in order; none by default."""
        return [], []

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) parameters paired by name, so a mismatch fails loudly instead of
        pairing the wrong tensors."""
        return ema_pairs(*self.ema_modules())

    def update_momentum(self, m: float) -> None:
        """teacher <- m * teacher + (1 - m) * student over the parameters of `ema_modules`, in
        one fused call (`ssl_em.ema`). Buffers are not averaged: the teacher runs in train
        mode and keeps its own BatchNorm statistics, as in MoCo v3, BYOL and DINO."""
        ema_update_(*self.ema_modules(), m)

    def before_step(self) -> dict[str, float]:
        """Called before each training step; returns extra scalars to log. The teacher moves
        once per optimizer step (the first micro-batch of each under gradient accumulation):
        k updates per step would make momentum 0.99 act like 0.99**k."""
        if not self.ema_modules()[0]:
            return {}
        m = cosine_momentum(self.global_step, self.total_steps(), self.base_momentum)
        if self._momentum_step != self.global_step:
            self.update_momentum(m)
            self._momentum_step = self.global_step
        return {"momentum": m}

    # -- training -------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]  # (B, 1, H, W), normalised
        extra = self.before_step()
        out = self(*self.views(imgs))
        extra.update({k: v for k, v in out.items() if k not in ("loss", "features", "projection")})
        self.log_step(out["loss"], imgs.shape[0], **extra, embed_std=embedding_std(out["features"]), proj_std=embedding_std(out["projection"]))
        return out["loss"]
