"""`ssl-em pretrain --config recipes/pretrain/RECIPE.yaml --data ARCHIVE.zarr [--resume] ...`

LightningCLI over any PretrainMethod (the recipe picks it by `model.class_path`) and
`EMDataModule`. Every setting can be overridden on the command line (`--model.init_args.
mask_ratio 0.6`, `--data.batch_size 32`, `--trainer.max_steps 1000`). On top of Lightning:

- short flags (`--data PATH` for `--data.data PATH`, `--max-steps`, `--resume`...: the table
  `ssl_em.cli_flags.PRETRAIN`, which `--help` prints; `--help-all` lists every key);
  `--config` is applied first and every other flag after it, whatever the order typed;
- the tile size feeds the model's img_size;
- a run lives in one folder, `--run_dir` (default runs/<recipe name>): logs, config.yaml,
  checkpoints/ (every `--checkpoint_every_n_steps`, written to a temporary file and renamed,
  plus checkpoints/last.ckpt);
- `--resume` continues from checkpoints/last.ckpt (step count, optimizer, data epoch), so
  a run killed with kill -9 carries on from its last checkpoint;
- `--init_from checkpoints/NAME` starts from an exported backbone (continued pretraining of
  a published backbone on a lab's own archive): same architecture, loaded strictly, and the
  method's own weights (SparK's decoder and mask tokens) when the export carries them; an
  export without them trains a fresh decoder alone for `--freeze_backbone_steps` (100)
  first; the optimizer starts fresh;
- mistakes are reported in one line before training: unknown backbone, an unsupported
  strategy (one device or DDP only: FSDP and DeepSpeed are refused), tile size not a
  multiple of the patch size, nothing left after curation, batch larger than the data,
  a checkpoint of another architecture or method;
- precision and layout from `ssl_em.precision.choose` (bf16-mixed where the GPU or CPU has
  bf16 units, else 32-true; channels_last for CNNs on GPUs), printed once;
  `--trainer.precision 32-true` and `--channels_last true/false` override it;
  `--compile` wraps the method's forward in torch.compile;
- logs go to Weights & Biases in offline mode by default (`wandb sync` later if you want);
  recipes may choose `pytorch_lightning.loggers.CSVLogger` instead.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from ssl_em import cli_flags, precision
from ssl_em.atomic import write_csv
from ssl_em.console import quiet, run_callbacks
from ssl_em.data.stream import EMDataModule, NoTilesError
from ssl_em.errors import UserError, check_at_least, debug_enabled, find_user_error, one_line
from ssl_em.export import read_checkpoint
from ssl_em.pretrain.base import PretrainMethod, run_metadata
from ssl_em.seeding import generators_in, seed_process


#: Steps a fresh decoder trains alone before the encoder joins (`--init_from` an export without
#: the method's weights). A third of a 300-step adaptation run; SparK's loss from scratch fell
#: from 1.01 to 0.87 in its first 140 steps (benchmarks/RESULTS.md), so a decoder has learned
#: something by then. Not tuned.
DEFAULT_FREEZE_STEPS = 100


class PretrainError(UserError):
    """A run cannot start as configured; the message says why in one line."""


class RecordRecipe(Callback):
    """Puts the recipe into every checkpoint's "ssl_em" metadata, for export: the recipe
    files' names and their text, never their paths (a path names the training machine)."""

    def __init__(self, recipes: list[str]) -> None:
        self.recipe = ",".join(Path(p).stem for p in recipes) or None
        self.content = "\n".join(f"# {Path(p).name}\n{Path(p).read_text()}" for p in recipes if Path(p).is_file()) or None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint.setdefault("ssl_em", {}).update(recipe=self.recipe, recipe_content=self.content)


class RecordLineage(Callback):
    """Puts the lineage of an `--init_from` run into every checkpoint's "ssl_em" metadata:
    the exported backbone it continued (name, weights hash, steps, tiles, data) after that
    backbone's own ancestors, so export can say what the weights have seen in all."""

    def __init__(self, init_from: str | Path) -> None:
        from ssl_em.lineage import lineage_of

        self.lineage = lineage_of(init_from)  # read once, at the start: the folder may move later

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint.setdefault("ssl_em", {})["lineage"] = self.lineage


