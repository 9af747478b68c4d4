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
(score against labeled slices, the ceiling as a dotted line; label multiples beside it).
`--semi-supervised` fine-tunes every arm with a mean teacher on the pool slices each budget
leaves unlabeled (`ssl_em.finetune.semi`); the rows record it in their settings.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ssl_em.errors import UserError, check_at_least


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
            twin = twins.setdefault(arch, Arm(_twin_name(b), b, True, _twin_name(b), unet.name if unet else ""))
        settings = {**(meta.finetune if meta else {}), **(pretrained_settings or {})}
        pretrained.append(Arm(Path(b).name, b, False, twin.name, unet.name if unet else "", settings))
    return pretrained + (list(twins.values()) if random_twins else []) + ([unet] if unet else [])


def _twin_name(backbone: str) -> str:
    return f"random-init ({Path(backbone).name} arch)"


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


FIELDS = ["arm", "backbone", "random_init", "twin", "baseline", "budget", "seed", "train_slices", "metric", "score", "seconds", "metrics_json", "pool", "settings"]
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
    run without it (or the other way round) would mix both in one table. Rows that label the
    whole pool run supervised either way and are not counted."""
    def semi(r: dict) -> bool:
        return bool(json.loads(r.get("settings") or "{}").get("semi_supervised", False))

    other = [r for r in rows if semi(r) != semi_supervised and not (r.get("pool") and int(r["budget"]) >= int(r["pool"]))]
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
    with _appender(csv_path, rows) as (f, writer):
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


def read_rows(csv_path: Path) -> list[dict]:
    """Rows as strings; rows written before a column existed get its value filled in."""
    if not Path(csv_path).is_file():
        return []
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{csv_path}: not a benchmark results.csv ({err})") from None
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        _check_row(r, csv_path, line)
    for r in rows:
        if not r.get("twin"):  # older files: one random-init twin per backbone, named after it
            r["twin"] = _twin_name(r["backbone"])
        r.setdefault("baseline", "")  # older files: no U-Net baseline
        r["baseline"] = r["baseline"] or ""
    return rows


#: Columns a row must hold, and how each must parse: a garbage or foreign CSV is refused by
#: line instead of failing as a KeyError or ValueError deep inside the tables.
REQUIRED = {"arm": str, "backbone": str, "random_init": str, "budget": int, "seed": int, "score": float}


def _check_row(row: dict, csv_path: Path, line: int) -> None:
    missing = [k for k in REQUIRED if not row.get(k)]
    if missing:
        raise UserError(f"{csv_path}: line {line} has no {', '.join(missing)}; not a benchmark results.csv (columns {', '.join(FIELDS)})")
    for key, kind in REQUIRED.items():
        try:
            kind(row[key])
        except (TypeError, ValueError):
            raise UserError(f"{csv_path}: line {line}: {key} {row[key]!r} is not {'an integer' if kind is int else 'a number'}") from None


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


class Ceiling(NamedTuple):
    """The baseline arm at its largest budget (see `ceiling`); still a plain tuple."""

    arm: str
    budget: int
    stats: tuple[float, float, int]  # (mean, std, n) over seeds
    pool: int | None  # slices in the pool; None for rows written before it was recorded


def ceiling(rows: list[dict]) -> Ceiling | None:
    """(arm, budget, (mean, std, n), pool size) of the baseline arm (the U-Net, the arm that
    is its own baseline) at its largest budget, normally the whole pool: the "all labels"
    ceiling. The pool size is None for rows written before it was recorded. None without
    baseline rows."""
    base = [r for r in rows if r.get("baseline") and r["baseline"] == r["arm"]]
    if not base:
        return None
    arm = base[0]["arm"]
    top = max(int(r["budget"]) for r in base if r["arm"] == arm)
    pools = {int(r["pool"]) for r in base if r["arm"] == arm and int(r["budget"]) == top and r.get("pool")}
    return Ceiling(arm, top, summarize([r for r in base if r["arm"] == arm and int(r["budget"]) == top])[arm][top], max(pools, default=None))


def _ceiling_label(c: Ceiling) -> str:
    """"all N" only when the rows say N is the whole pool (a --no-ceiling run's largest
    budget is not the ceiling); rows without the pool size keep the old reading."""
    if c.pool is not None and c.budget < c.pool:
        return f"top: {c.arm}, {c.budget} of {c.pool} labeled slices"
    return f"ceiling: {c.arm}, all {c.budget} labeled slices"


def markdown_table(summary: dict, metric: str, top: Ceiling | None = None) -> str:
    """Scores, one row per arm; `top` (see `ceiling`) adds the ceiling as the last row,
    its score in every column."""
    budgets = sorted({b for d in summary.values() for b in d})
    head = f"| backbone \\ labeled slices ({metric}, mean ± std over seeds) | " + " | ".join(str(b) for b in budgets) + " |"
    lines = [head, "|---|" + "---|" * len(budgets)]
    for arm, d in summary.items():
        cells = [f"{d[b][0]:.3f} ± {d[b][1]:.3f} (n={d[b][2]})" if b in d else "-" for b in budgets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if top is not None:
        m, sd, n = top.stats
        lines.append(f"| {_ceiling_label(top)} | " + " | ".join(f"{m:.3f} ± {sd:.3f} (n={n})" for _ in budgets) + " |")
    return "\n".join(lines)


def paired_gains(rows: list[dict], against: str = "twin") -> dict[str, dict[int, tuple[float, float, int, int]]]:
    """Each arm minus the arm named in its `against` column ("twin": the random-init twin;
    "baseline": the U-Net from scratch), paired by (budget, seed): both arms of a pair
    trained on the same slices with the same seed, so the slice draw cancels out of the
    difference. Arms that are their own twin or baseline are not compared with themselves.

    Returns arm -> budget -> (mean gain, std of gain, wins, pairs).
    """
    score = {(r["arm"], int(r["budget"]), int(r["seed"])): float(r["score"]) for r in rows}
    gains: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        ref = score.get((r.get(against) or "", int(r["budget"]), int(r["seed"])))
        if ref is not None and r[against] != r["arm"]:
            gains.setdefault(r["arm"], {}).setdefault(int(r["budget"]), []).append(float(r["score"]) - ref)
    return {a: {b: (float(np.mean(g)), float(np.std(g)), int(sum(x > 0 for x in g)), len(g)) for b, g in sorted(d.items())}
            for a, d in gains.items()}


def gains_table(gains: dict, metric: str, over: str = "random init") -> str:
    budgets = sorted({b for d in gains.values() for b in d})
    lines = [f"| gain over {over} ({metric}, paired by seed) | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for arm, d in gains.items():
        cells = [f"{d[b][0]:+.3f} ± {d[b][1]:.3f} ({d[b][2]}/{d[b][3]} wins)" if b in d else "-" for b in budgets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lower_is_better(metric: str) -> bool:
    """VOI and the adapted Rand error fall as segmentations improve; every other score rises."""
    return metric.split("/")[0] in ("voi", "voi_split", "voi_merge", "adapted_rand_error")


class LabelsSaved(NamedTuple):
    """What an arm's score at N labeled slices is worth in the U-Net from scratch's labels.

    gap_closed: (arm(N) - U-Net(N)) / (all-labels U-Net - U-Net(N)), on the means over seeds:
    0 is no better than the U-Net with as many labels, 1 is as good as the U-Net with all of
    them. None without an all-labels row, or where the U-Net at N already reaches it.
    multiple: the labeled slices the U-Net needs for the arm's score (linear interpolation
    between the budgets it ran), divided by N. bound: "" when interpolated; ">=" when the
    arm beats the U-Net at its largest budget (the multiple is then that budget / N, a lower
    bound: nothing is extrapolated); "<=" when the arm is no better than the U-Net at its
    smallest budget (an upper bound)."""

    gap_closed: float | None
    multiple: float
    bound: str

    def text(self) -> str:
        """"40% of the gap, 3.0x" / ">= 5.0x": the markdown cell."""
        gap = f"{self.gap_closed:.0%} of the gap, " if self.gap_closed is not None else ""
        return f"{gap}{self.bound + ' ' if self.bound else ''}{self.multiple:.1f}x"


def slices_needed(curve: dict[int, float], score: float, lower_better: bool = False) -> tuple[float, str]:
    """(slices, bound): where the piecewise-linear curve budget -> mean score first reaches
    `score`. Below the smallest budget's score: (smallest budget, "<="); never reached:
    (largest budget, ">="); else (interpolated slices, "")."""
    sign = -1.0 if lower_better else 1.0
    points = [(b, sign * m) for b, m in sorted(curve.items())]
    target = sign * score
    if target <= points[0][1]:
        return float(points[0][0]), "<="
    for (b0, m0), (b1, m1) in zip(points, points[1:]):
        if m0 < target <= m1:
            return b0 + (target - m0) / (m1 - m0) * (b1 - b0), ""
    return float(points[-1][0]), ">="


def labels_saved(summary: dict, top: Ceiling | None, lower_better: bool = False) -> dict[str, dict[int, LabelsSaved]]:
    """arm -> budget -> LabelsSaved against the baseline arm of `top` (the U-Net from scratch:
    its scores at every budget run, the ceiling's included, form the curve). The baseline
    itself is left out (0% and 1.0x by definition); {} without a baseline."""
    if top is None or top.arm not in summary:
        return {}
    curve = {b: v[0] for b, v in summary[top.arm].items()}
    all_labels = top.stats[0] if top.pool is None or top.budget >= top.pool else None
    sign = -1.0 if lower_better else 1.0
    out: dict[str, dict[int, LabelsSaved]] = {}
    for arm, by_budget in summary.items():
        if arm == top.arm:
            continue
        for n, (mean, _, _) in by_budget.items():
            if n not in curve:
                continue
            gap = None
            if all_labels is not None and sign * (all_labels - curve[n]) > 0:
                gap = (mean - curve[n]) / (all_labels - curve[n])
            slices, bound = slices_needed(curve, mean, lower_better)
            out.setdefault(arm, {})[n] = LabelsSaved(gap, slices / n, bound)
    return out


def labels_saved_table(saved: dict[str, dict[int, LabelsSaved]], metric: str, baseline: str) -> str:
    budgets = sorted({b for d in saved.values() for b in d})
    lines = [f"| labels saved vs {baseline} ({metric} means): gap to all labels closed, label multiple | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for arm, d in saved.items():
        lines.append(f"| {arm} | " + " | ".join(d[b].text() if b in d else "-" for b in budgets) + " |")
    return "\n".join(lines)


SUMMARY_FIELDS = ["arm", "budget", "n", "mean", "std", "unet_mean", "all_labels_mean", "gap_closed", "label_multiple", "label_multiple_bound"]


def write_summary(path: Path, summary: dict, top: Ceiling | None, saved: dict[str, dict[int, LabelsSaved]]) -> None:
    """summary.csv: one row per (arm, budget): the score's mean, std and n over seeds, the
    U-Net's mean at that budget and with all labels, and the labels saved (empty where not
    defined; label_multiple_bound ">=" or "<=" marks a bound, see `LabelsSaved`)."""
    curve = summary.get(top.arm, {}) if top is not None else {}
    all_labels = top.stats[0] if top is not None and (top.pool is None or top.budget >= top.pool) else None
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for arm, by_budget in summary.items():
            for b, (mean, std, n) in by_budget.items():
                ls = saved.get(arm, {}).get(b)
                writer.writerow({"arm": arm, "budget": b, "n": n, "mean": f"{mean:.6f}", "std": f"{std:.6f}",
                                 "unet_mean": f"{curve[b][0]:.6f}" if b in curve else "", "all_labels_mean": "" if all_labels is None else f"{all_labels:.6f}",
                                 "gap_closed": "" if ls is None or ls.gap_closed is None else f"{ls.gap_closed:.6f}",
                                 "label_multiple": "" if ls is None else f"{ls.multiple:.6f}", "label_multiple_bound": "" if ls is None else ls.bound})  # fmt: skip


#: The smallest y-range the plot shows: score differences far below it stay visibly small
#: instead of being stretched over the whole axis.
MIN_Y_SPAN = 0.1


def metric_label(metric: str) -> str:
    """`dice/membrane` -> "Dice, membrane"; `mean_iou` -> "mean IoU"."""
    names = {"iou": "IoU", "dice": "Dice", "mean_iou": "mean IoU", "mean_dice": "mean Dice", "accuracy": "pixel accuracy", "ap50": "AP50",
             "ap75": "AP75", "map": "mAP", "f1_50": "F1 at IoU 0.5", "voi": "VOI", "adapted_rand_error": "adapted Rand error"}
    base, _, cls = metric.partition("/")
    return f"{names.get(base, base)}, {cls}" if cls else names.get(base, base)


def y_limits(lows: list[float], highs: list[float], span: float = MIN_Y_SPAN, bounded: bool = True) -> tuple[float, float]:
    """Axis limits covering the data (mean ± std) with a margin, at least `span` wide, and
    inside [0, 1] for a bounded score."""
    lo, hi = min(lows), max(highs)
    mid, width = (lo + hi) / 2, max(hi - lo, span) * 1.1
    lo, hi = mid - width / 2, mid + width / 2
    if bounded:  # slide the window inside [0, 1] without shrinking it
        if lo < 0:
            lo, hi = 0.0, min(1.0, hi - lo)
        if hi > 1:
            lo, hi = max(0.0, lo - (hi - 1.0)), 1.0
    return lo, hi


def plot(summary: dict, metric: str, path: str | Path, title: str = "", top: Ceiling | None = None, saved: dict | None = None) -> None:
    """Score against labeled slices for every arm (twins dashed, the U-Net baseline in
    black), mean ± std over seeds, the all-labels ceiling (`top`, see `ceiling`) as a dotted
    line; the y-axis names the metric and spans at least MIN_Y_SPAN; the legend sits outside the axes, so it
    never hides a point. With `saved` (see
    `labels_saved`), a second panel: each arm's label multiple against labeled slices,
    bounds drawn as open triangles pointing the way the true value lies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if saved:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [6, 5]})
        plot_labels_saved(ax2, saved, top.arm if top is not None else "the U-Net")
    else:
        fig, ax = plt.subplots(figsize=(8.4, 4.2))  # wide: the legend sits beside the axes
    lows, highs, n_seeds = [], [], set()
    for arm, d in summary.items():
        b = sorted(d)
        m = np.array([d[x][0] for x in b])
        s = np.array([d[x][1] for x in b])
        n_seeds |= {d[x][2] for x in b}
        lows.append(float((m - s).min()))
        highs.append(float((m + s).max()))
        style = {"color": "black"} if top is not None and arm == top.arm else {"linestyle": "--" if "random" in arm else "-"}
        ax.errorbar(b, m, yerr=s, marker="o", capsize=3, label=arm, **style)
    if top is not None:
        ax.axhline(top.stats[0], color="black", linestyle=":", linewidth=1, label=_ceiling_label(top))
        lows.append(top.stats[0])
        highs.append(top.stats[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for d in summary.values() for x in d}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("labeled training slices")
    seeds = f"{min(n_seeds)}" if len(n_seeds) == 1 else f"{min(n_seeds)}-{max(n_seeds)}"
    ax.set_ylabel(f"{metric_label(metric)} on held-out slices\n(mean ± std over {seeds} seed{'s' if max(n_seeds) > 1 else ''})")
    lower_is_better_ = lower_is_better(metric)
    if lows:
        ax.set_ylim(*y_limits(lows, highs, bounded=not metric.startswith("voi")))
    ax.set_title(textwrap.fill((title or "label efficiency") + (" (lower is better)" if lower_is_better_ else ""), 60), fontsize=10)  # long titles wrap, never clip
    ax.grid(alpha=0.3)
    # Outside the axes, to the right: inside, "best" still sat on a one-budget plot's points.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the canvas grows to hold the legend
    plt.close(fig)


def plot_labels_saved(ax, saved: dict[str, dict[int, LabelsSaved]], baseline: str) -> None:
    """Label multiple against labeled slices, one line per arm, on log-log axes; 1x (the
    baseline itself) dotted. Interpolated values are filled circles; a ">=" bound an open
    upward triangle, a "<=" bound an open downward one."""
    import matplotlib

    markers = {"": "o", ">=": "^", "<=": "v"}
    for arm, d in saved.items():
        b = sorted(d)
        line = ax.plot(b, [d[x].multiple for x in b], linestyle="--" if "random" in arm else "-", label=arm)[0]
        for x in b:
            exact = d[x].bound == ""
            ax.plot([x], [d[x].multiple], marker=markers[d[x].bound], color=line.get_color(), markerfacecolor=line.get_color() if exact else "none", markersize=7)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(sorted({x for d in saved.values() for x in d}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_yaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlabel("labeled training slices")
    ax.set_ylabel(textwrap.fill(f"label multiple: slices {baseline} needs for the same score / slices", 50), fontsize=8)
    ax.set_title("labels saved (open triangles: bounds, beyond the budgets run)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def report(out: str | Path, metric: str, title: str = "", merge: list[str | Path] = ()) -> str:
    """Write table.md (scores with the ceiling row, then gains over the random-init twin and
    over the U-Net from scratch, paired by seed, then the labels saved, see `labels_saved`),
    summary.csv (`write_summary`) and plot.png from results.csv; returns the tables.
    `merge`: other benchmark folders (e.g. seeds run in parallel processes) whose rows are
    appended to out/results.csv first, skipping rows it already has."""
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
    top = ceiling(rows)
    tables = [markdown_table(summary, metric, top)]
    for against, over in (("twin", "random init"), ("baseline", top.arm if top else "the U-Net")):
        gains = paired_gains(rows, against)
        if gains:
            tables.append(gains_table(gains, metric, over))
    saved = labels_saved(summary, top, lower_is_better(metric))
    if saved:
        tables.append(labels_saved_table(saved, metric, top.arm))
    if top is not None:
        tables.append(f"{_ceiling_label(top)}: {top.stats[0]:.3f} ± {top.stats[1]:.3f} (n={top.stats[2]})")
    table = "\n\n".join(tables)
    (out / "table.md").write_text(table + "\n")
    write_summary(out / "summary.csv", summary, top, saved)
    plot(summary, metric, out / "plot.png", title, top, saved)
    return table


def _ints(spec: str, flag: str) -> list[int]:
    from ssl_em.finetune.data import parse_slices

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
