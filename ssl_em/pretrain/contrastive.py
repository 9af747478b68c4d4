"""Contrastive pretraining: MoCo v3 (Chen, Xie & He 2021) and SimCLR (Chen et al. 2020).

Both hold an unmodified timm backbone (ViT or CNN) as `self.backbone`; its pooled features
(num_classes=0: the cls token for ViTs, global average pool for CNNs) feed MLP heads that are
dropped at export. Two views of every tile come from two calls of `views` (EM augmentations by
default; `ssl_em.pretrain.multiview` holds the shared training step and EMA teacher).
Negatives are gathered from all ranks (`ssl_em.pretrain.losses`), so a multi-GPU run trains
as one large batch; use `trainer.sync_batchnorm: true` with several GPUs so the heads'
BatchNorm sees the global batch too.

Shapes: B batch, F backbone features, H hidden width, D output dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_em.ema import cosine_momentum, frozen_copy  # noqa: F401 (cosine_momentum: imported from here by callers)
from ssl_em.pretrain.losses import info_nce, nt_xent
from ssl_em.pretrain.multiview import MultiViewMethod
from ssl_em.pretrain.views import MultiCrop, default_views


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


class MoCoV3(MultiViewMethod):
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
        super().__init__(backbone, img_size, backbone_kwargs, MultiCrop(views if views is not None else default_views(img_size), 2), base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters(ignore=["views"])
        self.temperature, self.base_momentum = temperature, momentum
        F = self.backbone.num_features
        self.projector = mlp(F, hidden_dim, out_dim, proj_layers, last_bn=True)
        self.predictor = mlp(out_dim, hidden_dim, out_dim, 2, last_bn=False)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)

    def ema_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The key encoder (backbone and projector copies) averages the query encoder's."""
        return [self.momentum_backbone, self.momentum_projector], [self.backbone, self.projector]

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


class SimCLR(MultiViewMethod):
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
        super().__init__(backbone, img_size, backbone_kwargs, MultiCrop(views if views is not None else default_views(img_size), 2), base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters(ignore=["views"])
        self.temperature = temperature
        self.projector = mlp(self.backbone.num_features, hidden_dim, out_dim, proj_layers, last_bn=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """x1, x2: (B, C, H, W) two views -> {loss, features (B, F) of view 1}."""
        f1, f2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(f1), self.projector(f2)  # (B, D)
        return {"loss": nt_xent(z1, z2, self.temperature), "features": f1, "projection": z1}
