"""`ssl-em finetune`: fine-tune a backbone and a segmentation head on a few labeled slices, then export.

    ssl-em finetune --backbone checkpoints/NAME --images IMG --labels LBL --classes A,B
        --train-slices 0,1 --val-slices 20-29 --out DIR [--bioimageio DIR] [--config RECIPE.yaml] [--max-steps N]

LightningCLI over `SegmentationModule` and `LabeledSlicesDataModule`; the short flags
(`ssl_em.cli_flags.FINETUNE`, which `--help` prints) map onto its config (`--backbone` is
`--model.backbone`, `--images` is `--data.images`, ...) and any other setting is open as
usual (`--model.lr 3e-4`, `--data.tile_size 256`); `--config` is applied first, whatever
its position. Without a recipe (`CLI_DEFAULTS`): the default head alone for 100 steps, then
the whole network, 1000 steps; a line printed before training says what is frozen and when.
The data's classes and tile size feed the model. At the end the model is scored on the
validation slices (whole slices, sliding window) and exported to `--out`; with
`--bioimageio DIR` it is also written as a bioimage.io model, its test tensors cut from the
training images (`ssl_em.inference.bioimageio`, the same as `ssl-em export-model`).

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

from ssl_em import cli_flags, precision as precisions
from ssl_em.atomic import check_out_folder
from ssl_em.backbones import backbone_meta
from ssl_em.console import quiet, run_callbacks
from ssl_em.data.labels import IGNORE
from ssl_em.errors import UserError, debug_enabled, find_user_error, one_line
from ssl_em.finetune.data import REST, LabeledSlicesDataModule
from ssl_em.finetune.heads import default_head
from ssl_em.finetune.model_folder import META
from ssl_em.finetune.module import SegmentationModule
from ssl_em.finetune.schedule import KeepBestWeights, StepSchedule
from ssl_em.inference.instance import foreground_boundary, watershed_instances
from ssl_em.inference.metrics import instance_scores, semantic_scores
from ssl_em.inference.window import predict_plane


def score_val_slices(model: SegmentationModule, dm: LabeledSlicesDataModule, overlap: int | None = None, device: torch.device | str | None = None,
                     precision: precisions.Precision | None = None) -> dict:
    """Metrics over whole validation slices, predicted with the sliding window `predict` uses,
    on `device` (default: where the model is; after `trainer.fit` that is the CPU, so pass
    `trainer.strategy.root_device` to score on the accelerator it trained on), at `precision`
    (the run's; None: `predict_plane`'s default).

    Flat dict: mean_iou, mean_dice, accuracy, iou/<class>, dice/<class>; for the instance task
    also ap50, ap75, map, f1_50, pq, sq, rq, voi, voi_split, voi_merge, adapted_rand_error (averaged
    over slices, each slice segmented in 2D)."""
    if dm._val is None:
        return {}
    net = model.net.eval()
    norm, window = model.normalization, dm.tile_size
    images, targets = dm._val
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.to(device)
    probs = [predict_plane(net, (im - norm.mean) / norm.std, window, overlap if overlap is not None else window // 4, device=device, precision=precision) for im in images]
    sem = semantic_scores(np.stack([p.argmax(0) for p in probs]), targets, dm.num_classes, IGNORE, dm.classes)
    out = {"mean_iou": sem["mean_iou"], "mean_dice": sem["mean_dice"], "accuracy": sem["accuracy"]}
    for name, s in sem["per_class"].items():
        out[f"iou/{name}"], out[f"dice/{name}"] = s["iou"], s["dice"]
    if dm.task == "instance":
        per_slice = [instance_scores(watershed_instances(*foreground_boundary(p)), dm.labels_volume.read(z)[0]) for p, z in zip(probs, dm.val_slices)]
        for key in ("ap50", "ap75", "map", "f1_50", "pq", "sq", "rq", "voi", "voi_split", "voi_merge", "adapted_rand_error"):
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
    max_steps: int | None = None,
    seed: int = 0,
    head: Callable | None = None,
    tile_size: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    unfreeze_at_step: int | None = None,
    out: str | Path | None = None,
    accelerator: str = "auto",
    data_kwargs: dict | None = None,
    steps: StepSchedule = StepSchedule(),
    holdout: float = 0.15,
    validations: int = 10,
    progress: bool = False,
    precision: str | None = None,
    channels_last: bool | None = None,
    callbacks: list[pl.Callback] | None = None,
    semi_supervised: bool = False,
    unlabeled_slices: str | list[int] | None = None,
    **module_kwargs,
) -> tuple[SegmentationModule, dict]:
    """Fine-tune on `train_slices`, score on `val_slices`; returns (module, metrics dict).

    backbone: an exported folder or a timm name; random_init: same architecture, fresh
    weights. head: a factory `head(spec, num_classes)` (a head class or a functools.partial);
    default UNETRHead for ViTs, UNetHead for CNNs. unfreeze_at_step: None keeps the backbone
    frozen, N unfreezes it after N steps. data_kwargs go to LabeledSlicesDataModule (classes,
    label_values, ignore_value, zero_is_boundary...), module_kwargs to SegmentationModule
    (dice_weight, layer_decay, backbone_lr_scale, feature_indices...). With `out`, the model
    is exported there. Metrics: see `score_val_slices`, plus "steps" (trained) and
    "best_step" (where the kept weights come from).

    The schedule (`ssl_em.finetune.schedule`): max_steps None takes `steps(labeled pixels)`,
    so more labels train longer; `holdout` > 0 cuts that fraction of every training slice's
    rows off as a model-selection band, the loss on it is measured `validations` times
    over the run, and the weights with the lowest one are kept, scored and exported.
    holdout 0 keeps the last weights.
    progress: a bar of steps out of max_steps with an ETA. callbacks: more Lightning
    callbacks (the napari widget's progress and cancel).
    precision ("32-true", "bf16-mixed") and channels_last: None lets `ssl_em.precision.choose`
    decide for the accelerator (bf16 where it has bf16 units), for training and scoring alike.
    semi_supervised: a mean teacher's confident labels on tiles of `unlabeled_slices` train
    the student too (`SegmentationModule`); those default to every slice neither in
    train_slices nor in val_slices ("rest"). The step count stays the labeled one.
    """
    pl.seed_everything(seed, workers=True)
    data_kwargs = {"holdout": holdout, **(data_kwargs or {})}
    if semi_supervised or unlabeled_slices is not None:
        data_kwargs["unlabeled_slices"] = unlabeled_slices if unlabeled_slices is not None else REST
    dm = LabeledSlicesDataModule(images, labels, train_slices, val_slices, task=task, tile_size=tile_size, batch_size=batch_size, tiles_per_epoch=batch_size * 16, **data_kwargs)
    if max_steps is None:
        max_steps = steps(dm.labeled_pixels)
    model = SegmentationModule(backbone, head or default_head, num_classes=dm.num_classes, classes=dm.classes, task=task, random_init=random_init, tile_size=tile_size, lr=lr, unfreeze_at_step=unfreeze_at_step,
                               semi_supervised=semi_supervised, **module_kwargs)
    chosen = precisions.choose(precisions.device_of(accelerator), precision, channels_last, model)
    chosen.apply(model)
    keep = KeepBestWeights("val/loss")
    select = dm.holdout > 0 and max_steps > 0
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, precision=chosen.lightning,
        callbacks=run_callbacks(progress, model_summary=False) + ([keep] if select else []) + list(callbacks or []), limit_val_batches=None if select else 0,
        val_check_interval=max(1, max_steps // validations) if select else None, check_val_every_n_epoch=None if select else 1,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    metrics = score_val_slices(model, dm, device=trainer.strategy.root_device, precision=chosen)
    metrics.update(steps=int(max_steps), best_step=int(keep.best_step if keep.best_step is not None else trainer.global_step))
    if out is not None:
        model.export(out, tile_size, metrics, dm.label_values)
    return model, metrics


#: What `ssl-em finetune` does without a recipe: "fine-tune this backbone on my labels", i.e.
#: the default head (UNETR for ViTs, U-Net for CNNs) alone for a short warm-up, so random
#: head gradients do not wreck the pretrained features, then the whole network (backbone at
#: 0.1 x lr); validation every 100 steps (tiles_per_epoch / batch_size steps per epoch).
CLI_DEFAULTS = {"model.head": default_head, "model.unfreeze_at_step": 100, "data.tiles_per_epoch": 800}
MAX_STEPS = 1000


def backbone_recipe(backbone, random_init: bool, given: set[str]) -> dict:
    """The fine-tuning settings an exported backbone recommends (`BackboneMeta.finetune`),
    less those the user set (`given`, dotted keys): {} for a timm name or a random init,
    which keep the defaults."""
    meta = None if random_init or not isinstance(backbone, (str, Path)) else backbone_meta(backbone)
    return {k: v for k, v in (meta.finetune if meta else {}).items() if f"model.{k}" not in given}


class FinetuneCLI(LightningCLI):
    def __init__(self, *args, given: set[str] = frozenset(), **kwargs) -> None:
        self.given, self.recipe = given, {}
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Settings the backbone recommends replace the defaults the user left alone."""
        model = self.config.model
        cli_flags.check_trainer(self.config.trainer, cli_flags.FINETUNE, UserError)
        cli_flags.check_strategy(self.config.trainer.strategy, UserError)  # the README says FSDP is refused: it is
        if not (isinstance(model.lr, (int, float)) and model.lr > 0):  # AdamW's own refusal is a traceback mid-fit
            raise UserError(f"--lr {model.lr}: must be > 0")
        self.recipe = backbone_recipe(model.backbone, model.random_init, self.given)
        for key, value in self.recipe.items():
            setattr(model, key, value)
        if "trainer.precision" not in self.given:  # ssl_em's choice for the accelerator asked for
            self.config.trainer.precision = precisions.choose(precisions.device_of(self.config.trainer.accelerator)).lightning
        if model.semi_supervised and self.config.data.unlabeled_slices is None:
            self.config.data.unlabeled_slices = REST  # every slice neither trained on nor scored

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", type=str | None, default=None, help="folder to export the fine-tuned model to")
        parser.set_defaults(CLI_DEFAULTS)
        cli_flags.describe_data_flag(parser, "images, labels and slices as a YAML file (or use --images, --labels...)", "YAML")
        parser.add_argument("--bioimageio", type=str | None, default=None, help="also write the exported model as a bioimage.io model into this folder (needs --out)")
        parser.add_argument("--license", type=str | None, default=None, help="SPDX licence of the --bioimageio model's weights (default: the one the backbone states)")
        parser.add_argument("--channels_last", type=bool | None, default=None, help="NHWC layout for convolutions (default: ssl_em.precision decides)")
        parser.link_arguments("data.tile_size", "model.tile_size")
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda d: d.num_classes, apply_on="instantiate")
        parser.link_arguments("data", "model.classes", compute_fn=lambda d: d.classes, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        t = self.config.trainer
        # --trainer.callbacks: LightningCLI would drop them for the kwargs' list, as it did here.
        given = self.config_init.trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        kwargs["callbacks"] = list(given) + run_callbacks(t.get("enable_progress_bar") is not False, t.get("enable_model_summary") is not False)
        return super().instantiate_trainer(**kwargs)


def freeze_plan(model: SegmentationModule, max_steps: int) -> str:
    """One line: what trains, and for how long."""
    h, n = model.hparams, max_steps
    scale = h.backbone_lr_scale if h.backbone_lr_scale is not None else (1.0 if h.random_init else 0.1)
    whole = f"the whole network (backbone lr x{scale:g}{f', layer decay {h.layer_decay:g}' if h.layer_decay != 1 else ''})"
    if h.unfreeze_at_step is None:
        return f"backbone frozen for all {n} steps; only the head trains (a probe of the backbone's features)"
    if h.unfreeze_at_step <= 0:
        return f"{whole} trains for all {n} steps"
    if h.unfreeze_at_step >= n:
        return f"backbone frozen for all {n} steps (unfreeze_at_step {h.unfreeze_at_step} >= max_steps); only the head trains"
    return f"head alone for steps 0-{h.unfreeze_at_step - 1} (backbone frozen), then {whole} for steps {h.unfreeze_at_step}-{n - 1}"


def chosen_precision(cli: FinetuneCLI) -> precisions.Precision:
    """The run's precision and layout: what the trainer was built with (ssl_em's choice for the
    accelerator, or --precision / --trainer.precision) and --channels_last."""
    cfg = cli.config
    requested = str(cfg.trainer.precision) if "trainer.precision" in cli.given else None
    return precisions.choose(precisions.device_of(cfg.trainer.accelerator), requested, cfg.channels_last, cli.model)


def build_cli(argv: list[str]) -> FinetuneCLI:
    """Parse `argv` (short flags, any order: see ssl_em.cli_flags) and build model, data and trainer."""
    args, verbose = cli_flags.prepare(argv, cli_flags.FINETUNE)
    with quiet(verbose), cli_flags.parse_errors():
        return FinetuneCLI(
            given=cli_flags.given_keys(args),
            model_class=SegmentationModule,
            datamodule_class=LabeledSlicesDataModule,
            run=False,
            args=args,
            seed_everything_default=0,
            save_config_callback=None,
            trainer_defaults={"max_steps": MAX_STEPS, "logger": False, "enable_checkpointing": False, "precision": precisions.choose().lightning},
            parser_kwargs={"prog": "ssl-em finetune", "description": __doc__.split("\n\n")[0], "exit_on_error": False},
        )


def run_argv(argv: list[str]) -> int:
    if cli_flags.wants_short_help(argv):
        return cli_flags.print_short_help(cli_flags.help_text("finetune"))
    verbose = cli_flags.VERBOSE in argv
    try:
        cli = build_cli(argv)
        if cli.config.bioimageio and not cli.config.out:
            raise ValueError("--bioimageio DIR writes the model exported to --out: give --out too")
        if cli.config.out:
            check_out_folder(cli.config.out, META)  # refuse before training, not after
        license = None
        if cli.config.bioimageio:  # bioimage.io needs a licence: asked for before training, not after
            from ssl_em.licences import inherited_license, require_license

            stated_by_backbone = getattr(cli.model.backbone_meta, "license", None)
            license = require_license(cli.config.license, inherited_license(stated_by_backbone, cli.model.hparams.random_init), "ssl-em finetune --bioimageio")
        dm = cli.datamodule
        chosen = chosen_precision(cli)
        chosen.apply(cli.model)
        print(f"ssl-em finetune: precision {chosen.why}", flush=True)
        print(f"ssl-em finetune: {freeze_plan(cli.model, cli.trainer.max_steps)}", flush=True)
        if cli.recipe:
            told = ", ".join(f"{k} {v}" for k, v in cli.recipe.items())
            print(f"ssl-em finetune: {told}: the backbone's recommended settings (its ssl_em.json); --model.KEY VALUE overrides", flush=True)
        if dm.task == "semantic" and dm.classes == [str(v) for v in dm.label_values]:
            print(f"ssl-em finetune: classes named by their label values {dm.classes}; --classes A,B names them", flush=True)
        if dm.unlabeled_slices:
            z = dm.unlabeled_slices
            print(f"ssl-em finetune: semi-supervised: a mean teacher labels tiles of {len(z)} unlabeled slices ({z[0]}..{z[-1]}) where its confidence is >= {cli.model.hparams.confidence:g}", flush=True)
        with quiet(verbose):
            cli.trainer.fit(cli.model, datamodule=dm)
    except Exception as e:  # BackboneError, LabelError, VolumeError, wrapped by jsonargparse
        cause = find_user_error(e)
        if cause is None or debug_enabled():
            raise
        print(f"ssl-em finetune: error: {one_line(cause)}", file=sys.stderr)
        return 2
    if cli.trainer.global_rank != 0:
        # DDP: one writer per artefact. Rank 0 scores and exports --out (and --bioimageio);
        # the others are done (two ranks replacing one folder raced, and the loser exited 2).
        return 0
    metrics = score_val_slices(cli.model, cli.datamodule, device=cli.trainer.strategy.root_device, precision=chosen)
    if metrics:
        print(f"scores on the validation slices {cli.datamodule.val_slices}:")
    for k, v in metrics.items():
        print(f"{k:24s} {v:.4f}")
    if cli.config.out:
        out = cli.model.export(cli.config.out, cli.datamodule.tile_size, metrics, cli.datamodule.label_values)
        print(f"exported {out} (ssl-em predict {out} INPUT --out OUT.zarr)")
    else:
        print("ssl-em finetune: nothing written (give --out DIR to export the model for ssl-em predict)")
    if cli.config.bioimageio:
        from ssl_em.inference.bioimageio import export_bioimageio

        bmz = export_bioimageio(cli.config.out, cli.datamodule.images_volume, cli.config.bioimageio, license=license)
        print(f"wrote {bmz / 'bioimageio.yaml'} (bioimage.io model)")
    return 0


if __name__ == "__main__":
    sys.exit(run_argv(sys.argv[1:]))