class SeedPerRank(Callback):
    """Random draws keyed by (seed, rank, optimizer step, micro-batch). LightningCLI seeds every rank with
    the same `seed_everything`, which keeps the initial weights equal; from then on, before
    every optimizer step, each rank re-seeds its global RNG (dropout, drop-path) and re-keys
    the method's `Generators` (masks, views) from (seed, rank, step). Ranks differ, a seed
    repeats, and a resumed run draws exactly what an uninterrupted one would, with no random
    state to save in the checkpoint (the tile stream resumes through its datamodule state)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        seed_process()
        self._last: tuple[int, int] | None = None  # (step, micro-batch) of the previous batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # With accumulate_grad_batches > 1 several micro-batches share an optimizer step;
        # each is keyed by (step, its index within the step) or they would all draw the same
        # masks, views and dropout. Counted here rather than from batch_idx, which does not
        # restart at a step boundary after a resume; checkpoints fall on step boundaries, so
        # a resumed run counts from 0 as an uninterrupted one does.
        step, last = trainer.global_step, getattr(self, "_last", None)
        micro = last[1] + 1 if last is not None and last[0] == step else 0
        self._last = (step, micro)
        seed_process(step=step, micro=micro)
        for g in generators_in(pl_module):
            g.at_step(step, micro)


def continue_csv_metrics(trainer, resumed_step: int) -> None:
    """On resume, CSV loggers keep writing the run's metrics file instead of a new version_N:
    rows before the resumed step are kept (later ones are trained again and logged anew).
    Lightning's CSV writer deletes an existing metrics.csv when it opens its folder, so the
    file is set aside, the writer opened, and the kept rows put back under it."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        metrics = Path(logger.log_dir) / "metrics.csv"
        rows, header = [], []
        if metrics.is_file():
            with open(metrics, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step", "") != "" and int(float(r["step"])) < resumed_step]
            metrics.unlink()
        writer = logger.experiment  # opens the folder (and would have deleted the file)
        if header:
            write_csv(metrics, header, rows)
            writer.metrics_keys = sorted(header)


def _latest_version(save_dir: str, name: str) -> int | None:
    """N of the newest save_dir/name/version_N, or None."""
    root = Path(save_dir) / (name or "")
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()] if root.is_dir() else []
    return max(versions) if versions else None


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="the run's folder (default: runs/<recipe name>)")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=1000, help="save checkpoints/last.ckpt every N optimizer steps")
        parser.add_argument("--resume", type=bool, default=False, help="continue from <run_dir>/checkpoints/last.ckpt")
        parser.add_argument("--compile", type=bool, default=False, help="torch.compile the method's forward")
        parser.add_argument("--init_from", type=str | None, default=None, help="start the backbone from an exported backbone folder (continued pretraining)")
        parser.add_argument("--freeze_backbone_steps", type=int | None, default=None,
                            help="with --init_from: train the method's decoder/heads alone for N steps first (default: 0 when the export carries them, else 100)")
        parser.add_argument("--channels_last", type=bool | None, default=None, help="NHWC layout for convolutions (default: ssl_em.precision decides)")
        parser.link_arguments("data.tile_size", "model.init_args.img_size")
        cli_flags.describe_data_flag(parser, "an ssl_em archive (ARCHIVE.zarr), raw volumes, or a YAML file of data settings")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        check_strategy(cfg.trainer.strategy)  # before Lightning builds it (FSDP fails later, or worse, trains)
        cli_flags.check_trainer(cfg.trainer, cli_flags.PRETRAIN, PretrainError)
        # Checked here, before the model is built from them (the tile size is its img_size).
        check_at_least(1, {"--data.tile_size": cfg.data.tile_size, "--data.batch_size": cfg.data.batch_size,
                           "--checkpoint_every_n_steps": cfg.checkpoint_every_n_steps}, PretrainError)
        recipes = [str(p) for p in (cfg.get("config") or [])]
        self.recipes = recipes
        if cfg.run_dir is None:
            stem = Path(recipes[-1]).stem if recipes else "pretrain"
            cfg.run_dir = cfg.trainer.default_root_dir or str(Path("runs") / stem)
        cfg.trainer.default_root_dir = cfg.run_dir
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:  # loggers without an explicit folder write into the run dir
            init = getattr(lg, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, "", "."):
                init.save_dir = cfg.run_dir
            # A resumed run logs into the run's newest version_N, not a new one.
            if cfg.resume and init is not None and "version" in init and init.version is None and str(getattr(lg, "class_path", "")).endswith("CSVLogger"):
                init.version = _latest_version(init.save_dir, init.get("name", "lightning_logs") or "")

    def instantiate_trainer(self, **kwargs):
        cfg = self.config
        given = self.config_init.trainer.get("callbacks") or []
        # Lightning writes every checkpoint into a temporary file and renames it on commit
        # (fsspec transaction in lightning_fabric's _atomic_save): a kill -9 mid-save leaves
        # the previous last.ckpt intact.
        checkpoints = ModelCheckpoint(
            dirpath=Path(cfg.run_dir) / "checkpoints",
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,  # no metric to rank by: keeps the newest, besides last.ckpt
            enable_version_counter=False,  # a resumed run overwrites last.ckpt, not last-v1.ckpt
        )
        given = given if isinstance(given, list) else [given]
        shown = run_callbacks(cfg.trainer.get("enable_progress_bar") is not False, cfg.trainer.get("enable_model_summary") is not False)
        kwargs["callbacks"] = given + [checkpoints, RecordRecipe(self.recipes), SeedPerRank()] + shown
        return super().instantiate_trainer(**kwargs)


