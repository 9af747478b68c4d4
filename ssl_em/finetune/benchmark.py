"""`ssl-em benchmark label-efficiency`: does pretraining pay off, and at how many labels?

Arms: each backbone; always a randomly initialised twin of each architecture; and always
the baseline a lab would otherwise use, a CNN U-Net trained from scratch end to end (a timm
encoder, `resnet18` by default, with ssl_em's UNetHead, at its own lr). When a backbone is
a CNN of the U-Net's own architecture, its twin and the U-Net are one model, run once and
named "U-Net from scratch (<encoder>)". For each arm, label budget (number of labeled
training slices) and seed, it fine-tunes with `ssl_em.finetune.cli.finetune`, scores the
held-out slices, and appends one CSV row; the U-Net also runs with the whole pool, the
"all labels" ceiling every table shows. The CSV is the record: a re-run skips the (arm,
budget, seed) rows already in it, so an interrupted benchmark resumes. At the end it
writes table.md (mean ± std over seeds; gains over the twin and over the U-Net, paired by
seed; labels saved: the fraction of the gap to the all-labels U-Net each arm closes and its
label multiple, `labels_saved`), summary.csv (the same per arm and budget) and plot.png
(score against labeled slices, the ceiling as a dotted line; label multiples beside it),
all by `ssl_em.finetune.benchmark_report`.
`--semi-supervised` fine-tunes every arm with a mean teacher on the pool slices each budget
leaves unlabeled (`ssl_em.finetune.semi`); the rows record it in their settings.

    ssl-em benchmark label-efficiency --backbones checkpoints/A checkpoints/B \\
        --images isbi2012/train/image --labels isbi2012/train/label \\
        --label-values 0,255 --classes membrane,cell --metric dice/membrane \\
        --pool 0-19 --val-slices 20-29 --budgets 1,2,4,8 --seeds 0,1,2 --out results/isbi
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_em.errors import UserError, check_at_least
from ssl_em.finetune.benchmark_report import appender, is_semi_supervised, protocol_rows, read_rows, report, twin_name


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: a backbone, pretrained or randomly initialised.

    twin, baseline: the arms this arm's scores are paired with (an arm that *is* the twin
    or the baseline names itself). settings: `finetune` keyword arguments that differ for
    this arm (the U-Net's own lr, trained end to end from the first step).
    """

    name: str
    backbone: str
    random_init: bool = False
    twin: str = ""
    baseline: str = ""
    settings: dict = field(default_factory=dict, compare=False, hash=False)


def unet_name(encoder: str) -> str:
    return f"U-Net from scratch ({encoder})"


def arms_for(backbones: list[str], random_twins: bool = True, unet_encoder: str | None = "resnet18", unet_lr: float = 1e-3,
             pretrained_settings: dict | None = None) -> list[Arm]:
    """The pretrained arms, one random-init arm per distinct architecture (backbones of one
    architecture, MAE and MoCo of one ViT say, share it), then the U-Net from scratch
    (`unet_encoder` None leaves it out). A backbone whose architecture is the U-Net's
    encoder (timm name, in_chans 1, no other model arguments) has the U-Net as its twin.
    pretrained_settings: `finetune` keyword arguments for the pretrained arms only (their
    backbone_lr_scale, say), so the baselines keep their own. A pretrained arm starts from
    the settings its backbone recommends (`BackboneMeta.finetune`); pretrained_settings
    override them."""
    from ssl_em.backbones import backbone_meta

    unet = Arm(unet_name(unet_encoder), unet_encoder, True, unet_name(unet_encoder), unet_name(unet_encoder), {"lr": unet_lr, "unfreeze_at_step": 0}) if unet_encoder else None
    pretrained, twins = [], {}
    for b in backbones:
        meta = backbone_meta(b)
        arch = json.dumps(_arch_key(meta, b))
        if unet is not None and arch == json.dumps(_arch_key(None, unet_encoder)):
            twin = unet
        else:
            twin = twins.setdefault(arch, Arm(twin_name(b), b, True, twin_name(b), unet.name if unet else ""))
        settings = {**(meta.finetune if meta else {}), **(pretrained_settings or {})}
        pretrained.append(Arm(Path(b).name, b, False, twin.name, unet.name if unet else "", settings))
    return pretrained + (list(twins.values()) if random_twins else []) + ([unet] if unet else [])


