"""Shared plumbing: lr scaling, warm-up + cosine schedule, weight-decay groups, collapse metric."""

from __future__ import annotations

import pytest
import torch
from pretrain_utils import TINY_VIT

from ssl_em.backbones import build_backbone
from ssl_em.pretrain.base import embedding_std, param_groups, scaled_lr
from ssl_em.schedules import warmup_cosine


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


def test_micro_batches_of_one_step_draw_differently(monkeypatch):
    """Gradient accumulation: SeedPerRank keys each micro-batch of an optimizer step by its
    index, so they draw different masks and dropout; the same (step, micro-batch) repeats."""
    from types import SimpleNamespace

    from torch import nn

    from ssl_em.pretrain.cli import SeedPerRank
    from ssl_em.seeding import Generators

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # what LightningCLI's seed_everything sets
    module = nn.Module()
    module.masks = Generators("mask", seed=0)
    trainer = SimpleNamespace(global_step=5)
    cb = SeedPerRank()
    cb.setup(trainer, module, "fit")

    def draws() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(4, generator=module.masks.get()), torch.rand(4)  # a mask, dropout (global RNG)

    draws_by_batch = []
    for step in (5, 5, 5, 6):  # three micro-batches of step 5, then step 6
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, 0)
        draws_by_batch.append(draws())
    masks = [m for m, _ in draws_by_batch]
    dropout = [d for _, d in draws_by_batch]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(masks[i], masks[j]) and not torch.equal(dropout[i], dropout[j]), (i, j)
    resumed = SeedPerRank()  # a resumed run at step 5 draws what the first micro-batch drew
    resumed.setup(trainer, module, "fit")
    trainer.global_step = 5
    resumed.on_train_batch_start(trainer, module, None, 0)
    again = draws()
    assert torch.equal(again[0], masks[0]) and torch.equal(again[1], dropout[0])