def check_data(datamodule: EMDataModule) -> None:
    """Open the data once on a copy, so curation and batch-size problems show before training
    (the real datamodule is set up by the trainer, which knows the rank)."""
    probe = copy.deepcopy(datamodule)
    try:
        probe.setup("fit")
    except (NoTilesError, FileNotFoundError, ValueError) as e:
        raise PretrainError(f"data {datamodule.data!r}: {one_line(e)}") from e
    for name, why in probe.dataset.left_out:  # nothing dropped silently
        print(f"ssl-em pretrain: left out image {name}: {why}", file=sys.stderr)


def check_strategy(strategy) -> None:
    """One device or DDP; see `ssl_em.cli_flags.check_strategy`."""
    cli_flags.check_strategy(strategy, PretrainError)


def check_resume(model: PretrainMethod, ckpt_path: Path) -> None:
    """The checkpoint must come from the same method and backbone with the same shapes."""
    ckpt = read_checkpoint(ckpt_path)
    theirs = ckpt.get("ssl_em", {})
    ours = {**run_metadata(model.backbone, None), "method": f"{type(model).__module__}.{type(model).__qualname__}"}
    for key in ("method", "architecture", "model_args"):
        if key in theirs and theirs[key] != ours[key]:
            raise PretrainError(f"{ckpt_path}: was trained with {key} {theirs[key]}, this run has {ours[key]}; use another --run_dir or the same recipe")
    own = model.state_dict()
    state = ckpt["state_dict"]
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise PretrainError(f"{ckpt_path}: its weights do not fit this model ({len(bad)} keys differ, e.g. {bad[:3]}); use another --run_dir")


def init_from_export(model: PretrainMethod, folder: str | Path) -> bool:
    """Load an exported backbone's weights into the method's backbone (and its deployable
    network, when that is another), strictly; the
    architecture and its arguments must match the recipe's. When the export carries the
    method's own weights (SparK's decoder and mask tokens) from the same method, load those
    too, strictly, so continued pretraining resumes the method. Returns whether it did."""
    from ssl_em.backbones import METHOD_STATE, load_backbone, load_strict, read_safetensors

    loaded, meta = load_backbone(folder)
    ours = run_metadata(model.backbone, None)
    if meta.architecture != ours["architecture"]:
        raise PretrainError(f"{folder}: is a {meta.architecture}, the recipe builds a {ours['architecture']}; pick a recipe with that backbone")
    # The student and, where the method deploys another network (DINO's teacher), that one
    # too start from the export: a teacher left at random would teach noise.
    deployable = model.deployable()
    for name in dict.fromkeys(("backbone", deployable)):
        load_strict(getattr(model, name), loaded.state_dict(), str(folder))
    if not carries_method_state(model, folder):
        return False
    state = read_safetensors(Path(folder) / METHOD_STATE)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(deployable + ".")}
    bad = sorted(set(rest) ^ set(state)) + [k for k in rest if k in state and rest[k].shape != state[k].shape]
    if bad:
        raise PretrainError(f"{Path(folder) / METHOD_STATE}: the method's weights do not fit this recipe ({len(bad)} keys differ, e.g. {bad[:3]}: "
                            f"another decoder width?); use the recipe the backbone was trained with (its ssl_em.json has it)")
    model.load_state_dict({**model.state_dict(), **{k: v.to(rest[k].dtype) for k, v in state.items()}}, strict=True)
    return True


def carries_method_state(model: PretrainMethod, folder: str | Path) -> bool:
    """Whether an export carries this method's own weights (METHOD_STATE written by it)."""
    from ssl_em.backbones import method_state_owner

    return method_state_owner(folder) == f"{type(model).__module__}.{type(model).__qualname__}"


def freeze_steps(given: int | None, model: PretrainMethod, folder: str | Path) -> int:
    """Steps the backbone stays frozen when continuing from `folder`: as given, else none
    when the export carries the method's weights, else DEFAULT_FREEZE_STEPS."""
    if given is not None:
        return given
    return 0 if carries_method_state(model, folder) else DEFAULT_FREEZE_STEPS


