"""Teachers kept as an exponential moving average (EMA) of a student network.

One building block below pretraining and fine-tuning: MoCo v3's key encoder
(`ssl_em.pretrain.contrastive`) and the mean teacher of semi-supervised fine-tuning
(`ssl_em.finetune.module`) are both

    teacher <- momentum * teacher + (1 - momentum) * student

tensor by tensor, in one fused `torch._foreach_lerp_` call per update.

Not timm's `ModelEmaV3`: it pairs state_dict entries by position and keeps its copy under
`.module` (renaming MoCo's checkpointed `momentum_backbone.*` keys), and it either averages or
overwrites every buffer, whereas MoCo's key encoder keeps its own BatchNorm statistics. Here
tensors are paired by name (a mismatch fails loudly) and `buffers` says whether floating-point
buffers are averaged too (the mean teacher, which predicts in eval mode with them) or left to
the teacher (MoCo). Integer buffers (BatchNorm's `num_batches_tracked`) are copied when
buffers are averaged: an average of counts means nothing.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with no gradients: the teacher starts equal to the student."""
    return copy.deepcopy(module).requires_grad_(False)


def _as_list(modules: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def ema_pairs(teacher: nn.Module | Sequence[nn.Module], student: nn.Module | Sequence[nn.Module], buffers: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher tensors, student tensors) paired by name, module by module: the parameters,
    and with `buffers` the floating-point buffers too. A name the student lacks is a KeyError."""
    teachers, students = [], []
    for t, s in zip(_as_list(teacher), _as_list(student), strict=True):
        named = [(t.named_parameters(), dict(s.named_parameters()))]
        if buffers:
            floats = ((n, b) for n, b in t.named_buffers() if b.is_floating_point())
            named.append((floats, dict(s.named_buffers())))
        for own, theirs in named:
            for name, tensor in own:
                teachers.append(tensor)
                students.append(theirs[name])
    return teachers, students


@torch.no_grad()
def ema_update_(teacher: nn.Module | Sequence[nn.Module], student: nn.Module | Sequence[nn.Module], momentum: float, buffers: bool = False) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place (see `ema_pairs`);
    with `buffers`, integer buffers are copied from the student."""
    teachers, students = ema_pairs(teacher, student, buffers)
    if teachers:
        torch._foreach_lerp_(teachers, [s.detach().to(t.dtype) for t, s in zip(teachers, students)], 1 - momentum)
    if buffers:
        for t, s in zip(_as_list(teacher), _as_list(student), strict=True):
            theirs = dict(s.named_buffers())
            for name, b in t.named_buffers():
                if not b.is_floating_point():
                    b.copy_(theirs[name])


def cosine_momentum(step: int, total: int, base: float) -> float:
    """Momentum rising from `base` to 1 along half a cosine over training (BYOL, MoCo v3)."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total) / max(1, total)) + 1) / 2
