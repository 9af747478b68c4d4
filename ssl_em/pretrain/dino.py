"""DINO: self-distillation with no labels (Caron et al. 2021), on ViTs and CNNs.

A student (backbone -> DINO head) learns to match, on every view, the output distribution
of a teacher (EMA copies of backbone and head, `ssl_em.ema`) on the two global views. The
teacher's outputs are centred (a running mean over batches and ranks, so one dimension
cannot dominate) and sharpened (a low temperature, warmed up linearly from
`warmup_teacher_temp`): the two together avoid collapse without negatives. Multi-crop: the
student also sees `local_crops` small crops of a small part of the tile, which the teacher
never sees, so it learns local-to-global correspondence (`ssl_em.pretrain.views.MultiCrop`).

The head and the loss (centring, temperatures, cross-entropy over view pairs) are lightly's
`DINOProjectionHead` and `DINOLoss`, which follow the authors' code; the centre is a buffer of
the loss (`criterion.center`), so checkpoints hold it and a resumed run continues it.
The teacher is exported (`deployable`), as the authors do: it is the better network
throughout training. Not implemented: the weight-decay schedule (0.04 -> 0.4), fixed here.

Shapes: B batch, F backbone features, K head output dimension (prototypes), V views.
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import nn

from ssl_em.errors import UserError
from ssl_em.ema import frozen_copy
from ssl_em.pretrain.base import embedding_std
from ssl_em.pretrain.multiview import MultiViewMethod
from ssl_em.pretrain.views import by_size, em_multicrop


def linear_warmup(step: int, steps: int, start: float, end: float) -> float:
    """start -> end linearly over `steps` steps, then end (DINO's teacher temperature)."""
    return end if step >= steps else start + (end - start) * step / max(1, steps)


class DINO(MultiViewMethod):
    """Student = backbone -> head on all views; teacher = EMA of both on the global views."""

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        views: nn.Module | None = None,
        global_size: int | None = None,
        local_size: int = 96,
        local_crops: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 65536,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        freeze_last_layer_steps: int = 1000,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_steps: int = 30000,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        clip_grad: float | None = 3.0,
        export_teacher: bool = True,
        base_lr: float = 5e-4,
        weight_decay: float = 0.04,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10000,
        min_lr_fraction: float = 0.002,
    ) -> None:
        """img_size: the tile the data module streams (linked from `data.tile_size`);
        global_size: the global crops' side (default img_size), which the backbone is built
        for; local_size: the local crops' side (ViTs need `backbone_kwargs:
        {dynamic_img_size: true}` when it differs). `views`, when given, replaces the EM
        multi-crop: it must return the two global views first, then any local ones."""
        global_size = global_size or img_size
        crops = views if views is not None else em_multicrop(global_size, local_size, local_crops, global_scale, local_scale)
        super().__init__(backbone, global_size, backbone_kwargs, crops, base_lr=base_lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)  # fmt: skip
        self.save_hyperparameters(ignore=["views"])
        if local_crops and local_size != global_size and getattr(self.backbone, "dynamic_img_size", True) is False:
            raise UserError(f"DINO: {backbone} is built for {global_size} px and the local crops are {local_size} px; "
                            "set --model.init_args.backbone_kwargs '{dynamic_img_size: true}' (or local_size to the global size)")
        self.base_momentum, self.export_teacher = momentum, export_teacher
        self.freeze_last_layer_steps, self.clip_grad = freeze_last_layer_steps, clip_grad
        self.teacher_temps = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup_steps)

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(self.backbone.num_features, hidden_dim, bottleneck_dim, out_dim, head_batch_norm, norm_last_layer=norm_last_layer)

        self.head = head()
        self.teacher_backbone = frozen_copy(self.backbone)
        # Not frozen_copy: the weight-normalised last layer holds a computed (non-leaf)
        # weight that deepcopy refuses, so the teacher head is built again and loaded.
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_head.requires_grad_(False)
        # The temperature is given per step (`teacher_temp`), so lightly's epoch warm-up is unused.
        self.criterion = DINOLoss(out_dim, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp, warmup_teacher_temp_epochs=1,
                                  student_temp=student_temp, center_momentum=center_momentum)  # fmt: skip

    def ema_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        return [self.teacher_backbone, self.teacher_head], [self.backbone, self.head]

    def deployable(self) -> str:
        return "teacher_backbone" if self.export_teacher else "backbone"

    def teacher_temp_at(self, step: int) -> float:
        start, end, steps = self.teacher_temps
        return linear_warmup(step, steps, start, end)

    def forward(self, *views: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: 2 global (B, C, Sg, Sg), then local (B, C, Sl, Sl) ones ->
        {loss, features (2B, F) and projection (2B, K) of the student on the global views,
        teacher_std (collapse detector on the teacher's features), teacher_temp}."""
        B = views[0].shape[0]
        with torch.no_grad():
            t_feat = self.teacher_backbone(torch.cat(views[:2]))  # (2B, F)
            t_out = self.teacher_head(t_feat).chunk(2)  # 2 x (B, K)
        s_feat, s_out = [], []
        for a, b in by_size(list(views)):  # one pass per crop size
            f = self.backbone(torch.cat(views[a:b]))  # ((b - a) B, F)
            s_feat.append(f)
            s_out += list(self.head(f).chunk(b - a))
        temp = self.teacher_temp_at(self.global_step)
        # Softmax of outputs divided by a temperature of 0.04 is float32, as in the authors' code.
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            loss = self.criterion([t.float() for t in t_out], [s.float() for s in s_out], teacher_temp=temp)
        return {"loss": loss, "features": s_feat[0][: 2 * B], "projection": torch.cat(s_out[:2]), "teacher_std": embedding_std(t_feat), "teacher_temp": temp}

    def on_after_backward(self) -> None:
        """The last layer stays fixed for the first steps (DINO: it helps the loss start falling)."""
        if self.global_step < self.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients clipped to norm `clip_grad` over the student, as in the authors' code
        (3.0). Here rather than through `trainer.gradient_clip_val`, which Lightning refuses
        with the fused AdamW every method uses: that optimizer unscales fp16 gradients itself,
        after this hook, so clipping is refused under 16-mixed (bf16 and fp32 have no scaler)."""
        if self.clip_grad and str(self.trainer.precision).startswith("16"):
            raise UserError("DINO: clip_grad needs bf16-mixed or 32-true precision (the fused AdamW unscales fp16 gradients after clipping); "
                            "set --trainer.precision bf16-mixed or --model.init_args.clip_grad null")
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.clip_grad)