class FreezeBackbone(Callback):
    """Trains the method's own modules with the backbone frozen (no gradients, BatchNorm
    statistics fixed) for the first `steps` optimizer steps, then the whole network. For
    continued pretraining from an export without the method's weights: a fresh decoder
    trained through a live encoder disturbs it before it predicts anything useful."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        frozen = trainer.global_step < self.steps
        pl_module.backbone.requires_grad_(not frozen)
        pl_module.backbone.train(not frozen)


def chosen_precision(cli: PretrainCLI) -> precision.Precision:
    """The run's precision and layout: ssl_em's choice for its device, or what the user set."""
    cfg = cli.config
    device = precision.device_of(cfg.trainer.accelerator)
    auto = precision.choose(device, model=cli.model)
    given = str(cfg.trainer.precision)
    return precision.choose(device, requested=None if given == auto.lightning else given, channels_last=cfg.channels_last, model=cli.model)


def make_cli(argv: list[str]) -> PretrainCLI:
    """Parse `argv` (short flags, any order: see ssl_em.cli_flags) and instantiate model,
    datamodule and trainer; does not train."""
    args, verbose = cli_flags.prepare(argv, cli_flags.PRETRAIN)
    with quiet(verbose), cli_flags.parse_errors():
        return PretrainCLI(
            PretrainMethod,
            EMDataModule,
            subclass_mode_model=True,
            run=False,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "precision": precision.choose().lightning,
                "logger": {"class_path": "pytorch_lightning.loggers.WandbLogger", "init_args": {"project": "ssl_em", "offline": True}},
            },
            parser_kwargs={"prog": "ssl-em pretrain", "description": __doc__.split("\n")[0], "exit_on_error": False},
        )


def run_argv(argv: list[str]) -> int:
    if cli_flags.wants_short_help(argv):
        return cli_flags.print_short_help(cli_flags.help_text("pretrain"))
    verbose = cli_flags.VERBOSE in argv
    try:
        cli = make_cli(argv)
        cfg = cli.config
        ckpt_path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        check_data(cli.datamodule)
        if cfg.resume and ckpt_path.is_file():
            check_resume(cli.model, ckpt_path)
        elif cfg.init_from:
            resumed_method = init_from_export(cli.model, cfg.init_from)
            print(f"ssl-em pretrain: backbone from {cfg.init_from}; "
                  + ("the method's decoder and tokens too" if resumed_method else "the method's decoder starts fresh (the export has none of this method)"), flush=True)
        if cfg.init_from:  # also when resumed: a run killed during the frozen phase stays frozen
            cli.trainer.callbacks.append(RecordLineage(cfg.init_from))
            freeze = freeze_steps(cfg.freeze_backbone_steps, cli.model, cfg.init_from)
            if freeze:
                print(f"ssl-em pretrain: backbone frozen for the first {freeze} steps while the decoder learns", flush=True)
                cli.trainer.callbacks.append(FreezeBackbone(freeze))
    except Exception as e:  # jsonargparse wraps errors raised while instantiating the classes
        cause = find_user_error(e)
        if cause is None or debug_enabled():
            raise
        print(f"ssl-em pretrain: error: {one_line(cause)}", file=sys.stderr)
        return 2
    if cfg.resume and not ckpt_path.is_file():
        print(f"ssl-em pretrain: nothing to resume in {ckpt_path.parent}; starting from scratch", file=sys.stderr)
    if cfg.resume and ckpt_path.is_file():
        continue_csv_metrics(cli.trainer, int(read_checkpoint(ckpt_path).get("global_step", 0)))
        # Lightning looks for a stateful DataLoader; ours resumes through EMDataModule.state_dict.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    chosen = chosen_precision(cli)
    chosen.apply(cli.model)
    print(f"ssl-em pretrain: precision {chosen.why}", flush=True)
    if cfg.compile:
        cli.model.compile()
    resume = cfg.resume and ckpt_path.is_file()
    print(f"ssl-em pretrain: {cfg.trainer.max_steps} steps{' (resuming)' if resume else ''}; run folder {cfg.run_dir} "
          f"(checkpoints/last.ckpt every {cfg.checkpoint_every_n_steps} steps, config.yaml, logs); then: ssl-em export {cfg.run_dir} --out checkpoints/NAME", flush=True)
    try:
        with quiet(verbose):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt_path) if resume else None)
    except Exception as e:  # a non-finite loss, a full disk, a damaged chunk: one line, exit 2
        cause = find_user_error(e)
        if cause is None or debug_enabled():
            raise
        print(f"ssl-em pretrain: error: {one_line(cause)}", file=sys.stderr)
        return 2
    print(f"ssl-em pretrain: finished at step {cli.trainer.global_step}; checkpoints in {ckpt_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_argv(sys.argv[1:]))
