"""Masked image modeling for CNN encoders, after SparK (Tian et al. 2023, "Designing BERT for
convolutional networks: sparse and hierarchical masked modeling").

A U-Net encoder is what a lab would otherwise train from scratch; this method pretrains that
encoder for dense prediction. The tile is cut into squares of the encoder's coarsest stride
(32 px for a ResNet) and `mask_ratio` of them are hidden. The encoder is the unmodified timm
CNN (`self.backbone`, so export is its own `state_dict`); what makes it "sparse" is a forward
hook on every convolution that zeroes its output on hidden squares, which is what SparK's
sparse convolution computes: hidden squares never leak into visible ones, however deep the
network, so the task cannot be solved by dilating the visible context a little. A light
U-Net decoder then sees the encoder levels with the hidden positions filled by a learned token
per level (SparK's densifying), climbs to stride 4 and predicts each 4 x 4 block of pixels
at once (pixel shuffle): full-resolution decoder convolutions would cost more CPU than the
encoder itself. The loss is the mean squared error on hidden squares only, against
per-square standardised pixels.

BatchNorm is sparse too, as in SparK: during the masked forward every BatchNorm2d runs
`_sparse_norm` instead of its own forward, which normalises with the mean and variance of
the visible positions only, updates the running statistics with them, and
leaves hidden positions at zero. Dense statistics would count 60% zeros, so the learned
scales and shifts would fit activations the fine-tuned (dense) network never sees. ResNet's
max-pool sees the zeros, which after a ReLU cannot win over visible values.

Shapes: B batch, C channels (1 for EM), H W tile, s mask square (px), L = (H/s)(W/s) squares.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from ssl_em.backbones import BackboneError, build_backbone
from ssl_em.features import feature_info
from ssl_em.layers import conv_block
from ssl_em.pretrain.base import PretrainMethod
from ssl_em.pretrain.mae import masked_mse, patchify, random_masking, unpatchify
from ssl_em.pretrain.previews import Previews, reconstruction_grid
from ssl_em.seeding import Generators


class SparK(PretrainMethod):
    """Sparse masked modeling of any timm CNN that has `forward_intermediates`."""

    # Fine-tune the whole encoder at the head's lr from step 0, exactly as a U-Net from
    # scratch: on ISBI at 1-2 slices this beat 0.1 x lr after 50 frozen steps by 0.011-0.022
    # Dice in all three pairs measured (benchmarks/RESULTS.md, session 5), and it makes the
    # benchmark's two CNN arms differ only in their initial weights.
    finetune_recipe = {"unfreeze_at_step": 0, "backbone_lr_scale": 1.0}

    def __init__(
        self,
        backbone: str = "resnet18",
        img_size: int = 128,
        backbone_kwargs: dict | None = None,
        mask_ratio: float = 0.6,
        decoder_width: int = 256,
        norm_pix_loss: bool = True,
        base_lr: float = 2e-3,
        weight_decay: float = 0.04,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
        image_every_n_steps: int = 0,
    ) -> None:
        super().__init__(base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, in_chans=1, img_size=img_size, **(backbone_kwargs or {}))
        info = feature_info(self.backbone)
        self.reductions = [int(i["reduction"]) for i in info]
        if len(self.reductions) < 2 or sorted(set(self.reductions)) != self.reductions:
            raise BackboneError(f"SparK needs a CNN whose levels have growing strides; {backbone} has reductions {self.reductions} (use MAE for ViTs)")
        self.square = max(self.reductions)
        if img_size % self.square:
            raise BackboneError(f"img_size {img_size} is not a multiple of {backbone}'s coarsest stride {self.square}")
        self.mask_ratio, self.norm_pix_loss, self.img_size = mask_ratio, norm_pix_loss, img_size
        self.in_chans = 1
        channels = [int(i["num_chs"]) for i in info]
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.decoder = LightDecoder(channels, self.reductions, self.in_chans, decoder_width)
        # Levels finer than the decoder's output stride (a ResNet's stride-2 stem) are never
        # read, so their tokens get no gradient, and DDP stops at the second step on a
        # trainable parameter that got none. They stay in the state dict (exports and
        # --init_from keep one layout), frozen.
        for i, token in enumerate(self.mask_tokens):
            token.requires_grad_(i in self.decoder.levels)
        self.mask_rng = Generators("spark.mask")  # per (seed, rank, worker, step), see ssl_em.seeding
        self._visible: torch.Tensor | None = None  # (B, 1, H/s, W/s), 1 = visible; set during forward
        self._hooks = [m.register_forward_hook(self._sparsify) for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        sparse_norms(self.backbone)  # refuses norm layers the sparse pass cannot stand in for, now
        # Off unless asked (the recipes ask): a grid costs a PNG or a wandb image per preview.
        self.previews = Previews(image_every_n_steps, self.reconstruction_grid)

    def _sparsify(self, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor | None:
        """Zero a convolution's output on hidden squares (SparK's sparse convolution)."""
        if self._visible is None:
            return None
        return out * self._visible_at(out.shape[-2:]).to(out.dtype)

    def _sparse_norm(self, module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """A batch norm's forward during masked training (SparK's sparse BatchNorm).

        x: (B, C, h, w), zero on hidden squares -> (B, C, h, w) normalised with the visible
        positions' mean and variance in training (which also move the running statistics,
        as the module's own forward would), with the running ones in eval; zero on hidden
        squares, so the next convolution sees them empty. Statistics are float32 whatever
        the autocast dtype (bf16 sums of thousands of positions lose digits, and the running
        buffers are float32); the result is cast back to x's dtype. A SyncBatchNorm sums
        over every rank (an all-reduce; tested in one process only so far); timm's BatchNormAct2d applies its activation after the norm."""
        v = self._visible_at(x.shape[-2:]).float()  # (B, 1, h, w)
        xf = x.float()
        if module.training or module.running_mean is None:
            sums = torch.cat([(xf * v).sum((0, 2, 3)), (xf * xf * v).sum((0, 2, 3)), v.sum().view(1)])  # (2C + 1,)
            if isinstance(module, nn.SyncBatchNorm) and _distributed():
                sums = torch.distributed.nn.functional.all_reduce(sums)  # differentiable sum over ranks
            c = x.shape[1]
            n = sums[-1].clamp_min(2.0)  # visible positions (each channel has them all)
            mean = sums[:c] / n  # (C,)
            var = (sums[c : 2 * c] / n - mean * mean).clamp_min(0.0)
            if module.training and module.track_running_stats:
                with torch.no_grad():
                    module.num_batches_tracked.add_(1)
                    m = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
                    module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), m)
                    unbiased = var.detach() * n / (n - 1)  # as torch keeps it
                    module.running_var.lerp_(unbiased.to(module.running_var.dtype), m)
        else:
            mean, var = module.running_mean.float(), module.running_var.float()
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + module.eps)
        if module.affine:
            y = y * module.weight.float().view(1, -1, 1, 1) + module.bias.float().view(1, -1, 1, 1)
        y = y.to(x.dtype)
        if isinstance(module, NORM_ACT):  # timm's fused norm + activation: keep the activation
            y = module.act(module.drop(y))
        return y * v.to(y.dtype)

    def _visible_at(self, size) -> torch.Tensor:
        """The visible-square mask (B, 1, h, w) at a feature map's resolution (nearest)."""
        return F.interpolate(self._visible, size=tuple(size), mode="nearest")

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs: (B, C, H, W) normalised -> {loss, pred (B, C, H, W), mask (B, L), 1 = hidden}."""
        B, _, H, W = imgs.shape
        h, w = H // self.square, W // self.square
        _, mask, _ = random_masking(B, h * w, self.mask_ratio, imgs.device, self.mask_rng.get(imgs.device))  # (B, L), 1 = hidden
        self._visible = (1 - mask).view(B, 1, h, w)
        # Each batch norm runs `_sparse_norm` instead of its dense forward, for this call only.
        # The norms are looked up now, not in __init__: Lightning's sync_batchnorm replaces
        # them with SyncBatchNorm modules after the method was built.
        norms = sparse_norms(self.backbone)
        for norm in norms:
            norm.forward = functools.partial(self._sparse_norm, norm)
        try:
            masked = imgs * self._visible_at((H, W)).to(imgs.dtype)
            feats = self.backbone.forward_intermediates(masked, indices=len(self.reductions), intermediates_only=True)
        finally:  # an error midway leaves every norm dense again
            visible, self._visible = self._visible, None
            for norm in norms:
                del norm.forward
        # Densify: hidden positions of every level take that level's learned token.
        dense = []
        for f, token in zip(feats, self.mask_tokens):
            v = F.interpolate(visible, size=f.shape[-2:], mode="nearest")
            dense.append(f * v.to(f.dtype) + token.to(f.dtype) * (1 - v).to(f.dtype))
        pred = self.decoder(dense)  # (B, C, H, W)
        loss = masked_mse(patchify(pred, self.square), patchify(imgs, self.square), mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]  # (B, 1, H, W), normalised
        out = self(imgs)
        self.log_step(out["loss"], imgs.shape[0])
        self.previews.step(self, imgs, out["pred"], out["mask"])
        return out["loss"]

    def on_train_end(self) -> None:
        self.previews.end(self)  # the last step's grid, if it was not just drawn

    @torch.no_grad()
    def reconstruction_grid(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs, pred: (n, C, H, W), mask: (n, L), 1 = hidden -> (C, H', W') in [0, 1]: rows
        of (input, input with hidden squares blanked, reconstruction: the prediction on
        hidden squares, brought back from per-square standardised pixels with each square's
        true mean and std, and the input on visible ones)."""
        imgs, s = imgs.float(), self.square
        target, out = patchify(imgs, s), patchify(pred.float(), s)  # (n, L, s*s*C)
        if self.norm_pix_loss:  # as masked_mse standardised the target
            out = out * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = mask.float()[..., None]
        h, c = imgs.shape[-2] // s, imgs.shape[1]
        masked = unpatchify(target * (1 - m), s, h, c)
        recon = unpatchify(target * (1 - m) + out * m, s, h, c)
        return reconstruction_grid(imgs, masked, recon)


