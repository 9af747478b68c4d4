"""SparK-style masked modeling of CNN encoders: shapes, sparsity, learning, clean export."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from pretrain_utils import fixed_batch_losses

from ssl_em.backbones import BackboneError
from ssl_em.pretrain.spark import SparK


def tiny_spark(**kw) -> SparK:
    torch.manual_seed(0)
    return SparK(backbone="resnet18", img_size=64, decoder_width=32, **kw)


def test_forward_shapes_and_mask_ratio():
    m = tiny_spark(mask_ratio=0.5)
    x = torch.randn(3, 1, 64, 64)
    out = m(x)
    assert out["pred"].shape == x.shape
    assert out["mask"].shape == (3, 4)  # 32 px squares on a 64 px tile
    assert torch.equal(out["mask"].sum(1), torch.full((3,), 2.0))
    assert m._visible is None  # the encoder is dense again outside pretraining's forward


def test_hidden_squares_carry_no_information_from_visible_ones():
    """SparK's sparse convolution: whatever the visible pixels are, the deepest features at
    a hidden square are the same (a dense CNN would fill them from the neighbourhood)."""
    m = tiny_spark().eval()
    visible = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 1, 2, 2)  # top-right square hidden
    a = torch.randn(1, 1, 64, 64)
    b = a.clone()
    b[..., :32, :32] += torch.randn(1, 1, 32, 32)  # change a visible square only
    feats = []
    for x in (a, b):
        m._visible = visible
        try:
            feats.append(m.backbone.forward_intermediates(x * m._visible_at((64, 64)), indices=5, intermediates_only=True)[-1])
        finally:
            m._visible = None
    deep_a, deep_b = feats  # (1, 512, 2, 2)
    assert torch.allclose(deep_a[..., 0, 1], deep_b[..., 0, 1], atol=1e-5)
    assert not torch.allclose(deep_a[..., 0, 0], deep_b[..., 0, 0])


def test_batchnorm_is_sparse_its_statistics_come_from_visible_positions_only():
    """SparK's sparse BatchNorm: the first norm's running statistics move toward the mean and
    variance of the visible positions of its input (hidden ones are zeros, which dense
    statistics would count), and its output is zero on hidden squares."""
    m = tiny_spark(mask_ratio=0.5).train()
    seen = {}
    m.backbone.conv1.register_forward_hook(lambda mod, i, o: seen.setdefault("conv", o.detach()))
    m.backbone.bn1.register_forward_hook(lambda mod, i, o: seen.setdefault("norm", o.detach()))
    m(torch.randn(4, 1, 64, 64) + 0.5)
    x = seen["conv"]  # (4, 64, 32, 32), zero on hidden squares
    hidden = (x == 0).all(1, keepdim=True)  # (4, 1, 32, 32)
    assert 0.3 < hidden.float().mean() < 0.7
    visible = x.permute(0, 2, 3, 1)[~hidden[:, 0]]  # (N visible, 64)
    bn = m.backbone.bn1
    assert torch.allclose(bn.running_mean, 0.1 * visible.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * visible.var(0), atol=1e-4)
    assert not torch.allclose(bn.running_mean, 0.1 * x.mean((0, 2, 3)), atol=1e-3)  # what dense BN gives
    assert (seen["norm"] * hidden).abs().max() == 0 and bn.momentum == 0.1
    assert int(bn.num_batches_tracked) == 1 and "forward" not in vars(bn)  # counted once; dense again after


def test_loss_decreases_on_fixed_batch():
    m = tiny_spark()
    x = torch.randn(8, 1, 64, 64).cumsum(-1).cumsum(-2) / 20  # smooth, learnable structure
    losses = fixed_batch_losses(m, x, steps=30)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_backbone_is_unmodified_timm_and_hooks_do_not_travel():
    m = tiny_spark()
    ref = timm.create_model("resnet18", in_chans=1, num_classes=0)
    assert list(m.backbone.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(m.backbone.state_dict())  # strict: export needs no key surgery
    x = torch.randn(1, 1, 64, 64)
    m.eval(), ref.eval()
    assert torch.allclose(m.backbone(x), ref(x), atol=1e-5)  # hooks idle outside forward


def test_vit_rejected_clearly():
    with pytest.raises(BackboneError, match="MAE"):
        SparK(backbone="vit_tiny_patch16_224", img_size=64, backbone_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3})


def test_export_records_the_fine_tuning_recipe_spark_backbones_were_measured_with():
    """A SparK checkpoint names its recommended fine-tuning settings; the exported metadata
    carries them, so `ssl-em finetune` and the benchmark can use them without flags."""
    from types import SimpleNamespace

    from ssl_em.export import backbone_from_checkpoint

    m = tiny_spark()
    m._trainer = SimpleNamespace(datamodule=None)  # on_save_checkpoint reads the run's data from it
    ckpt = {"state_dict": m.state_dict(), "global_step": 3}
    m.on_save_checkpoint(ckpt)
    _, meta = backbone_from_checkpoint(ckpt)
    assert meta.finetune == SparK.finetune_recipe == {"unfreeze_at_step": 0, "backbone_lr_scale": 1.0}


def test_bf16_autocast_trains_with_float32_statistics():
    """Under bf16 autocast (the default on GPUs and on CPUs with bf16 units) the sparse norm
    computes its statistics in float32, keeps float32 running buffers, and gives the loss of
    float32 within bf16's rounding."""
    m = tiny_spark(mask_ratio=0.5).train()
    x = torch.randn(4, 1, 64, 64).cumsum(-1) / 8
    ref = tiny_spark(mask_ratio=0.5).train()
    ref.load_state_dict(m.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out["loss"].backward()
    fp32 = ref(x)["loss"]
    bn = m.backbone.bn1
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 1
    assert torch.isfinite(out["loss"]) and abs(out["loss"].item() - fp32.item()) < 0.05 * fp32.item()
    assert torch.allclose(bn.running_mean, ref.backbone.bn1.running_mean, atol=2e-2, rtol=5e-2)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_batchnormact_keeps_its_activation_in_the_sparse_pass():
    """timm's BatchNormAct2d subclasses BatchNorm2d; the sparse pass must apply its activation
    (a Hardtanh here, clamping to [-1, 1]), not drop it as a plain BatchNorm2d forward would."""
    import functools

    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    norm = functools.partial(BatchNormAct2d, act_layer=torch.nn.Hardtanh)
    m = SparK(backbone="resnet18", img_size=64, decoder_width=32, mask_ratio=0.5, backbone_kwargs={"norm_layer": norm}).train()
    assert isinstance(m.backbone.bn1, BatchNormAct2d)
    seen = {}
    m.backbone.bn1.register_forward_hook(lambda mod, i, o: seen.setdefault("out", o.detach()))
    m(torch.randn(2, 1, 64, 64) * 10)
    assert seen["out"].abs().max() <= 1.0 + 1e-6  # the activation ran
    assert seen["out"].abs().max() > 0.5


def test_unsupported_norm_layers_are_refused_by_name():
    class MyNorm(torch.nn.BatchNorm2d):
        pass

    m = tiny_spark()
    m.backbone.bn1 = MyNorm(64)
    with pytest.raises(BackboneError, match=r"bn1 \(MyNorm\)"):
        m(torch.randn(1, 1, 64, 64))


def test_norms_are_found_after_sync_batchnorm_conversion():
    """Lightning's sync_batchnorm swaps every BatchNorm2d for a SyncBatchNorm after the method
    is built: the sparse pass must run on the live modules (one process: SyncBatchNorm's own
    statistics, the sparse ones, equal plain BatchNorm's)."""
    m = tiny_spark(mask_ratio=0.5).train()
    m.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m.backbone)
    seen = {}
    m.backbone.conv1.register_forward_hook(lambda mod, i, o: seen.setdefault("conv", o.detach()))
    m(torch.randn(4, 1, 64, 64) + 0.5)
    bn = m.backbone.bn1
    assert isinstance(bn, torch.nn.SyncBatchNorm) and "forward" not in vars(bn)
    x = seen["conv"]
    hidden = (x == 0).all(1, keepdim=True)
    visible = x.permute(0, 2, 3, 1)[~hidden[:, 0]]
    assert torch.allclose(bn.running_mean, 0.1 * visible.mean(0), atol=1e-5)


