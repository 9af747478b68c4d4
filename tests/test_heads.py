"""Heads over tiny timm backbones: shapes, reported feature levels, wrong-backbone errors."""

from __future__ import annotations

import pytest
import timm
import torch

from ssl_em.features import FeatureExtractor
from ssl_em.finetune.heads import LinearProbe, UNetHead, UNETRHead, default_head

SMALL = dict(width=32, min_width=16, skip_width=16, stem_width=8)


# One intra-op thread for this module (fixture in conftest.py).


@pytest.fixture(scope="module")
def tiny_vit():
    return FeatureExtractor(timm.create_model("test_vit", in_chans=1, num_classes=0, img_size=64, pretrained=False))


@pytest.fixture(scope="module")
def tiny_cnn():
    return FeatureExtractor(timm.create_model("test_resnet", in_chans=1, num_classes=0, pretrained=False))


def test_feature_levels_reported(tiny_vit, tiny_cnn):
    x = torch.randn(2, 1, 64, 64)
    for fx in (tiny_vit, tiny_cnn):
        feats = fx(x)
        assert [f.shape[1] for f in feats] == list(fx.spec.channels)
        assert [64 // f.shape[-1] for f in feats] == list(fx.spec.reductions)
        assert fx.spec.in_chans == 1
    assert tiny_vit.spec.columnar and len(tiny_vit.spec.channels) == 4 and tiny_vit.spec.input_multiple == 16
    assert tiny_cnn.spec.reductions == (2, 4, 8, 16, 32) and not tiny_cnn.spec.columnar


@pytest.mark.parametrize("which", ["vit", "cnn"])
@pytest.mark.parametrize("head_cls", [LinearProbe, UNETRHead, UNetHead])
def test_heads_give_logits_at_input_resolution(which, head_cls, tiny_vit, tiny_cnn):
    fx = tiny_vit if which == "vit" else tiny_cnn
    if (head_cls is UNETRHead and which == "cnn") or (head_cls is UNetHead and which == "vit"):
        with pytest.raises(ValueError, match="use UNetHead|use UNETRHead"):
            head_cls(fx.spec, 3, **SMALL)
        return
    head = head_cls(fx.spec, 3, **({} if head_cls is LinearProbe else SMALL))
    x = torch.randn(2, 1, 64, 64)
    out = head(fx(x), x)
    assert out.shape == (2, 3, 64, 64)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_default_head_follows_the_backbone(tiny_vit, tiny_cnn):
    assert isinstance(default_head(tiny_vit.spec, 2), UNETRHead)
    assert isinstance(default_head(tiny_cnn.spec, 2), UNetHead)
    for features in (tiny_vit, tiny_cnn):  # sizes pass through to whichever head it picks
        narrow = default_head(features.spec, 2, width=32, min_width=8, skip_width=16, stem_width=8)
        assert narrow.init_args["width"] == 32
        assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in default_head(features.spec, 2).parameters()) / 4


def test_full_resolution_stem_sees_one_pixel_lines(tiny_vit):
    """A 1 px line moved by one pixel must change the logits there: the patch grid alone could not."""
    head = UNETRHead(tiny_vit.spec, 2, **SMALL).eval()
    a = torch.zeros(1, 1, 64, 64)
    b = a.clone()
    a[..., 20, :], b[..., 21, :] = 1.0, 1.0  # same 16 px patch row
    with torch.no_grad():
        la, lb = head(tiny_vit(a), a), head(tiny_vit(b), b)
    assert not torch.allclose(la[..., 20, :], lb[..., 20, :])


def test_feature_indices_out_of_range_are_refused_not_wrapped(tiny_vit):
    """i % n before the range check turned index n + 3 of an n-level backbone into level 3."""
    from ssl_em.features import feature_info

    n = len(feature_info(tiny_vit.backbone))
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor(tiny_vit.backbone, indices=[n + 3])
    assert FeatureExtractor(tiny_vit.backbone, indices=[-1]).indices == [n - 1]
