"""`ssl-em benchmark label-efficiency`: does pretraining pay off, and at how many labels?

For each backbone (and, always, a randomly initialised twin of each architecture), each
label budget (number of labeled training slices) and each seed, it fine-tunes with
`ssl_em.finetune.cli.finetune`, scores the held-out slices, and appends one CSV row. The
CSV is the record: a re-run skips the (arm, budget, seed) rows already in it, so an
interrupted benchmark resumes. At the end it writes a markdown table (mean ± std over
seeds) and a PNG plot of score against labeled slices.

    ssl-em benchmark label-efficiency --backbones checkpoints/A checkpoints/B \\
        --images isbi2012/train/image --labels isbi2012/train/label \\
        --label-values 0,255 --classes membrane,cell --metric dice/membrane \\
        --pool 0-19 --val-slices 20-29 --budgets 1,2,4,8 --seeds 0,1,2 --out results/isbi
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_em.errors import UserError, check_at_least


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: a backbone, pretrained or randomly initialised."""

    name: str
    backbone: str
    random_init: bool = False
    twin: str = ""  # the random-init arm this arm's scores are paired with


def arms_for(backbones: list[str], random_twins: bool = True) -> list[Arm]:
    """The pretrained arms plus one random-init arm per distinct architecture; backbones of
    the same architecture (MAE and MoCo of one ViT, say) share that random-init twin."""
    from ssl_em.export import BackboneMeta

    pretrained, twins = [], {}
    for b in backbones:
        meta_file = Path(b) / "ssl_em.json"
        arch = json.dumps(_arch_key(BackboneMeta.from_dict(json.loads(meta_file.read_text())) if meta_file.is_file() else None, b))
        twin = twins.setdefault(arch, Arm(_twin_name(b), b, True, _twin_name(b)))
        pretrained.append(Arm(Path(b).name, b, False, twin.name))
    return pretrained + (list(twins.values()) if random_twins else [])


def _twin_name(backbone: str) -> str:
    return f"random-init ({Path(backbone).name} arch)"


def _arch_key(meta, fallback: str):
    return [meta.architecture, meta.model_args] if meta is not None else fallback


def choose_slices(pool: list[int], budget: int, seed: int) -> list[int]:
    """`budget` training slices from the pool, a seeded random subset (sorted)."""
    if budget > len(pool):
        raise UserError(f"--budgets: label budget {budget} exceeds the {len(pool)} slices of the training pool (--pool)")
    if budget < 1:
        raise UserError(f"--budgets: label budget {budget} must be >= 1")
    rng = np.random.default_rng([seed, budget])
    return sorted(int(z) for z in rng.choice(pool, size=budget, replace=False))


FIELDS = ["arm", "backbone", "random_init", "twin", "budget", "seed", "train_slices", "metric", "score", "seconds", "metrics_json"]


def label_efficiency(arms: list[Arm], images, labels, pool: list[int], val_slices: list[int], budgets: list[int], seeds: list[int],
                     out: str | Path, metric: str = "mean_iou", task: str = "semantic", finetune_kwargs: dict | None = None,
                     progress: bool = True) -> list[dict]:
    """Run (or resume) the grid; returns all CSV rows. Rows are appended as each run ends."""
    from tqdm import tqdm

    from ssl_em.finetune.cli import finetune

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    done = {(r["arm"], int(r["budget"]), int(r["seed"])) for r in rows}
    grid = [(a, b, s) for b in budgets for s in seeds for a in arms]
    todo = [g for g in grid if (g[0].name, g[1], g[2]) not in done]
    with _appender(csv_path, rows) as (f, writer):
        for arm, budget, seed in tqdm(todo, desc="label-efficiency", disable=not progress):
            train = choose_slices(pool, budget, seed)
            t0 = time.time()
            _, metrics = finetune(arm.backbone, images, labels, train, val_slices, task=task, random_init=arm.random_init, seed=seed, **(finetune_kwargs or {}))
            if metric not in metrics:
                raise KeyError(f"metric {metric!r} not among {sorted(metrics)}")
            row = {"arm": arm.name, "backbone": arm.backbone, "random_init": arm.random_init, "twin": arm.twin, "budget": budget, "seed": seed,
                   "train_slices": " ".join(map(str, train)), "metric": metric, "score": metrics[metric],
                   "seconds": round(time.time() - t0, 1), "metrics_json": json.dumps(metrics)}
            writer.writerow(row)
            f.flush()  # a crash loses at most the run in progress
            rows.append({k: str(v) for k, v in row.items()})
    return rows


