"""`ssl-em finetune`: fine-tune a segmentation head on a few labeled slices, then export.

    ssl-em finetune --backbone checkpoints/NAME --images IMG --labels LBL --task semantic \\
        [--train-slices 0,1] [--val-slices 20-29] [--random-init] [--out DIR] \\
        [--config recipes/finetune/semantic_vit.yaml] [--max-steps N] [--seed S]

LightningCLI over `SegmentationModule` and `LabeledSlicesDataModule`; the short flags map
onto its config (`--backbone` is `--model.backbone`, `--images` is `--data.images`, ...)
and any other setting is open as usual (`--model.lr 3e-4`, `--data.tile_size 256`).
The data's classes and tile size feed the model. At the end the model is scored on the
validation slices (whole slices, sliding window) and exported to `--out`.

`finetune(...)` does the same from Python without the command line; the label-efficiency
benchmark calls it in a loop.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

from ssl_em.errors import debug_enabled, find_user_error, one_line
from ssl_em.export import check_out_folder
from ssl_em.finetune.data import IGNORE, LabeledSlicesDataModule
from ssl_em.finetune.export import META
from ssl_em.finetune.heads import default_head
from ssl_em.finetune.instance import foreground_boundary, watershed_instances
from ssl_em.finetune.metrics import instance_scores, semantic_scores
from ssl_em.finetune.module import SegmentationModule
from ssl_em.finetune.predict import predict_plane


def score_val_slices(model: SegmentationModule, dm: LabeledSlicesDataModule, overlap: int | None = None) -> dict:
    """Metrics over whole validation slices, predicted with the sliding window `predict` uses.

    Flat dict: mean_iou, mean_dice, accuracy, iou/<class>, dice/<class>; for the instance task
    also ap50, ap75, map, f1_50, voi, voi_split, voi_merge, adapted_rand_error (averaged
    over slices, each slice segmented in 2D)."""
    if dm._val is None:
        return {}
    net = model.net.eval()
    norm, window = model.normalization, dm.tile_size
    images, targets = dm._val
    device = next(net.parameters()).device
    probs = [predict_plane(net, (im - norm.mean) / norm.std, window, overlap if overlap is not None else window // 4, device=device) for im in images]
    sem = semantic_scores(np.stack([p.argmax(0) for p in probs]), targets, dm.num_classes, IGNORE, dm.classes)
    out = {"mean_iou": sem["mean_iou"], "mean_dice": sem["mean_dice"], "accuracy": sem["accuracy"]}
    for name, s in sem["per_class"].items():
        out[f"iou/{name}"], out[f"dice/{name}"] = s["iou"], s["dice"]
    if dm.task == "instance":
        per_slice = [instance_scores(watershed_instances(*foreground_boundary(p)), dm.labels_volume.read(z)[0]) for p, z in zip(probs, dm.val_slices)]
        for key in ("ap50", "ap75", "map", "f1_50", "voi", "voi_split", "voi_merge", "adapted_rand_error"):
            out[key] = float(np.mean([s[key] for s in per_slice]))
    return out


def finetune(
    backbone: str | Path,
    images,
    labels,
    train_slices: str | list[int],
    val_slices: str | list[int] | None,
    task: str = "semantic",
    random_init: bool = False,
    max_steps: int = 200,
    seed: int = 0,
    head: Callable | None = None,
    tile_size: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    unfreeze_at_step: int | None = None,
    out: str | Path | None = None,
    accelerator: str = "auto",
    data_kwargs: dict | None = None,
    **module_kwargs,
) -> tuple[SegmentationModule, dict]:
    """Fine-tune on `train_slices`, score on `val_slices`; returns (module, metrics dict).

    backbone: an exported folder or a timm name; random_init: same architecture, fresh
    weights. head: a factory `head(spec, num_classes)` (a head class or a functools.partial);
    default UNETRHead for ViTs, UNetHead for CNNs. unfreeze_at_step: None keeps the backbone
    frozen, N unfreezes it after N steps. data_kwargs go to LabeledSlicesDataModule (classes,
    label_values, ignore_value, zero_is_boundary...), module_kwargs to SegmentationModule
    (dice_weight, layer_decay, backbone_lr_scale, feature_indices...). With `out`, the model
    is exported there. Metrics: see `score_val_slices`.
    """
    pl.seed_everything(seed, workers=True)
    dm = LabeledSlicesDataModule(images, labels, train_slices, val_slices, task=task, tile_size=tile_size, batch_size=batch_size, tiles_per_epoch=batch_size * 16, **(data_kwargs or {}))
    model = SegmentationModule(backbone, head or default_head, num_classes=dm.num_classes, classes=dm.classes, task=task, random_init=random_init, tile_size=tile_size, lr=lr, unfreeze_at_step=unfreeze_at_step, **module_kwargs)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, precision="bf16-mixed" if torch.cuda.is_available() and accelerator != "cpu" else "32-true",
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    metrics = score_val_slices(model, dm)
    if out is not None:
        model.export(out, tile_size, metrics, dm.label_values)
    return model, metrics


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", type=str | None, default=None, help="folder to export the fine-tuned model to")
        parser.link_arguments("data.tile_size", "model.tile_size")
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda d: d.num_classes, apply_on="instantiate")
        parser.link_arguments("data", "model.classes", compute_fn=lambda d: d.classes, apply_on="instantiate")


#: short flag -> LightningCLI key; flags without a value become "true".
SHORTCUTS = {
    "--backbone": "--model.backbone",
    "--random-init": "--model.random_init",
    "--images": "--data.images",
    "--labels": "--data.labels",
    "--task": "--data.task",
    "--train-slices": "--data.train_slices",
    "--val-slices": "--data.val_slices",
    "--tile-size": "--data.tile_size",
    "--max-steps": "--trainer.max_steps",
    "--seed": "--seed_everything",
}
FLAGS = {"--random-init"}


def _shortcuts(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        key = SHORTCUTS.get(flag)
        if key is None:
            out.append(argv[i])
        elif eq:
            out.append(f"{key}={value}")
        elif flag in FLAGS and (i + 1 >= len(argv) or argv[i + 1].lower() not in ("true", "false")):
            out += [key, "true"]
        else:
            out += [key, argv[i + 1]]
            i += 1
        i += 1
    return out


def build_cli(argv: list[str]) -> FinetuneCLI:
    return FinetuneCLI(
        SegmentationModule,
        LabeledSlicesDataModule,
        run=False,
        args=_shortcuts(argv),
        seed_everything_default=0,
        save_config_callback=None,
        trainer_defaults={"max_steps": 500, "logger": False, "enable_checkpointing": False, "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"},
        parser_kwargs={"prog": "ssl-em finetune", "description": __doc__.split("\n\n`finetune")[0]},
    )


def run_argv(argv: list[str]) -> int:
    try:
        cli = build_cli(argv)
        if cli.config.out:
            check_out_folder(cli.config.out, META)  # refuse before training, not after
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except Exception as e:  # BackboneError, LabelError, VolumeError, wrapped by jsonargparse
        cause = find_user_error(e)
        if cause is None or debug_enabled():
            raise
        print(f"ssl-em finetune: error: {one_line(cause)}", file=sys.stderr)
        return 2
    metrics = score_val_slices(cli.model, cli.datamodule)
    for k, v in metrics.items():
        print(f"{k:24s} {v:.4f}")
    if cli.config.out:
        out = cli.model.export(cli.config.out, cli.datamodule.tile_size, metrics, cli.datamodule.label_values)
        print(f"exported {out} (ssl-em predict {out} INPUT --out OUT.zarr)")
    return 0


if __name__ == "__main__":
    sys.exit(run_argv(sys.argv[1:]))
