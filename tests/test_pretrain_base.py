"""Shared plumbing: lr scaling, warm-up + cosine schedule, weight-decay groups, collapse metric."""

from __future__ import annotations

import pytest
import torch
from pretrain_utils import TINY_VIT

from ssl_em.export import build_backbone
from ssl_em.pretrain.base import embedding_std, param_groups, scaled_lr, warmup_cosine


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, final_fraction=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110) == pytest.approx(0.0)  # held at the end


def test_no_decay_on_norms_biases_tokens():
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, **TINY_VIT)
    decay, no_decay = param_groups(vit, 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"}
    assert all(p.ndim >= 2 for p in decay["params"]) and "pos_embed" not in {names[id(p)] for p in decay["params"]}


def test_embedding_std_detects_collapse():
    assert embedding_std(torch.ones(16, 8)) == 0
    assert embedding_std(torch.randn(4096, 64)) == pytest.approx(64**-0.5, rel=0.05)
