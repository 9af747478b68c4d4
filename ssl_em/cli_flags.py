"""Short flags, argument order and short help for the LightningCLI commands (pretrain, finetune).

LightningCLI takes every setting by its full key (`--trainer.max_steps`); users type the
few that matter (`--max-steps`). Each command lists its short flags as `Shortcut`s here,
and that one table drives both the translation (`expand`) and the short help (`short_help`).
This module imports nothing heavy, so `ssl-em pretrain --help` prints without loading torch
or Lightning.

Order: jsonargparse applies arguments left to right, so a `--config` given after a flag
would silently override it. `config_first` moves every `--config` to the front: recipes
first, then each explicit flag, whatever order they were typed in.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

CONFIG_FLAGS = ("--config", "-c")
#: Full LightningCLI help, every key of every class (hundreds of lines).
HELP_ALL = "--help-all"
HELP = ("-h", "--help")
#: Show Lightning's tips and expected warnings too (they are hidden by default).
VERBOSE = "--verbose"


@dataclass(frozen=True)
class Shortcut:
    """`flag` stands for `key`. switch: takes no value (becomes `key true`); listing: a
    comma-separated value becomes a YAML list; config_suffixes: a value ending so is left to
    jsonargparse (`--data settings.yaml` is a config file for the data group)."""

    flag: str
    key: str
    help: str
    metavar: str = ""
    switch: bool = False
    listing: bool = False
    config_suffixes: tuple[str, ...] = ()


def config_first(argv: list[str]) -> list[str]:
    """Move every `--config X` / `--config=X` / `-c X` to the front, keeping their order."""
    configs, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in CONFIG_FLAGS and i + 1 < len(argv):
            configs += [a, argv[i + 1]]
            i += 2
            continue
        (configs if a.startswith("--config=") else rest).append(a)
        i += 1
    return configs + rest


def given_keys(argv: list[str]) -> set[str]:
    """Every full key the user set, on the command line or in a `--config` recipe, as dotted
    keys ("model.lr", "model.head.init_args.width"): argv as `prepare` returns it. The keys
    left out are at their defaults, which a backbone's own recommendations may replace."""
    keys, i = set(), 0
    while i < len(argv):
        a = argv[i]
        if a in CONFIG_FLAGS or a.startswith("--config="):
            path = argv[i + 1] if a in CONFIG_FLAGS and i + 1 < len(argv) else a.partition("=")[2]
            keys |= _recipe_keys(path)
            i += 2 if a in CONFIG_FLAGS else 1
            continue
        if a.startswith("--"):
            keys.add(a[2:].partition("=")[0])
        i += 1
    return keys


def _recipe_keys(path: str) -> set[str]:
    """Dotted keys of a YAML recipe; none when it cannot be read (jsonargparse then says why)."""
    import yaml

    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()

    def walk(node, prefix: str) -> set[str]:
        keys = set()
        for k, v in node.items() if isinstance(node, dict) else ():
            keys |= {f"{prefix}{k}"} | walk(v, f"{prefix}{k}.")
        return keys

    return walk(tree, "")


def expand(argv: list[str], shortcuts: list[Shortcut]) -> list[str]:
    """Translate short flags into LightningCLI keys; everything else passes unchanged."""
    table = {s.flag: s for s in shortcuts}
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        s = table.get(flag)
        if s is None:
            out.append(argv[i])
            i += 1
            continue
        if s.switch and not eq and (i + 1 >= len(argv) or argv[i + 1].lower() not in ("true", "false")):
            value, i = "true", i + 1
        elif not eq:
            if i + 1 >= len(argv):
                out.append(argv[i])  # jsonargparse says what is missing
                break
            value, i = argv[i + 1], i + 2
        else:
            i += 1
        if s.config_suffixes and value.endswith(s.config_suffixes):
            out += [flag, value]
        elif s.listing and not value.startswith("["):
            out += [s.key, "[" + ",".join(v.strip() for v in value.split(",")) + "]"]
        else:
            out += [s.key, value]
    return out


def prepare(argv: list[str], shortcuts: list[Shortcut]) -> tuple[list[str], bool]:
    """(argv for LightningCLI, verbose): short flags expanded, configs first, `--help-all`
    turned into LightningCLI's `--help`, `--verbose` taken out."""
    verbose = VERBOSE in argv
    argv = ["--help" if a == HELP_ALL else a for a in argv if a != VERBOSE]
    argv = config_first(expand(argv, shortcuts))
    check_recipes(argv)
    return argv, verbose


