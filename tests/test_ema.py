"""ssl_em.ema: the one EMA teacher update, checked against a hand-written reference, and
MoCo v3's key encoder on it numerically unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_em.ema import ema_pairs, ema_update_, frozen_copy


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_teacher_is_the_ema_of_the_student_exactly():
    student = tiny_net()
    teacher = frozen_copy(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        with torch.no_grad():  # a stand-in for an optimizer step, and a BatchNorm update
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            student[1].running_mean.add_(1.0)
            student[1].num_batches_tracked += 5
        ema_update_(teacher, student, 0.9, buffers=True)
        for k, v in student.state_dict().items():
            reference[k] = 0.9 * reference[k] + 0.1 * v if v.is_floating_point() else v.clone()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(teacher[1].num_batches_tracked) == 15  # counts copied, not averaged


def test_buffers_are_left_alone_unless_asked():
    student = tiny_net()
    teacher = frozen_copy(student)
    with torch.no_grad():
        student[1].running_mean.add_(1.0)
        student[0].weight.add_(1.0)
    ema_update_(teacher, student, 0.5)
    assert torch.equal(teacher[1].running_mean, torch.zeros(4))
    torch.testing.assert_close(teacher[0].weight, student[0].weight - 0.5)


def test_pairs_by_name_fail_loudly_on_a_mismatch():
    teacher, other = tiny_net(), nn.Sequential(nn.Conv2d(1, 4, 3))
    other.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(KeyError):
        ema_pairs(other, teacher)


def test_moco_update_numerically_unchanged():
    """The key-encoder update before ssl_em.ema existed, inlined, against MoCo's now."""
    from test_pretrain_contrastive import tiny

    from ssl_em.pretrain.contrastive import MoCoV3

    ours, ref = tiny(MoCoV3, "resnet18"), tiny(MoCoV3, "resnet18")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a, b in zip(ours.parameters(), ref.parameters()):
            step = torch.randn(a.shape, generator=g)
            a.add_(step)
            b.add_(step)
        # The key encoder's own BatchNorm statistics, which the update must not touch.
        for mod in (ours, ref):
            for b in mod.momentum_backbone.buffers():
                if b.is_floating_point():
                    b.add_(0.25)

    @torch.no_grad()
    def old_update(m: MoCoV3, momentum: float) -> None:
        keys, queries = [], []
        for online, target in ((m.backbone, m.momentum_backbone), (m.projector, m.momentum_projector)):
            theirs = dict(online.named_parameters())
            for name, pt in target.named_parameters():
                keys.append(pt)
                queries.append(theirs[name])
        torch._foreach_lerp_(keys, [q.detach() for q in queries], 1 - momentum)

    for momentum in (0.99, 0.9, 0.995):
        ours.update_momentum(momentum)
        old_update(ref, momentum)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert any(k.startswith("momentum_backbone.") for k in a)  # checkpoints keep their keys
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["momentum_backbone.conv1.weight"], a["backbone.conv1.weight"])
