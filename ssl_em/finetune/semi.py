"""Semi-supervised fine-tuning: a mean teacher's confident predictions as targets.

FixMatch (Sohn et al. 2020) with a mean teacher (Tarvainen & Valpola 2017), per pixel: a
teacher kept as the exponential moving average of the student (`ssl_em.ema`) predicts on a
weakly augmented unlabeled tile (flips and 90° rotations); pixels whose top class
probability reaches `threshold` become hard pseudo-labels, the rest are ignored; the
student learns them on a strongly augmented view of the same tile (warp, blur, intensity).
The warp is applied to the pseudo-labels too, so the target follows the geometry of the
view the student sees (`SegmentationModule.strong_view`). The loss weight ramps up (the
teacher starts as the untrained student, whose confident pixels are noise).

Shapes: B unlabeled tiles, K classes, H x W pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pseudo_labels(teacher_logits: torch.Tensor, threshold: float, ignore_index: int = -1) -> torch.Tensor:
    """teacher_logits: (B, K, H, W) -> (B, H, W) int64: the argmax class where its
    probability is >= threshold, `ignore_index` elsewhere. Softmax in float32 (bf16 would
    round probabilities near a threshold like 0.95)."""
    conf, label = teacher_logits.float().softmax(1).max(1)
    return torch.where(conf >= threshold, label, torch.full_like(label, ignore_index))


def consistency_loss(student_logits: torch.Tensor, pseudo: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy of the student on the confident pixels, averaged over all pixels as in
    FixMatch: an unconfident pixel adds nothing, and when the teacher is sure of few pixels the
    term is small rather than a mean over a handful. student_logits: (B, K, H, W); pseudo:
    (B, H, W) with ignore."""
    per_pixel = F.cross_entropy(student_logits.float(), pseudo, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    return per_pixel.mean()


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """exp(-5 (1 - step / rampup_steps)^2) until rampup_steps, then 1 (Laine & Aila 2017)."""
    if rampup_steps <= 0 or step >= rampup_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - max(step, 0) / rampup_steps) ** 2)