def check_recipes(argv: list[str]) -> None:
    """UserError naming the file (and the line) when a `--config` recipe is missing, not
    YAML, empty or not a mapping: jsonargparse reports these without the file's name, after
    a page of usage."""
    import yaml

    from ssl_em.errors import UserError

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in CONFIG_FLAGS] + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"--config {path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
        if data is None:
            raise UserError(f"--config {path}: is empty; a recipe is a YAML mapping of settings (model:, data:, trainer:...)")
        if not isinstance(data, dict):
            raise UserError(f"--config {path}: holds a YAML {type(data).__name__}, not a mapping of settings (model:, data:, trainer:...)")


class parse_errors:
    """Context manager: jsonargparse's parse errors (its parsers are built with
    exit_on_error=False, so no page of usage is printed first) become a UserError whose
    message names the key, which `ssl-em` prints as one line."""

    def __enter__(self) -> "parse_errors":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        from jsonargparse import ArgumentError

        from ssl_em.errors import UserError

        if isinstance(err, ArgumentError):
            raise UserError(one_parse_error(str(err))) from err
        return False


def one_parse_error(text: str) -> str:
    """jsonargparse's nested report ('Parser key "model":' then the union's subtypes, each
    one's errors, the value given) -> "--model: Option 'nope' is not accepted": the key
    and the most specific reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "cannot parse the arguments"
    head = lines[0].replace("Parser key ", "").rstrip(":").strip('"')
    noise = ("Subtypes:", "Errors:", "Given value", "Does not validate", "- Expected a <class 'NoneType'>", "- Problem with")
    details = [line.lstrip("- ") for line in lines[1:] if not line.startswith(noise)]
    if not details:
        return head
    key = f"--{head}" if head and " " not in head else head
    return f"{key}: {details[0]}"


def describe_data_flag(parser, text: str, metavar: str = "ARCHIVE") -> None:
    """jsonargparse describes a LightningCLI's `--data` as "Path to a configuration file";
    say what it takes for this command instead (a jsonargparse parser, after the data group)."""
    action = parser._option_string_actions.get("--data")
    if action is not None:
        action.help, action.metavar = text, metavar


def wants_short_help(argv: list[str]) -> bool:
    return any(a in HELP for a in argv)


def short_help(prog: str, summary: str, shortcuts: list[Shortcut], examples: str, more: str = "") -> str:
    """The help a user reads first: what the command does, its short flags, examples."""
    width = max([len(f"{s.flag} {s.metavar}".strip()) for s in shortcuts] + [len("--config RECIPE.yaml")]) + 2
    lines = [f"usage: {prog} [--config RECIPE.yaml] [options]", "", summary, "", "options:"]
    for s in shortcuts:
        lines.append(f"  {f'{s.flag} {s.metavar}'.strip():{width}}{s.help}")
    lines += [
        f"  {'--config RECIPE.yaml':{width}}a recipe (recipes/); applied first, then every other flag, whatever the order",
        f"  {'--KEY VALUE':{width}}any setting by its full key, e.g. --trainer.max_steps 1000 (see --help-all)",
        f"  {'--print_config':{width}}print the resolved settings as YAML and exit",
        f"  {VERBOSE:{width}}also show Lightning's tips and expected warnings",
        f"  {HELP_ALL:{width}}every setting of every class (long)",
    ]
    if more:
        lines += ["", more.strip()]
    lines += ["", "examples:", examples.rstrip()]
    return "\n".join(lines) + "\n"


def print_short_help(text: str) -> int:
    sys.stdout.write(text)
    return 0


def flag_for(key: str, shortcuts: list[Shortcut]) -> str:
    """The flag a user types for the dotted `key` ("trainer.max_steps" -> "--max-steps")."""
    return next((s.flag for s in shortcuts if s.key == f"--{key}"), f"--{key}")


def check_trainer(trainer, shortcuts: list[Shortcut], error) -> None:
    """`error` naming the flag when the trainer settings cannot work, before Lightning meets
    them (it raises a traceback for these, or for max_steps -1 trains forever):
    max_steps >= 1 (or -1 with max_epochs), devices >= 1 or -1 or "auto", an accelerator
    Lightning knows."""
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    by_epochs = steps == -1 and isinstance(epochs, int) and epochs >= 1  # Lightning's "-1: no step limit"
    if steps is not None and not by_epochs and (not isinstance(steps, int) or steps < 1):
        raise error(f"{flag_for('trainer.max_steps', shortcuts)} {steps}: must be >= 1 (or -1 with --trainer.max_epochs N)")
    devices = trainer.get("devices")
    as_int = devices if isinstance(devices, int) else int(devices) if isinstance(devices, str) and devices.lstrip("-").isdigit() else None
    if as_int is not None and as_int < 1 and as_int != -1:
        raise error(f"{flag_for('trainer.devices', shortcuts)} {devices}: must be >= 1, -1 (all) or auto")
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        from pytorch_lightning.accelerators import AcceleratorRegistry

        known = sorted(set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu", "tpu"})
        if accelerator.lower() not in known:
            raise error(f"{flag_for('trainer.accelerator', shortcuts)} {accelerator}: not an accelerator; use one of {', '.join(known)}")
    if trainer.get("sync_batchnorm") and _on_cpu(accelerator):
        raise error("--trainer.sync_batchnorm true: torch's SyncBatchNorm runs on GPUs only (DDP refuses it on CPUs); leave it off on a CPU")


def _on_cpu(accelerator) -> bool:
    """Whether Lightning will run on the CPU: asked for, or "auto" where no GPU is found."""
    import torch

    name = accelerator.lower() if isinstance(accelerator, str) else accelerator
    return name == "cpu" or (name in (None, "auto") and not torch.cuda.is_available())


def check_strategy(strategy, error) -> None:
    """One device or DDP (any launcher, any number of nodes), for pretraining and
    fine-tuning alike. Strategies that shard the parameters (FSDP, DeepSpeed, model parallel)
    are refused: the weight-decay groups decide by a parameter's shape, which a flat shard
    hides, the momentum teacher's update pairs parameters one by one, and export writes the
    whole backbone's state_dict. `strategy`: the configured name or class_path, or an instance."""
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

    if isinstance(strategy, str) and strategy in StrategyRegistry:
        name = StrategyRegistry[strategy]["strategy"].__name__
    elif isinstance(strategy, str) or strategy is None:
        name = strategy or "auto"
    elif hasattr(strategy, "class_path"):
        name = strategy.class_path.rsplit(".", 1)[-1]
    else:
        name = type(strategy).__name__
    ok = {"auto", "ddp", DDPStrategy.__name__, SingleDeviceStrategy.__name__}
    if name not in ok and not (isinstance(strategy, (DDPStrategy, SingleDeviceStrategy))):
        raise error(f"--trainer.strategy: strategy {name} is not supported; use ddp (several devices or nodes) or a single device")