#: Norm layers the sparse pass replaces: each runs `SparK._sparse_norm` during the masked
#: forward. Only exact classes: a subclass may do more in its forward than normalise (timm's
#: BatchNormAct2d applies an activation), so each one is listed with what it adds.
NORM_ACT = (BatchNormAct2d, SyncBatchNormAct)
SPARSE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm) + NORM_ACT


def sparse_norms(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's batch norms, each of a class the sparse pass stands in for. A norm of
    another class (a BatchNorm2d subclass, GroupNorm, LayerNorm2d) would see the hidden
    zeros in its statistics or lose behaviour of its own, so it is refused by name."""
    norms, other = [], []
    for name, m in backbone.named_modules():
        if type(m) in SPARSE_NORMS:
            norms.append(m)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            other.append(f"{name} ({type(m).__name__})")
    if other:
        raise BackboneError(f"SparK's sparse pass handles BatchNorm2d, SyncBatchNorm and timm's BatchNormAct2d only; "
                            f"this backbone also has {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}")
    return norms


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class LightDecoder(nn.Module):
    """U-Net decoder from the coarsest level up to stride `out_stride`, then pixels.

    features[i]: (B, channels[i], H / reductions[i], W / reductions[i]), strides growing.
    Levels finer than `out_stride` are not used. Returns (B, out_chans, H, W): a 1x1 conv
    gives out_stride^2 values per position, rearranged into pixels by PixelShuffle.
    """

    def __init__(self, channels: list[int], reductions: list[int], out_chans: int, width: int = 128, out_stride: int = 4) -> None:
        super().__init__()
        levels = [i for i, r in enumerate(reductions) if r >= out_stride]
        self.levels = levels[::-1]  # deep to shallow
        widths = [max(16, width >> k) for k in range(len(self.levels))]
        self.top = conv_block(channels[self.levels[0]], widths[0])
        self.stages = nn.ModuleList(conv_block(widths[k - 1] + channels[i], widths[k]) for k, i in enumerate(self.levels) if k > 0)
        self.out = nn.Sequential(nn.Conv2d(widths[-1], out_chans * out_stride**2, 1), nn.PixelShuffle(out_stride))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.top(features[self.levels[0]])
        for i, stage in zip(self.levels[1:], self.stages):
            skip = features[i]
            x = stage(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.out(x)