def test_reconstruction_previews_go_to_the_csv_loggers_folder_every_n_steps(tmp_path):
    """image_every_n_steps 2 over 3 steps: grids at steps 0 and 2 (the last), as PNGs in the
    CSV logger's folder; each row is the input, the input with hidden squares blanked, and
    the input again on visible squares of the reconstruction. Off by default."""
    import numpy as np
    import pytorch_lightning as pl
    from PIL import Image
    from pytorch_lightning.loggers import CSVLogger


    x = torch.randn(4, 1, 64, 64).cumsum(-1).cumsum(-2) / 10
    loader = torch.utils.data.DataLoader([{"image": t} for t in x], batch_size=4)

    def fit(model, folder):
        logger = CSVLogger(str(folder))
        pl.Trainer(max_steps=3, logger=logger, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(model, loader)
        return Path(logger.log_dir) / "reconstructions"

    assert not fit(tiny_spark(), tmp_path / "off").exists()
    folder = fit(tiny_spark(image_every_n_steps=2), tmp_path / "on")
    assert sorted(p.name for p in folder.glob("*.png")) == ["step00000000.png", "step00000002.png"]
    png = np.asarray(Image.open(folder / "step00000000.png"))
    assert png.ndim == 3 and png.shape[0] > 4 * 64 and png.shape[1] > 3 * 64

    m = tiny_spark()
    out = m(x)
    s = m.square  # 32 px squares: a 2 x 2 grid per tile
    grid = m.reconstruction_grid(x, out["pred"], out["mask"])
    lo, hi = x.amin(), x.amax()
    scaled = ((x - lo) / (hi - lo + 1e-6)).clamp(0, 1)
    k = grid.shape[2] // (3 * 66 + 2)  # 64 px tiles, 2 px padding, enlarged k-fold for the headers
    top = grid.shape[1] - k * (4 * 66 + 2)  # the header strip's height
    tile = lambda row, col: grid[0, top + k * (2 + 66 * row) : top + k * (66 + 66 * row) : k, k * (2 + 66 * col) : k * (66 + 66 * col) : k]  # noqa: E731
    hidden = out["mask"].view(4, 2, 2).repeat_interleave(s, 1).repeat_interleave(s, 2).bool()  # (4, 64, 64)
    for r in range(4):
        torch.testing.assert_close(tile(r, 0), scaled[r, 0])
        torch.testing.assert_close(tile(r, 1)[~hidden[r]], scaled[r, 0][~hidden[r]])
        torch.testing.assert_close(tile(r, 1)[hidden[r]], ((0 - lo) / (hi - lo + 1e-6)).clamp(0, 1).expand(int(hidden[r].sum())))
        torch.testing.assert_close(tile(r, 2)[~hidden[r]], scaled[r, 0][~hidden[r]])
