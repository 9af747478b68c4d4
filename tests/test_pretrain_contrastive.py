"""MoCo v3 and SimCLR over ViT and CNN timm backbones: shapes, momentum, learning, views."""

from __future__ import annotations

import pytest
import torch
from pretrain_utils import TINY_VIT
from torch import nn

from ssl_em.pretrain.contrastive import MoCoV3, SimCLR, cosine_momentum, mlp
from ssl_em.pretrain.views import default_views

HEADS = {"hidden_dim": 32, "out_dim": 16}


def tiny(cls, backbone="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    kwargs = {"backbone_kwargs": TINY_VIT} if backbone.startswith("vit") else {}
    return cls(backbone=backbone, img_size=32, views=nn.Identity(), **kwargs, **HEADS, **kw)


def test_default_views_make_two_different_views():
    views = default_views(24)
    x = torch.randn(4, 1, 32, 32)
    a, b = views(x), views(x)
    assert a.shape == b.shape == (4, 1, 24, 24)
    assert not torch.allclose(a, b)


def test_mlp_heads():
    head = mlp(8, 16, 4, layers=3, last_bn=True)
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [MoCoV3, SimCLR])
@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "resnet18"])
def test_forward_shapes(cls, backbone):
    m = tiny(cls, backbone)
    out = m(torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["features"].shape == (4, m.backbone.num_features)
    assert type(m.backbone).__module__.startswith("timm.")


def test_momentum_update_and_export_keys():
    m = tiny(MoCoV3)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = next(m.momentum_backbone.parameters()).clone()
    online = next(m.backbone.parameters())
    m.update_momentum(0.9)
    after = next(m.momentum_backbone.parameters())
    assert torch.allclose(after, 0.9 * before + 0.1 * online)
    assert not any(p.requires_grad for p in m.momentum_backbone.parameters())
    # Export takes "backbone.*": the momentum copy never leaks into it.
    assert not any(k.startswith("backbone.") and "momentum" in k for k in m.state_dict())


@pytest.mark.parametrize("cls,backbone", [(MoCoV3, "vit_tiny_patch16_224"), (SimCLR, "resnet18")])
def test_loss_decreases_on_fixed_batch(cls, backbone):
    m = tiny(cls, backbone)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 32, 32, generator=g)
    x1, x2 = x + 0.3 * torch.randn(x.shape, generator=g), x + 0.3 * torch.randn(x.shape, generator=g)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        if cls is MoCoV3:
            m.update_momentum(0.9)
        loss = m(x1, x2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_momentum_moves_once_per_optimizer_step_under_accumulation(tmp_path):
    """accumulate_grad_batches=2, 3 optimizer steps = 6 micro-batches: 3 key-encoder updates."""
    import pytorch_lightning as pl

    m = tiny(MoCoV3, warmup_steps=1)
    calls = []
    update = m.update_momentum
    m.update_momentum = lambda mom: (calls.append(m.global_step), update(mom))
    data = [{"image": torch.randn(4, 1, 32, 32)} for _ in range(6)]
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 3
    assert calls == [0, 1, 2]


def test_momentum_pairs_match_by_name():
    m = tiny(MoCoV3)
    keys, queries = m.momentum_pairs()
    assert len(keys) == len(queries) == sum(1 for _ in m.backbone.parameters()) + sum(1 for _ in m.projector.parameters())
    assert all(k.shape == q.shape and k is not q for k, q in zip(keys, queries))