#: Model arguments every ssl_em backbone is built with (`build_backbone`: grayscale, no
#: classifier); recorded in an export's model_args, they do not make another architecture.
BUILD_DEFAULTS = {"in_chans": 1, "num_classes": 0, "global_pool": "avg"}


def _arch_key(meta, fallback: str):
    """What makes two backbones the same architecture; a timm name (no metadata) is that
    architecture with in_chans 1 and timm's defaults, as `resolve_backbone` builds it."""
    if meta is None:
        return [fallback, {}] if not Path(fallback).exists() else fallback
    args = {k: v for k, v in meta.model_args.items() if k != "img_size" and BUILD_DEFAULTS.get(k, object()) != v}
    return [meta.architecture, args]


def choose_slices(pool: list[int], budget: int, seed: int) -> list[int]:
    """`budget` training slices from the pool, a seeded random subset (sorted)."""
    if budget > len(pool):
        raise UserError(f"--budgets: label budget {budget} exceeds the {len(pool)} slices of the training pool (--pool)")
    if budget < 1:
        raise UserError(f"--budgets: label budget {budget} must be >= 1")
    rng = np.random.default_rng([seed, budget])
    return sorted(int(z) for z in rng.choice(pool, size=budget, replace=False))


#: The fine-tuning settings a row records (what an arm's recipe or the flags made them).
RECORDED = ("lr", "unfreeze_at_step", "backbone_lr_scale", "semi_supervised")


def semi_supervised_cell(settings: dict, pool: list[int], train: list[int]) -> dict:
    """With `semi_supervised` in the settings: the unlabeled slices of a cell are the pool
    slices this budget leaves unlabeled, never the scored ones (the validation slices are
    outside the pool); a cell that labels the whole pool (the ceiling) has none and runs
    supervised, and says so."""
    if not settings.get("semi_supervised"):
        return settings
    unlabeled = [z for z in pool if z not in set(train)]
    return {**settings, "semi_supervised": bool(unlabeled), "unlabeled_slices": unlabeled or None}


def check_same_protocol(rows: list[dict], semi_supervised: bool, csv_path: Path) -> None:
    """A folder's rows are one protocol: resuming with --semi-supervised where the rows were
    run without it (or the other way round) would mix both in one table (`protocol_rows` are
    counted)."""
    other = [r for r in protocol_rows(rows) if is_semi_supervised(r) != semi_supervised]
    if other:
        raise UserError(f"{csv_path} holds {len(other)} rows fine-tuned {'without' if semi_supervised else 'with'} --semi-supervised "
                        f"(e.g. {other[0]['arm']}, {other[0]['budget']} slices); give another --out")


