"""Per-step schedules every stage shares: one `warmup_cosine` for pretraining's lr (with its
final fraction) and fine-tuning's (down to 1% of the peak)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """Multiplier in [final_fraction, 1]: linear from 1 / warmup_steps to 1 over `warmup_steps`
    (step 0 already trains), then half a cosine to `final_fraction` at `total_steps` (and held
    there if training runs longer)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
