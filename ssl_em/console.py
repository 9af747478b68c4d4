"""What a training run prints: one step bar with an ETA, a model summary without a bogus
FLOPs line, and none of Lightning's expected chatter.

- `StepProgressBar`: Lightning's bar counts the batches of the current epoch (`Epoch 2/-2
  100/100`, or `40/10` after a resume), which says nothing for a run bounded by steps over
  a streamed dataset. This bar counts optimizer steps out of `trainer.max_steps`, starts at
  the resumed step, and tqdm's rate and remaining time come from the steps of this run.
- `Summary`: the model summary without `Total Flops: 0` (Lightning reports 0 when the
  module has no example input, which reads as "this model computes nothing").
- `quiet()`: hides the warnings and tips that every run triggers by design (listed in
  `EXPECTED`), so the ones left are worth reading. `verbose=True` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings

from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table

log = logging.getLogger("pytorch_lightning.callbacks.model_summary")

#: Messages every run triggers by design, with why they are expected here.
EXPECTED = (
    # `ssl-em` hands LightningCLI its own argv (minus the subcommand).
    r"LightningCLI's args parameter is intended to run from within Python",
    # A frozen backbone is in eval mode on purpose (BatchNorm statistics stay put).
    r"Found \d+ module\(s\) in eval mode",
    # The pretraining stream is an IterableDataset with a nominal epoch length; each
    # worker and rank reads its own blocks (ssl_em.data.stream), so the length is right.
    r"Your `IterableDataset` has `__len__` defined",
    # torch deprecation inside Lightning's own pytree helper; nothing a user can change.
    r".*LeafSpec.* is deprecated",
    # Normalisation and augmentation on the device are what on_after_batch_transfer is for.
    r"You have overridden `on_after_batch_transfer`",
    # jsonargparse deprecations triggered inside LightningCLI itself.
    r"(?s).*was deprecated in v4\.\d+\.\d+ and will be removed",
    # A step-bounded run over a streamed epoch has no meaningful epoch count.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
#: Lightning's advertising, its note that our own summary replaced its default, and lines
#: about hardware a microscopy lab does not have (TPU, HPU), logged at INFO on rank 0. "GPU available: ..." stays: it says where the run computes.
TIPS = re.compile(r"💡 Tip|litlogger|litmodels|Trainer already configured with model summary callbacks|^(TPU|HPU) available")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TIPS.search(record.getMessage())


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Hide `EXPECTED` warnings and Lightning's tips inside the block (nothing if verbose)."""
    if verbose:
        yield
        return
    drop = _DropTips()
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")]
    handlers = [h for lg in loggers for h in lg.handlers]
    with warnings.catch_warnings():
        for pattern in EXPECTED:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.addFilter(drop)
        for h in handlers:  # records from child loggers pass handler filters, not parent ones
            h.addFilter(drop)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(drop)
            for h in handlers:
                h.removeFilter(drop)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: optimizer steps out of `trainer.max_steps`, with ETA."""

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        # initial: tqdm measures the rate (and so the ETA) from the steps of this run only.
        self.train_progress_bar = Tqdm(
            desc="steps", total=total, initial=min(trainer.global_step, total or trainer.global_step), position=2 * self.process_position,
            disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the run, not one per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # a logger's version number, not a measure
        return items


class Summary(ModelSummary):
    """Lightning's model summary, less the FLOPs line when they were not measured."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, **kwargs) -> None:
        if not total_flops:
            summary_data = [col for col in summary_data if col[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data)
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.rstrip().endswith("Total Flops"))
        log.info("\n" + table)


def run_callbacks(progress_bar: bool = True, model_summary: bool = True) -> list:
    """The bar and summary above, for a Trainer with these `enable_*` settings (Lightning
    refuses a progress-bar callback when the bar is disabled)."""
    return ([StepProgressBar()] if progress_bar else []) + ([Summary()] if model_summary else [])