def label_efficiency(arms: list[Arm], images, labels, pool: list[int], val_slices: list[int], budgets: list[int], seeds: list[int],
                     out: str | Path, metric: str = "mean_iou", task: str = "semantic", finetune_kwargs: dict | None = None,
                     progress: bool = True, ceiling: bool = True) -> list[dict]:
    """Run (or resume) the grid; returns all CSV rows. Rows are appended as each run ends.

    ceiling: the baseline arm (the U-Net, whose `baseline` is itself) also runs with every
    slice of the pool, whatever the budgets, for the "all labels" ceiling row.
    progress: one line per cell (which, its score, time left for the rest) and a step bar."""
    from ssl_em.finetune.cli import finetune

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    check_same_protocol(rows, bool((finetune_kwargs or {}).get("semi_supervised")), csv_path)
    done = {(r["arm"], int(r["budget"]), int(r["seed"])) for r in rows}
    grid = [(a, b, s) for b in budgets for s in seeds for a in arms]
    if ceiling and len(pool) not in budgets:
        grid += [(a, len(pool), s) for s in seeds for a in arms if a.baseline == a.name]
    todo = [g for g in grid if (g[0].name, g[1], g[2]) not in done]
    _check_same_settings(rows, grid, len(pool), finetune_kwargs, csv_path)
    with appender(csv_path, rows) as (f, writer):
        started = time.time()
        for i, (arm, budget, seed) in enumerate(todo):
            train = choose_slices(pool, budget, seed)
            if progress:
                print(f"[cell {i + 1}/{len(todo)}] {arm.name}, {budget} labeled slice(s) {train}, seed {seed}", flush=True)
            t0 = time.time()
            settings = semi_supervised_cell({**(finetune_kwargs or {}), **arm.settings}, pool, train)
            _, metrics = finetune(arm.backbone, images, labels, train, val_slices, task=task, random_init=arm.random_init, seed=seed, progress=progress, **settings)
            if metric not in metrics:
                raise KeyError(f"metric {metric!r} not among {sorted(metrics)}")
            row = {"arm": arm.name, "backbone": arm.backbone, "random_init": arm.random_init, "twin": arm.twin, "baseline": arm.baseline, "budget": budget, "seed": seed,
                   "train_slices": " ".join(map(str, train)), "metric": metric, "score": metrics[metric],
                   "seconds": round(time.time() - t0, 1), "metrics_json": json.dumps(metrics), "pool": len(pool),
                   "settings": json.dumps({k: settings[k] for k in RECORDED if k in settings})}
            writer.writerow(row)
            f.flush()  # a crash loses at most the run in progress
            rows.append({k: str(v) for k, v in row.items()})
            if progress:
                left = (time.time() - started) / (i + 1) * (len(todo) - i - 1)
                print(f"[cell {i + 1}/{len(todo)}] {metric} {row['score']:.3f} in {row['seconds']:.0f} s" + (f"; about {_duration(left)} left for {len(todo) - i - 1} more" if i + 1 < len(todo) else ""), flush=True)
    return rows


def _recorded(arm: Arm, finetune_kwargs: dict | None) -> dict:
    """The settings a row of `arm` records (its "settings" column)."""
    settings = {**(finetune_kwargs or {}), **arm.settings}
    return {k: settings[k] for k in RECORDED if k in settings}


def _check_same_settings(rows: list[dict], grid: list, pool: int, finetune_kwargs: dict | None, csv_path: Path) -> None:
    """UserError when results.csv already holds a cell of this grid run with other settings
    (lr, unfreeze_at_step, backbone_lr_scale, pool size): resuming would skip it and mix
    its row with new ones in one table. Rows from before a column existed are not judged on it."""
    ours = {(a.name, b, s): _recorded(a, finetune_kwargs) for a, b, s in grid}
    for r in rows:
        want = ours.get((r["arm"], int(r["budget"]), int(r["seed"])))
        if want is None:
            continue
        theirs = json.loads(r.get("settings") or "{}")
        differ = sorted(k for k in theirs if theirs[k] != want.get(k)) + (["pool"] if r.get("pool") and int(r["pool"]) != pool else [])
        if differ:
            raise UserError(f"{csv_path}: already holds {r['arm']}, {r['budget']} slice(s), seed {r['seed']} run with other {', '.join(differ)} "
                            f"({ {k: theirs.get(k, r.get(k)) for k in differ} }); use another --out, or the same settings to resume")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _ints(spec: str, flag: str) -> list[int]:
    from ssl_em.data.labels import parse_slices

    return parse_slices(spec, 1 << 30, flag)


def check_backbone(backbone: str) -> None:
    """An exported folder (with ssl_em.json) or a timm name, checked before any run starts."""
    import timm

    from ssl_em.backbones import META, load_backbone

    path = Path(backbone)
    if path.exists() or "/" in backbone:
        if not (path / META).is_file():
            raise UserError(f"--backbones {backbone}: not an exported backbone folder (no {META}); make one with `ssl-em export`")
        load_backbone(path)  # damaged or foreign folders fail here, by name
    elif not timm.is_model(backbone):
        raise UserError(f"--backbones {backbone}: neither a folder nor a timm model name")


