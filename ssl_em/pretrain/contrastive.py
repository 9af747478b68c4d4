"""Contrastive pretraining: MoCo v3 (Chen, Xie & He 2021) and SimCLR (Chen et al. 2020).

Both hold an unmodified timm backbone (ViT or CNN) as `self.backbone`; its pooled features
(num_classes=0: the cls token for ViTs, global average pool for CNNs) feed MLP heads that are
dropped at export. Two views of every tile come from `views` (EM augmentations by default).
Negatives are gathered from all ranks (`ssl_em.pretrain.losses`), so a multi-GPU run trains
as one large batch; use `trainer.sync_batchnorm: true` with several GPUs so the heads'
BatchNorm sees the global batch too.

Shapes: B batch, F backbone features, H hidden width, D output dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_em.backbones import build_backbone
from ssl_em.ema import cosine_momentum, ema_pairs, ema_update_, frozen_copy
from ssl_em.pretrain.base import PretrainMethod, embedding_std
from ssl_em.pretrain.losses import info_nce, nt_xent
from ssl_em.pretrain.views import default_views


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """(Linear -> BN -> ReLU) x (layers - 1) -> Linear [-> BN without affine], as in MoCo v3."""
    mods: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*mods)


class TwoViewMethod(PretrainMethod):
    """What the contrastive methods share: a timm backbone, two augmented views of every tile,
    and a training step that logs the loss and the spread of features and projections (a
    collapsing run shows both falling towards 0). Subclasses define `forward(x1, x2)`."""

    def __init__(self, backbone: str, img_size: int, backbone_kwargs: dict | None, views: nn.Module | None, **optim) -> None:
        super().__init__(**optim)
        self.backbone = build_backbone(backbone, in_chans=1, img_size=img_size, **(backbone_kwargs or {}))
        self.views = views if views is not None else default_views(img_size)

    def before_step(self) -> dict[str, float]:
        """Called before each training step; returns extra scalars to log."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]  # (B, 1, H, W), normalised
        extra = self.before_step()
        out = self(self.views(imgs), self.views(imgs))
        self.log_step(out["loss"], imgs.shape[0], **extra, embed_std=embedding_std(out["features"]), proj_std=embedding_std(out["projection"]))
        return out["loss"]


class MoCoV3(TwoViewMethod):
    """Query encoder = backbone -> projector -> predictor; key encoder = momentum copies of
    backbone and projector. Symmetric InfoNCE between the two views."""

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        views: nn.Module | None = None,
        proj_layers: int = 3,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.99,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
    ) -> None:
        super().__init__(backbone, img_size, backbone_kwargs, views, base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters(ignore=["views"])
        self.temperature, self.base_momentum = temperature, momentum
        F = self.backbone.num_features
        self.projector = mlp(F, hidden_dim, out_dim, proj_layers, last_bn=True)
        self.predictor = mlp(out_dim, hidden_dim, out_dim, 2, last_bn=False)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self._momentum_step = -1  # the optimizer step the key encoder was last updated for

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(key, query) parameters paired by name, so a mismatch fails loudly instead of
        pairing the wrong tensors."""
        return ema_pairs([self.momentum_backbone, self.momentum_projector], [self.backbone, self.projector])

    def update_momentum(self, m: float) -> None:
        """key <- m * key + (1 - m) * query, for backbone and projector parameters, in one
        fused call over all tensors (`ssl_em.ema`). Buffers are not averaged: the key
        encoder runs in train mode and keeps its own BatchNorm statistics, as in MoCo v3."""
        ema_update_([self.momentum_backbone, self.momentum_projector], [self.backbone, self.projector], m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """x1, x2: (B, C, H, W) two views -> {loss, features (B, F) of view 1}."""
        f1, f2 = self.backbone(x1), self.backbone(x2)  # (B, F)
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))  # (B, D)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        # Each term x 2T as in the official code, which keeps the gradient scale, hence the
        # learning rate, independent of the temperature.
        loss = (info_nce(q1, k2, self.temperature) + info_nce(q2, k1, self.temperature)) * 2 * self.temperature
        return {"loss": loss, "features": f1, "projection": q1}

    def before_step(self) -> dict[str, float]:
        """The key encoder moves once per optimizer step (the first micro-batch of each under
        gradient accumulation): k updates per step would make momentum 0.99 act like 0.99**k."""
        m = cosine_momentum(self.global_step, self.total_steps(), self.base_momentum)
        if self._momentum_step != self.global_step:
            self.update_momentum(m)
            self._momentum_step = self.global_step
        return {"momentum": m}


class SimCLR(TwoViewMethod):
    """backbone -> projector for both views; NT-Xent over the 2N views of the global batch."""

    def __init__(
        self,
        backbone: str = "resnet50",
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        views: nn.Module | None = None,
        proj_layers: int = 2,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.1,
        base_lr: float = 1e-3,
        weight_decay: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
    ) -> None:
        super().__init__(backbone, img_size, backbone_kwargs, views, base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters(ignore=["views"])
        self.temperature = temperature
        self.projector = mlp(self.backbone.num_features, hidden_dim, out_dim, proj_layers, last_bn=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """x1, x2: (B, C, H, W) two views -> {loss, features (B, F) of view 1}."""
        f1, f2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(f1), self.projector(f2)  # (B, D)
        return {"loss": nt_xent(z1, z2, self.temperature), "features": f1, "projection": z1}