def read_rows(csv_path: Path) -> list[dict]:
    """Rows as strings; rows written before a column existed get its value filled in."""
    if not Path(csv_path).is_file():
        return []
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if not r.get("twin"):  # older files: one random-init twin per backbone, named after it
            r["twin"] = _twin_name(r["backbone"])
    return rows


def is_random(row: dict) -> bool:
    return str(row["random_init"]).lower() in ("true", "1")


@contextlib.contextmanager
def _appender(csv_path: Path, rows: list[dict]):
    """(file, DictWriter) appending to results.csv; a file with an older header is first
    rewritten with the current columns, so old and new rows stay one table."""
    if rows and list(rows[0]) != FIELDS:
        # Rewritten into a temporary file and renamed: a crash never leaves half the rows.
        tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if not rows:
            writer.writeheader()
        yield f, writer


def summarize(rows: list[dict]) -> dict[str, dict[int, tuple[float, float, int]]]:
    """arm -> budget -> (mean, std, n) of the score over seeds."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        table.setdefault(r["arm"], {}).setdefault(int(r["budget"]), []).append(float(r["score"]))
    return {a: {b: (float(np.mean(v)), float(np.std(v)), len(v)) for b, v in sorted(d.items())} for a, d in table.items()}


def markdown_table(summary: dict, metric: str) -> str:
    budgets = sorted({b for d in summary.values() for b in d})
    head = f"| backbone \\ labeled slices ({metric}, mean ± std over seeds) | " + " | ".join(str(b) for b in budgets) + " |"
    lines = [head, "|---|" + "---|" * len(budgets)]
    for arm, d in summary.items():
        cells = [f"{d[b][0]:.3f} ± {d[b][1]:.3f} (n={d[b][2]})" if b in d else "-" for b in budgets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_gains(rows: list[dict]) -> dict[str, dict[int, tuple[float, float, int, int]]]:
    """Pretrained minus random init, paired by (budget, seed): both arms of a pair trained on
    the same slices with the same seed, so the slice draw cancels out of the difference.

    Returns arm -> budget -> (mean gain, std of gain, wins, pairs) against the random-init
    twin of the backbone's architecture.
    """
    random = {(r["arm"], int(r["budget"]), int(r["seed"])): float(r["score"]) for r in rows if is_random(r)}
    gains: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        twin = random.get((r["twin"], int(r["budget"]), int(r["seed"])))
        if not is_random(r) and twin is not None:
            gains.setdefault(r["arm"], {}).setdefault(int(r["budget"]), []).append(float(r["score"]) - twin)
    return {a: {b: (float(np.mean(g)), float(np.std(g)), int(sum(x > 0 for x in g)), len(g)) for b, g in sorted(d.items())}
            for a, d in gains.items()}


def gains_table(gains: dict, metric: str) -> str:
    budgets = sorted({b for d in gains.values() for b in d})
    lines = [f"| gain over random init ({metric}, paired by seed) | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for arm, d in gains.items():
        cells = [f"{d[b][0]:+.3f} ± {d[b][1]:.3f} ({d[b][2]}/{d[b][3]} wins)" if b in d else "-" for b in budgets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, metric: str, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, d in summary.items():
        b = sorted(d)
        m = np.array([d[x][0] for x in b])
        s = np.array([d[x][1] for x in b])
        ax.errorbar(b, m, yerr=s, marker="o", capsize=3, label=arm, linestyle="--" if "random" in arm else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for d in summary.values() for x in d}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("labeled training slices")
    ax.set_ylabel(metric)
    ax.set_title(textwrap.fill(title or "label efficiency", 55), fontsize=10)  # long titles wrap, never clip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: str | Path, metric: str, title: str = "", merge: list[str | Path] = ()) -> str:
    """Write table.md (scores, then paired gains) and plot.png from results.csv; returns
    the tables. `merge`: other benchmark folders (e.g. seeds run in parallel processes)
    whose rows are appended to out/results.csv first, skipping rows it already has."""
    out = Path(out)
    rows = read_rows(out / "results.csv")
    have = {(r["arm"], r["budget"], r["seed"]) for r in rows}
    extra = [r for m in merge for r in read_rows(Path(m) / "results.csv") if (r["arm"], r["budget"], r["seed"]) not in have]
    if extra:
        out.mkdir(parents=True, exist_ok=True)
        with _appender(out / "results.csv", rows) as (_, writer):
            writer.writerows(extra)
        rows += extra
    summary = summarize(rows)
    table = markdown_table(summary, metric)
    gains = paired_gains(rows)
    if gains:
        table += "\n\n" + gains_table(gains, metric)
    (out / "table.md").write_text(table + "\n")
    plot(summary, metric, out / "plot.png", title)
    return table


def _ints(spec: str, flag: str) -> list[int]:
    from ssl_em.finetune.data import parse_slices

    return parse_slices(spec, 1 << 30, flag)


def check_backbone(backbone: str) -> None:
    """An exported folder (with ssl_em.json) or a timm name, checked before any run starts."""
    import timm

    from ssl_em.export import META, load_backbone

    path = Path(backbone)
    if path.exists() or "/" in backbone:
        if not (path / META).is_file():
            raise UserError(f"--backbones {backbone}: not an exported backbone folder (no {META}); make one with `ssl-em export`")
        load_backbone(path)  # damaged or foreign folders fail here, by name
    elif not timm.is_model(backbone):
        raise UserError(f"--backbones {backbone}: neither a folder nor a timm model name")


def head_of_width(width: int):
    """The default head (UNETR for ViTs, U-Net for CNNs) scaled by one width knob."""
    import functools

    from ssl_em.finetune.heads import default_head

    return functools.partial(default_head, width=width, min_width=width // 4, skip_width=width // 2, stem_width=width // 4)


def configure(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    le = kinds.add_parser("label-efficiency", help="fine-tune pretrained and random-init backbones over label budgets and seeds")
    le.add_argument("--backbones", nargs="+", required=True, help="exported backbone folders (a random-init twin of each architecture is added)")
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
    le.add_argument("--max-steps", type=int, default=300)
    le.add_argument("--tile-size", type=int, default=128)
    le.add_argument("--batch-size", type=int, default=8)
    le.add_argument("--lr", type=float, default=1e-3)
    le.add_argument("--head-width", type=int, default=128, help="decoder width of the default head (128; 64 is ~4x cheaper on a CPU)")
    le.add_argument("--unfreeze-at-step", type=int, default=None, help="fine-tune the backbone after N steps (default: frozen)")
    le.add_argument("--out", required=True, help="folder for results.csv, table.md, plot.png")
    rep = kinds.add_parser("report", help="rewrite table.md and plot.png from results.csv, merging other result folders")
    rep.add_argument("--out", required=True, help="the benchmark folder (its results.csv is extended by --merge)")
    rep.add_argument("--metric", default="mean_iou")
    rep.add_argument("--merge", nargs="*", default=[], help="other benchmark folders, e.g. seeds run in parallel processes")
    rep.add_argument("--title", default="")


def run(args) -> int:
    if args.kind == "report":
        print(report(args.out, args.metric, args.title, merge=args.merge))
        return 0
    data_kwargs = {}
    if args.classes:
        data_kwargs["classes"] = args.classes.split(",")
    if args.label_values:
        data_kwargs["label_values"] = [int(v) for v in args.label_values.split(",")]
    kwargs = {"max_steps": args.max_steps, "tile_size": args.tile_size, "batch_size": args.batch_size, "lr": args.lr,
              "unfreeze_at_step": args.unfreeze_at_step, "data_kwargs": data_kwargs, "head": head_of_width(args.head_width)}
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
    label_efficiency(arms_for(args.backbones), args.images, args.labels, pool, val, budgets, seeds, args.out,
                     metric=args.metric, task=args.task, finetune_kwargs=kwargs)
    print(report(args.out, args.metric))
    print(f"\nwrote {Path(args.out) / 'results.csv'}, table.md, plot.png")
    return 0