PRETRAIN = [
    Shortcut("--data", "--data.data", "an ssl_em archive (ARCHIVE.zarr from `ssl-em ingest`) or raw volumes", "ARCHIVE.zarr", config_suffixes=(".yaml", ".yml", ".json")),
    Shortcut("--max-steps", "--trainer.max_steps", "optimizer steps to train for (the recipe's otherwise)", "N"),
    Shortcut("--batch-size", "--data.batch_size", "tiles per step and device", "N"),
    Shortcut("--tile-size", "--data.tile_size", "tile edge in pixels", "PX"),
    Shortcut("--pixel-size", "--data.pixel_size_nm", "nm per pixel to resample every source to (default: native)", "NM"),
    Shortcut("--run_dir", "--run_dir", "the run's folder: checkpoints, config, logs (default runs/<recipe name>)", "DIR"),
    Shortcut("--resume", "--resume", "continue from <run_dir>/checkpoints/last.ckpt", switch=True),
    Shortcut("--compile", "--compile", "torch.compile the method's forward", switch=True),
    Shortcut("--devices", "--trainer.devices", "GPUs (or CPU processes) to use", "N"),
    Shortcut("--init_from", "--init_from", "continue pretraining a published backbone (checkpoints/NAME) on your data: its encoder, and its decoder when exported", "DIR"),
    Shortcut("--max-time", "--trainer.max_time", "stop after this wall time, DD:HH:MM:SS (a time budget; checkpoints are kept)", "T"),
    Shortcut("--precision", "--trainer.precision", "32-true or bf16-mixed (default: bf16 where the CPU or GPU has bf16 units)", "P"),
]

