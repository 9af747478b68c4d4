"""BYOL: bootstrap your own latent (Grill et al. 2020), on CNNs and ViTs.

An online network (backbone -> projector -> predictor) predicts, for each of two views, the
projection that a target network (EMA copies of backbone and projector, `ssl_em.ema`) gives
the other view. No negatives: the predictor and the slowly moving target keep it from
collapsing. Loss per pair: 2 - 2 cos(prediction, target projection), summed over both orders
(the symmetric loss), averaged over the batch; nothing is gathered across ranks (DDP averages
the gradients), so a multi-GPU run needs `trainer.sync_batchnorm: true` for the heads'
BatchNorm to see the global batch, as in the paper.

The heads are lightly's `BYOLProjectionHead` and `BYOLPredictionHead` (Linear -> BN -> ReLU
-> Linear). The online backbone is exported by default, as the authors do; `export_target`
exports the target instead.

Shapes: B batch, F backbone features, D projection dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from ssl_em.ema import frozen_copy
from ssl_em.pretrain.base import embedding_std
from ssl_em.pretrain.multiview import MultiViewMethod
from ssl_em.pretrain.views import MultiCrop, default_views


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """prediction, target: (B, D) -> mean over B of 2 - 2 cos, the squared distance of the
    l2-normalised vectors; in float32, and no gradient reaches the target."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()


class BYOL(MultiViewMethod):
    """Online = backbone -> projector -> predictor; target = EMA of backbone and projector."""

    def __init__(
        self,
        backbone: str = "resnet50",
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        views: nn.Module | None = None,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        momentum: float = 0.99,
        export_target: bool = False,
        base_lr: float = 1e-3,
        weight_decay: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
    ) -> None:
        """`views`: one view module, called twice (EM augmentations by default)."""
        super().__init__(backbone, img_size, backbone_kwargs, MultiCrop(views if views is not None else default_views(img_size), 2),
                         base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)  # fmt: skip
        self.save_hyperparameters(ignore=["views"])
        self.base_momentum, self.export_target = momentum, export_target
        self.projector = BYOLProjectionHead(self.backbone.num_features, hidden_dim, out_dim)
        self.predictor = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)

    def ema_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        return [self.target_backbone, self.target_projector], [self.backbone, self.projector]

    def deployable(self) -> str:
        return "target_backbone" if self.export_target else "backbone"

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """x1, x2: (B, C, H, W) two views -> {loss, features (B, F) and projection (B, D) of
        view 1, teacher_std (collapse detector on the target's features)}."""
        f = self.backbone(torch.cat([x1, x2]))  # (2B, F): one pass, BatchNorm over both views
        p1, p2 = self.predictor(self.projector(f)).chunk(2)  # (B, D) each
        with torch.no_grad():
            t_feat = self.target_backbone(torch.cat([x1, x2]))
            z1, z2 = self.target_projector(t_feat).chunk(2)
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return {"loss": loss, "features": f[: x1.shape[0]], "projection": p1, "teacher_std": embedding_std(t_feat)}