def check_data(images, labels, pool: list[int], val: list[int], task: str, data_kwargs: dict) -> None:
    """Load the pool and the scored slices once, as every run will: a wrong path, shapes that
    differ, a slice out of range, a pool slice that is also scored, or labels outside
    --label-values then fail before the first of many runs, not in the middle of the grid."""
    from ssl_em.finetune.data import LabeledSlicesDataModule

    LabeledSlicesDataModule(images, labels, pool, val, task=task, **data_kwargs)


def head_of_width(width: int):
    """The default head (UNETR for ViTs, U-Net for CNNs) scaled by one width knob."""
    import functools

    from ssl_em.finetune.heads import default_head

    return functools.partial(default_head, width=width, min_width=width // 4, skip_width=width // 2, stem_width=width // 4)


def configure(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    le = kinds.add_parser("label-efficiency", help="fine-tune pretrained and random-init backbones, and a U-Net from scratch, over label budgets and seeds")
    le.add_argument("--backbones", nargs="+", required=True, help="exported backbone folders (a random-init twin of each architecture and a U-Net from scratch are added)")
    le.add_argument("--images", required=True)
    le.add_argument("--labels", required=True)
    le.add_argument("--pool", required=True, help="slices training subsets are drawn from, e.g. 0-19")
    le.add_argument("--val-slices", required=True, help="held-out slices that are scored, e.g. 20-29")
    le.add_argument("--budgets", default="1,2,4,8", help="numbers of labeled slices; 'all' is the whole pool (default 1,2,4,8)")
    le.add_argument("--seeds", default="0,1,2")
    le.add_argument("--task", default="semantic", choices=["semantic", "instance"])
    le.add_argument("--metric", default="mean_iou", help="column to compare, e.g. mean_iou, dice/membrane, voi")
    le.add_argument("--classes", default=None, help="class names, e.g. membrane,cell")
    le.add_argument("--label-values", default=None, help="label value of each class, e.g. 0,255")
    le.add_argument("--max-steps", type=int, default=None, help="fixed steps per run (default: scaled to the labeled pixels, see --min-steps)")
    le.add_argument("--min-steps", type=int, default=None, help="steps = clip(min + per-mpx x labeled megapixels, min, cap); default 300")
    le.add_argument("--steps-per-mpx", type=float, default=None, help="default 400 (a 512 x 512 slice is 0.26 megapixels)")
    le.add_argument("--step-cap", type=int, default=None, help="default 1000")
    le.add_argument("--holdout", type=float, default=0.15, help="fraction of each labeled slice held out to keep the best weights (0: keep the last)")
    le.add_argument("--class-balance", type=float, default=0.5, help="chance a training tile is centred on a pixel of a random class")
    le.add_argument("--dice-weight", type=float, default=1.0, help="loss = cross-entropy + this x soft Dice")
    le.add_argument("--unet-encoder", default="resnet18", help="timm encoder of the U-Net-from-scratch baseline (always run)")
    le.add_argument("--unet-lr", type=float, default=1e-3, help="lr of the U-Net baseline, trained end to end")
    le.add_argument("--tile-size", type=int, default=128)
    le.add_argument("--batch-size", type=int, default=8)
    le.add_argument("--lr", type=float, default=1e-3)
    le.add_argument("--head-width", type=int, default=128, help="decoder width of the default head (128; 64 is ~4x cheaper on a CPU)")
    le.add_argument("--unfreeze-at-step", type=int, default=None, help="fine-tune the backbone after N steps (default: what the backbone's ssl_em.json recommends, else frozen)")
    le.add_argument("--backbone-lr-scale", type=float, default=None,
                    help="backbone lr / head lr for the pretrained arms (default: the backbone's recommendation, else 0.1; 1.0 fine-tunes them exactly as the U-Net)")
    le.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the U-Net on the whole pool, for the all-labels ceiling (default: yes)")
    le.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=None, help="fine-tuning and scoring precision (default: bf16 where the CPU or GPU has bf16 units, ssl_em.precision)")
    le.add_argument("--semi-supervised", action="store_true",
                    help="every arm also learns from the pool slices its budget leaves unlabeled (mean teacher, FixMatch-style); rows record it")
    le.add_argument("--out", required=True, help="folder for results.csv, table.md, summary.csv, plot.png")
    rep = kinds.add_parser("report", help="rewrite table.md, summary.csv and plot.png from results.csv, merging other result folders")
    rep.add_argument("--out", required=True, help="the benchmark folder (its results.csv is extended by --merge)")
    rep.add_argument("--metric", default="mean_iou")
    rep.add_argument("--merge", nargs="*", default=[], help="other benchmark folders, e.g. seeds run in parallel processes")
    rep.add_argument("--title", default="")


def run(args) -> int:
    from ssl_em.console import quiet

    if args.kind == "report":
        print(report(args.out, args.metric, args.title, merge=args.merge))
        return 0
    data_kwargs = {}
    if args.classes:
        data_kwargs["classes"] = args.classes.split(",")
    if args.label_values:
        data_kwargs["label_values"] = [int(v) for v in args.label_values.split(",")]
    data_kwargs["class_balance"] = args.class_balance
    from ssl_em.finetune.schedule import StepSchedule

    chosen = {"min_steps": args.min_steps, "steps_per_mpx": args.steps_per_mpx, "max_steps": args.step_cap}
    kwargs = {"max_steps": args.max_steps, "steps": StepSchedule(**{k: v for k, v in chosen.items() if v is not None}), "holdout": args.holdout,
              "dice_weight": args.dice_weight, "tile_size": args.tile_size, "batch_size": args.batch_size, "lr": args.lr,
              "unfreeze_at_step": args.unfreeze_at_step, "data_kwargs": data_kwargs, "head": head_of_width(args.head_width), "precision": args.precision}
    if args.semi_supervised:
        kwargs["semi_supervised"] = True
    pool, val = _ints(args.pool, "--pool"), _ints(args.val_slices, "--val-slices")
    try:
        budgets = [len(pool) if b.strip() == "all" else int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise UserError(f"--budgets {args.budgets}: give numbers of slices, e.g. 1,2,4,8 (or all)") from None
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: give integers, e.g. 0,1,2") from None
    for b in budgets:  # every mistake shows before the first of many fine-tuning runs
        choose_slices(pool, b, 0)
    check_at_least(1, {"--max-steps": args.max_steps, "--tile-size": args.tile_size, "--batch-size": args.batch_size, "--head-width": args.head_width})
    for b in args.backbones:
        check_backbone(b)
    check_data(args.images, args.labels, pool, val, args.task, data_kwargs)
    from ssl_em.precision import choose

    print(f"ssl-em benchmark: precision {choose(requested=args.precision).why}", flush=True)
    print(f"ssl-em benchmark: results go to {Path(args.out) / 'results.csv'} (a rerun skips the cells already there)", flush=True)
    with quiet():
        # What the user typed beats what a backbone recommends (its ssl_em.json).
        typed = {"backbone_lr_scale": args.backbone_lr_scale, "unfreeze_at_step": args.unfreeze_at_step}
        pretrained = {k: v for k, v in typed.items() if v is not None}
        label_efficiency(arms_for(args.backbones, unet_encoder=args.unet_encoder, unet_lr=args.unet_lr, pretrained_settings=pretrained), args.images, args.labels, pool, val,
                         budgets, seeds, args.out, metric=args.metric, task=args.task, finetune_kwargs=kwargs, ceiling=args.ceiling)
    print(report(args.out, args.metric))
    print(f"\nwrote {Path(args.out) / 'results.csv'}, table.md, summary.csv, plot.png")
    return 0