PRETRAIN_EXAMPLES = """\
  ssl-em pretrain --config recipes/pretrain/mae_vit_s16.yaml --data archive.zarr --max-steps 100000
  ssl-em pretrain --config recipes/pretrain/mae_vit_s16.yaml --data archive.zarr --resume   # after a crash
  ssl-em pretrain --config recipes/pretrain/tiny_cpu.yaml --data archive.zarr --max-steps 50  # minutes on a CPU
  ssl-em pretrain --config recipes/pretrain/mae_vit_s16.yaml --data archive.zarr --model.init_args.mask_ratio 0.6
  ssl-em pretrain --config recipes/pretrain/spark_resnet18_adapt.yaml --data my_lab.zarr \
      --init_from checkpoints/em_resnet18_spark_v3    # adapt the shipped backbone to your data (<= 30 min on a CPU)"""

PRETRAIN_SUMMARY = """\
Self-supervised pretraining of a timm backbone on tiles streamed from an archive. The recipe
(recipes/pretrain/*.yaml) picks the method (MAE, SparK, MoCo v3, SimCLR) and the backbone. Then
`ssl-em export <run_dir> --out checkpoints/NAME` writes the backbone for fine-tuning."""

FINETUNE = [
    Shortcut("--backbone", "--model.backbone", "an exported backbone folder (ssl-em export) or a timm name", "DIR"),
    Shortcut("--images", "--data.images", "the image volume: TIFF, folder of 2D images, zarr, HDF5 (file.h5:/raw)...", "PATH"),
    Shortcut("--labels", "--data.labels", "the label volume, same shape as --images", "PATH"),
    Shortcut("--task", "--data.task", "semantic (class per pixel) or instance (cells, neurons)", "TASK"),
    Shortcut("--train-slices", "--data.train_slices", "labeled z-slices to train on, e.g. 0,1 or 0-3", "Z"),
    Shortcut("--val-slices", "--data.val_slices", "held-out z-slices to score, e.g. 20-29", "Z"),
    Shortcut("--classes", "--data.classes", "class names in label-value order, e.g. membrane,cell", "A,B", listing=True),
    Shortcut("--label-values", "--data.label_values", "the label value of each class, e.g. 0,255", "V,W", listing=True),
    Shortcut("--max-steps", "--trainer.max_steps", "optimizer steps (default 1000)", "N"),
    Shortcut("--unfreeze-at-step", "--model.unfreeze_at_step", "train the head alone this long, then the whole network (default 100; null: keep frozen)", "N"),
    Shortcut("--tile-size", "--data.tile_size", "training tile edge in pixels", "PX"),
    Shortcut("--batch-size", "--data.batch_size", "tiles per step", "N"),
    Shortcut("--lr", "--model.lr", "head learning rate (the backbone's is 0.1x for a pretrained one)", "LR"),
    Shortcut("--random-init", "--model.random_init", "same architecture with random weights (the baseline)", switch=True),
    Shortcut("--seed", "--seed_everything", "random seed", "S"),
    Shortcut("--semi-supervised", "--model.semi_supervised", "also learn from unlabeled slices: a mean teacher's confident predictions (FixMatch-style)", switch=True),
    Shortcut("--unlabeled-slices", "--data.unlabeled_slices", "unlabeled z-slices for --semi-supervised (default: all neither trained on nor scored)", "Z"),
    Shortcut("--out", "--out", "folder to export the fine-tuned model to (for ssl-em predict)", "DIR"),
    Shortcut("--precision", "--trainer.precision", "32-true or bf16-mixed (default: bf16 where the CPU or GPU has bf16 units)", "P"),
]

FINETUNE_EXAMPLES = """\
  ssl-em finetune --backbone checkpoints/my_lab_mae --images img.tif --labels lbl.tif \\
      --classes membrane,cell --label-values 0,255 --train-slices 0,1 --val-slices 20-29 --out models/membranes
  ssl-em finetune ... --random-init                                   # the same network, random weights
  ssl-em finetune ... --config recipes/finetune/linear_probe.yaml     # frozen backbone, linear head"""

FINETUNE_SUMMARY = """\
Fine-tune a pretrained backbone and a segmentation head on a few labeled slices, score the
held-out slices, and export the model for `ssl-em predict`. Without --config the head
(UNETR for ViTs, U-Net for CNNs) trains alone for 100 steps, then the whole network."""

SHORT_HELP = {
    "pretrain": ("ssl-em pretrain", PRETRAIN_SUMMARY, PRETRAIN, PRETRAIN_EXAMPLES),
    "finetune": ("ssl-em finetune", FINETUNE_SUMMARY, FINETUNE, FINETUNE_EXAMPLES),
}


def help_text(command: str) -> str:
    return short_help(*SHORT_HELP[command])
