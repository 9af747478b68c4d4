"""MAE: patchify, masking, loss on masked patches only, the unmodified backbone, learning."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pretrain_utils import TINY_VIT, fixed_batch_losses

from ssl_em.pretrain.mae import MAE, masked_mse, patchify, random_masking, unpatchify


def tiny_mae(**kw) -> MAE:
    torch.manual_seed(0)
    args = dict(backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY_VIT, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    return MAE(**{**args, **kw})


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 1, 32, 48)
    p = patchify(x, 8)
    assert p.shape == (2, 4 * 6, 64)
    # Patch 1 is the top row's second patch, pixels row-major, like timm's PatchEmbed.
    assert torch.equal(p[0, 1], x[0, 0, :8, 8:16].reshape(-1))
    assert torch.equal(unpatchify(p, 8, h=4, c=1), x)


def test_random_masking_shapes():
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75, "cpu")
    assert ids_keep.shape == (3, 4) and mask.shape == (3, 16) and ids_restore.shape == (3, 16)
    assert torch.all(mask.sum(1) == 12)
    assert torch.all(mask.gather(1, ids_keep) == 0)  # kept patches are the unmasked ones


def test_loss_only_on_masked_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0], mask[:, 1] = 1, 0
    base = masked_mse(pred, target, mask, norm_pix=True)
    visible = pred.clone()
    visible[mask == 0] += 10.0
    assert torch.allclose(masked_mse(visible, target, mask, norm_pix=True), base)
    masked = pred.clone()
    masked[mask == 1] += 10.0
    assert not torch.allclose(masked_mse(masked, target, mask, norm_pix=True), base)
    # Plain reference: mean over masked patches of per-patch MSE against raw targets.
    ref = torch.stack([((pred[b, l] - target[b, l]) ** 2).mean() for b in range(2) for l in range(16) if mask[b, l]]).mean()
    assert torch.allclose(masked_mse(pred, target, mask, norm_pix=False), ref)


def test_forward_shapes_and_grayscale():
    m = tiny_mae()
    out = m(torch.randn(2, 1, 32, 32))
    assert out["pred"].shape == (2, 16, 8 * 8 * 1)
    assert out["mask"].shape == (2, 16) and out["mask"].sum() == 2 * 12
    assert m.in_chans == 1 and m.backbone.patch_embed.proj.in_channels == 1


def test_backbone_is_unmodified_timm():
    m = tiny_mae()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=32, num_classes=0, **TINY_VIT)
    assert type(m.backbone) is type(ref)
    own = m.backbone.state_dict()
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(own, strict=True)


def test_reconstruction_grid():
    m = tiny_mae()
    x = torch.randn(3, 1, 32, 32)
    out = m(x)
    grid = m.reconstruction_grid(x, out["pred"], out["mask"])
    assert grid.ndim == 3 and grid.min() >= 0 and grid.max() <= 1
    header = grid[0, :14]  # a white strip with dark text above the three columns
    thirds = header.chunk(3, dim=1)
    assert all((part < 0.5).any() for part in thirds) and header.float().mean() > 0.7


def test_loss_decreases_on_fixed_batch():
    m = tiny_mae()
    x = torch.randn(8, 1, 32, 32).cumsum(-1).cumsum(-2) / 10  # smooth, learnable structure
    losses = fixed_batch_losses(m, x, steps=40)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_cnn_backbone_rejected_clearly():
    from ssl_em.backbones import BackboneError

    with pytest.raises(BackboneError, match="ViT"):
        MAE(backbone="resnet18", img_size=32, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_patchify_multichannel():
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 8), 8, h=2, c=3), x)


def test_reconstruction_logged_to_offline_wandb_as_uint8_em(tmp_path, monkeypatch):
    """A training step with wandb's offline logger (the default) stores the reconstruction
    grid as a PNG of uint8 pixels spanning a real EM range, read back from the run folder."""
    pytest.importorskip("wandb")
    import pytorch_lightning as pl
    from PIL import Image
    from pytorch_lightning.loggers import WandbLogger

    from ssl_em.synthetic import make_volume

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    em = make_volume(shape=(4, 32, 32), seed=0).image.astype(np.float32)
    tiles = torch.from_numpy((em - em.mean()) / em.std())[:, None]  # (4, 1, 32, 32), standardised
    loader = torch.utils.data.DataLoader([{"image": t} for t in tiles], batch_size=4)
    logger = WandbLogger(project="ssl_em_test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(max_steps=1, logger=logger, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_mae(image_every_n_steps=1), loader)
    logger.experiment.finish()
    (png,) = tmp_path.glob("wandb/offline-run-*/files/media/images/train/reconstruction_*.png")
    pixels = np.asarray(Image.open(png))
    assert pixels.dtype == np.uint8
    # rows of input | masked | reconstruction with 2 px padding, enlarged k-fold under a
    # header strip when the tiles are too narrow for the column headers
    k = pixels.shape[1] // (3 * 34 + 2)
    header = pixels.shape[0] - k * (4 * 34 + 2)
    assert pixels.shape[1] == k * (3 * 34 + 2) and pixels.shape[2] == 3 and 0 < header <= 20
    inputs = pixels[header + 2 * k : header + 34 * k : k, 2 * k : 34 * k : k, 0]  # the first row's input tile
    expected = np.round((tiles[0, 0].numpy() - tiles.numpy().min()) / (tiles.numpy().max() - tiles.numpy().min()) * 255)
    np.testing.assert_allclose(inputs, expected, atol=1)  # the EM itself, at full contrast
    assert inputs.std() > 20 and inputs.max() - inputs.min() > 128
