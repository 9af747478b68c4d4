"""Masked autoencoder (He et al. 2022) over an unmodified timm ViT.

The encoder is `self.backbone`, a plain `timm` VisionTransformer: we run its own patch_embed,
position embedding (with its cls/register tokens), blocks and norm on the visible patches
only, as facebookresearch/mae and lightly do, so export is `self.backbone.state_dict()`.
A light decoder (timm blocks, attention through scaled_dot_product_attention) predicts the
pixels of the masked patches; the loss is on masked patches only.

Shapes: B batch, C channels (1 for EM), L patches, p patch size, D encoder width,
Dd decoder width, P prefix tokens (cls + registers) of the backbone.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ssl_em.backbones import BackboneError, build_backbone
from ssl_em.pretrain import previews
from ssl_em.pretrain.base import PretrainMethod
from ssl_em.seeding import Generators


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: (B, C, H, W) -> (B, L, p*p*C), patches in row-major order like timm's PatchEmbed."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, h: int, c: int) -> torch.Tensor:
    """x: (B, L, p*p*C) -> (B, C, h*p, w*p) for an h-row patch grid."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p, c=c)


def random_masking(B: int, L: int, mask_ratio: float, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE), drawn from `generator`
    (on `device`; None = the global RNG).

    Returns ids_keep: (B, L_keep) visible patch indices, mask: (B, L) with 1 = masked,
    0 = visible, in the original patch order, and ids_restore: (B, L) to unshuffle.
    """
    n_keep = int(round(L * (1 - mask_ratio)))
    noise = torch.rand(B, L, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L, device=device)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], mask.gather(1, ids_restore), ids_restore


def use_fused_attention(module: nn.Module, fused: bool) -> None:
    """Switch every timm attention layer in `module` between F.scaled_dot_product_attention
    (fused: True) and timm's own explicit softmax(q k^T / sqrt(d)) v (False). The same
    attention either way; only the kernels differ, and no parameter or buffer changes."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over masked patches only.

    pred, target: (B, L, p*p*C); mask: (B, L), 1 = masked. With norm_pix each target patch is
    standardised by its own mean and variance (MAE's better-representations variant).
    """
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


class MAE(PretrainMethod):
    """MAE pretraining of any timm ViT on grayscale EM tiles."""

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
        image_every_n_steps: int = 1000,
    ) -> None:
        super().__init__(base_lr=base_lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_fraction=min_lr_fraction)
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, in_chans=1, img_size=img_size, **(backbone_kwargs or {}))
        if not all(hasattr(self.backbone, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")):
            raise BackboneError(f"MAE needs a ViT-style timm backbone (patch_embed, blocks, norm); {backbone} is not one")
        self.mask_ratio, self.norm_pix_loss, self.image_every_n_steps = mask_ratio, norm_pix_loss, image_every_n_steps
        # Masks from (run seed, rank): every GPU masks its tiles differently, and a seed repeats.
        self.mask_rng = Generators("mae.mask")
        self._attention_device: str | None = None  # the device type forward chose kernels for
        pe = self.backbone.patch_embed
        self.patch_size = pe.patch_size[0]
        self.grid = tuple(pe.grid_size)  # (h, w) patches
        self.in_chans = pe.proj.in_channels  # from the model, never assumed
        num_patches, width = self.grid[0] * self.grid[1], self.backbone.embed_dim

        # Decoder: its own width, learned position embedding, a mask token, then pixels.
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        for t in (self.mask_token, self.decoder_pos_embed):
            trunc_normal_(t, std=0.02)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (B, C, H, W) -> latent (B, P + L_keep, D), mask (B, L), ids_restore (B, L)."""
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(imgs))  # (B, P + L, D), prefix tokens first
        prefix, x = x[:, : vit.num_prefix_tokens], x[:, vit.num_prefix_tokens :]
        B, L, D = x.shape
        ids_keep, mask, ids_restore = random_masking(B, L, mask_ratio, x.device, self.mask_rng.get(x.device))
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, D))  # (B, L_keep, D)
        x = torch.cat([prefix, x], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.norm(vit.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, P + L_keep, D), ids_restore: (B, L) -> pred (B, L, p*p*C)."""
        P = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + L_keep, Dd)
        prefix, x = x[:, :P], x[:, P:]
        B, L = ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(B, L - x.shape[1], -1)], dim=1)  # (B, L, Dd), shuffled
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2])) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, x], dim=1)))
        return self.decoder_pred(x[:, P:])

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs: (B, C, H, W) -> {loss, pred (B, L, p*p*C), mask (B, L)}."""
        # On a CPU, torch's fused attention kernel is the slow one at MAE's short sequences:
        # at 65 tokens its backward under bf16 took 22% of a ViT-Ti MAE step, and the
        # explicit product ran 5.5x faster (fwd + bwd; 1.09x in float32). GPUs keep the
        # fused kernel (flash attention). benchmarks/RESULTS.md, "Issue 21 (session 8)".
        if imgs.device.type != self._attention_device:
            use_fused_attention(self, imgs.device.type != "cpu")
            self._attention_device = imgs.device.type
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_mse(pred, patchify(imgs, self.patch_size), mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]  # (B, 1, H, W), normalised
        out = self(imgs)
        self.log_step(out["loss"], imgs.shape[0])
        if self.image_every_n_steps:
            # Kept (8 tiles, detached) so the run's last step gets a grid too, in on_train_end.
            self._last_batch = (imgs[:8].detach(), out["pred"][:8].detach(), out["mask"][:8].detach())
            if self.global_step % self.image_every_n_steps == 0:
                self.log_reconstruction(*self._last_batch)
        return out["loss"]

    def on_train_end(self) -> None:
        """A reconstruction grid at the final step, whatever image_every_n_steps is."""
        last = getattr(self, "_last_batch", None)
        if last is not None and (self.global_step - 1) % self.image_every_n_steps != 0:  # not just drawn
            self.log_reconstruction(*last)

    # -- visualisation --------------------------------------------------------------------

    @torch.no_grad()
    def reconstruction_grid(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, n: int = 8) -> torch.Tensor:
        """Rows of (input, masked input, reconstruction with visible patches pasted in), as a
        (C, H', W') image in [0, 1]."""
        imgs, pred, mask = imgs[:n].float(), pred[:n].float(), mask[:n].float()
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:  # undo the per-patch standardisation with the true patch stats
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = mask[..., None]
        h, c = self.grid[0], self.in_chans
        masked = unpatchify(target * (1 - m), self.patch_size, h, c)
        recon = unpatchify(target * (1 - m) + pred * m, self.patch_size, h, c)
        return previews.reconstruction_grid(imgs, masked, recon)

    def log_reconstruction(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """To the logger if it takes images (wandb), else as a PNG in the run dir (rank 0)."""
        if self.trainer.is_global_zero:
            previews.log_image_grid(self, self.reconstruction_grid(imgs, pred, mask))
