"""ssl_em.precision: one place chooses precision and layout per device; flags override it."""

from __future__ import annotations

import timm
import torch

from ssl_em import precision
from ssl_em.precision import BF16, FP32, choose


def test_cpu_choice_follows_the_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert choose("cpu").lightning == BF16
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    chosen = choose("cpu")
    assert chosen.lightning == FP32 and chosen.autocast_dtype is None and "no bf16 units" in chosen.why


def test_flags_override_the_choice(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    chosen = choose("cpu", requested=FP32, channels_last=True)
    assert chosen.lightning == FP32 and chosen.channels_last and "as requested" in chosen.why


def test_channels_last_only_for_real_convolutions_on_a_gpu(monkeypatch):
    cnn = timm.create_model("resnet18", in_chans=1, num_classes=0)
    vit = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, depth=1)
    assert precision.has_convolutions(cnn) and not precision.has_convolutions(vit)  # a patch embedding is not one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose("cuda", model=cnn).channels_last and not choose("cuda", model=vit).channels_last
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert not choose("cpu", model=cnn).channels_last  # measured: no gain on the CPU


def test_apply_and_autocast():
    chosen = precision.Precision(BF16, True, "test")
    conv = chosen.apply(torch.nn.Conv2d(1, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with chosen.autocast("cpu"):
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.bfloat16
    with precision.Precision(FP32, False, "test").autocast("cpu"):
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.float32
