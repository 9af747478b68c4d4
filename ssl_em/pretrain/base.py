"""Plumbing every pretraining method shares, and nothing else.

- AdamW (fused on CPU and CUDA) with weight decay on weight matrices only;
- learning rate scaled with the global batch, lr = base_lr * global_batch / 256 (Goyal et al.),
  following a linear warm-up then cosine decay, as a pure function of the optimizer step, so a
  resumed run lands on exactly the same schedule (MAE sets its lr per iteration the same way);
- loss, lr and throughput (images/s over all ranks, measured over windows of the trainer's
  `log_every_n_steps`), logged every step and written at the trainer's cadence;
- the run's metadata (backbone architecture, data normalisation, pixel size, fingerprint)
  written into every Lightning checkpoint under "ssl_em", for `ssl_em.export`.

A method subclasses `PretrainMethod`, builds its backbone and heads in its constructor, and
implements `training_step`, returning the loss and calling `self.log_step(...)`.
"""

from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ssl_em.errors import UserError
from ssl_em.lineage import data_sources
from ssl_em.schedules import warmup_cosine


class NonFiniteLossError(UserError):
    """The training loss became NaN or Inf; training stopped before applying it."""


#: The batch size at which `base_lr` is the actual learning rate.
REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / REFERENCE_BATCH


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; biases, norms, tokens and position embeddings
    (all 1-D, or named *token / pos_embed) are not decayed, as in MAE and MoCo v3."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("token") or "pos_embed" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse detector: mean over dimensions of the per-dimension std of the l2-normalised
    embedding z: (B, D). About 1/sqrt(D) when healthy, 0 when collapsed (SimSiam, Chen & He 2021)."""
    z = nn.functional.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean()


def streamed_pixel_size(datamodule) -> float | None:
    """In-plane pixel size (nm) of the tiles the stream cut at native resolution: the
    sources' sampling-weighted median. None when not set up or a source's size is unknown."""
    ds = getattr(datamodule, "dataset", None)
    if ds is None or not all(s.voxel_size_known for s in ds.sources):
        return None
    sizes = [s.voxel_sizes[p.level].y * p.src_tile / ds.tile_size for s, p in zip(ds.sources, ds.plans)]
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    cum = np.cumsum([ds.weights[i] for i in order])
    return float(sizes[order[int(np.searchsorted(cum, 0.5))]])


def run_metadata(backbone: nn.Module, datamodule) -> dict:
    """What export needs to rebuild and describe the backbone: plain JSON-able values only."""
    from timm.models._input import get_model_args

    norm = getattr(datamodule, "normalization", None)
    return {
        "architecture": backbone.pretrained_cfg["architecture"],
        "model_args": get_model_args(backbone),
        "normalization": norm.to_dict() if norm is not None else None,
        "pixel_size_nm": getattr(datamodule, "pixel_size_nm", None) or streamed_pixel_size(datamodule),
        "data_fingerprint": getattr(datamodule, "fingerprint", None),
        # The training tile: a CNN's model_args hold no img_size, and without it timm's
        # resolve_data_config falls back to ImageNet's 224 and resizes every EM tile.
        "tile_size": getattr(datamodule, "tile_size", None),
        "data_sources": data_sources(datamodule.dataset) if getattr(datamodule, "dataset", None) is not None else None,
    }


class PretrainMethod(pl.LightningModule):
    """Optimizer, schedule, logging and checkpoint metadata. Holds no model of its own:
    a subclass must set `self.backbone` (an unmodified timm model), and may name another
    submodule of the same architecture (an EMA teacher) as the one to deploy (`deployable`)."""

    backbone: nn.Module
    #: Fine-tuning settings this method's backbones do best with, measured (see
    #: `BackboneMeta.finetune`); written into every checkpoint and export. Empty: the
    #: fine-tuning defaults.
    finetune_recipe: dict = {}

    def __init__(
        self,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        min_lr_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_lr, self.weight_decay, self.betas = base_lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_fraction = warmup_steps, min_lr_fraction
        self._tick: tuple[float, int] | None = None  # (time, images) at the start of the window
        self._images_seen = 0
        self._throughput: float | None = None

    # -- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self):
        # Fused on CPU too: 9.8 ms against 35-56 ms per AdamW step over 11.6 M parameters on the
        # 2-core EPYC (benchmarks/RESULTS.md, issue 21).
        fused = next(self.parameters()).device.type in ("cpu", "cuda")
        # lr is set every step by `on_train_batch_start`; 0 here is never used.
        return torch.optim.AdamW(param_groups(self, self.weight_decay), lr=0.0, betas=self.betas, fused=fused)

    def global_batch(self, local_batch: int) -> int:
        t = self.trainer
        return local_batch * t.world_size * t.accumulate_grad_batches

    def total_steps(self) -> int:
        t = self.trainer
        return t.max_steps if t.max_steps and t.max_steps > 0 else int(t.estimated_stepping_batches)

    def lr_at(self, step: int, local_batch: int) -> float:
        peak = scaled_lr(self.base_lr, self.global_batch(local_batch))
        return peak * warmup_cosine(step, self.warmup_steps, self.total_steps(), self.min_lr_fraction)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        lr = self.lr_at(self.global_step, batch["image"].shape[0])
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, before its gradients reach the weights: a run
        that goes on trains nothing (every later step is NaN too) yet exits 0 and exports a
        backbone of NaNs. One device sync per step, which logging the loss pays anyway."""
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"train/loss is {loss.detach().float().item()} at step {self.global_step}: the data hold NaN/Inf or constant tiles "
                "(ingest them into an archive: curation flags such tiles), or the learning rate is too high; "
                "the checkpoints written so far are unaffected")

    # -- logging --------------------------------------------------------------------------

    def log_step(self, loss: torch.Tensor, batch_size: int, **extra: torch.Tensor | float) -> None:
        """Log loss, lr, images/s over all ranks and any extra scalars (as train/<name>).

        Throughput is measured over windows of the trainer's `log_every_n_steps` steps, so
        the value written is an average, not one noisy step."""
        self._images_seen += batch_size * self.trainer.world_size
        now = time.perf_counter()
        if self._tick is None or self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            if self._tick is not None and now > self._tick[0]:
                self._throughput = (self._images_seen - self._tick[1]) / (now - self._tick[0])
            self._tick = (now, self._images_seen)
        scalars = {"train/lr": self.trainer.optimizers[0].param_groups[0]["lr"], **{f"train/{k}": v for k, v in extra.items()}}
        if self._throughput is not None:
            scalars["train/images_per_s"] = self._throughput
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(scalars, batch_size=batch_size)

    # -- export hook and checkpoint metadata ----------------------------------------------

    def deployable(self) -> str:
        """Attribute name of the network `ssl-em export` writes: an unmodified timm model of
        `self.backbone`'s architecture. The student by default; a method whose EMA teacher
        is the better network (DINO, as its authors export it) names the teacher."""
        return "backbone"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        name = self.deployable()
        datamodule = getattr(self.trainer, "datamodule", None)
        meta = run_metadata(getattr(self, name), datamodule)
        # Tiles one optimizer step consumes, across ranks and accumulated micro-batches:
        # export multiplies it by the step count (the backbone's `tiles`).
        batch = getattr(datamodule, "batch_size", None)
        tiles_per_step = batch * self.trainer.world_size * self.trainer.accumulate_grad_batches if batch else None
        checkpoint.setdefault("ssl_em", {}).update(meta, method=f"{type(self).__module__}.{type(self).__qualname__}",
                                                   finetune=dict(self.finetune_recipe), deployable=name, tiles_per_step=tiles_per_step)
