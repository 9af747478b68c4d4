"""How long and at what rate fine-tuning runs, and which weights it keeps.

Few-label fine-tuning has to satisfy one rule to be a fair measure of a backbone: more
labels must never score worse. A fixed number of steps breaks it both ways (one slice is
overfitted, twenty are under-trained), so:

- `StepSchedule`: the number of steps grows with the labeled pixels, within [min, max];
- the lr: linear warm-up then cosine decay (`ssl_em.schedules.warmup_cosine`);
- `KeepBestWeights`: the weights with the lowest loss on a band held out of the labeled
  slices (`LabeledSlicesDataModule(holdout=...)`) are the ones kept and exported, never
  chosen by the scored slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch


@dataclass(frozen=True)
class StepSchedule:
    """steps = clip(min_steps + steps_per_mpx x labeled megapixels, min_steps, max_steps).

    A 512 x 512 slice is 0.26 megapixels. The defaults give ~400 steps for one such slice and
    ~500 for two, reaching `max_steps` at about six slices.
    """

    min_steps: int = 300
    steps_per_mpx: float = 400.0
    max_steps: int = 1000

    def __call__(self, labeled_pixels: int) -> int:
        return int(min(self.max_steps, max(self.min_steps, round(self.min_steps + self.steps_per_mpx * labeled_pixels / 1e6))))


class KeepBestWeights(pl.Callback):
    """Snapshot the module's weights whenever `monitor` (a validation loss) improves; load
    the best snapshot back when fitting ends, so what is scored and exported is that.

    best_step, best_score: where the kept weights came from (None before any validation).
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def score(self, trainer: pl.Trainer) -> float | None:
        """The monitored value of the validation that just ended (lower is better)."""
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = None if getattr(trainer, "sanity_checking", False) else self.score(trainer)
        if value is None:
            return
        if self.best_score is None or value < self.best_score:
            self.best_score, self.best_step = value, int(trainer.global_step)
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
