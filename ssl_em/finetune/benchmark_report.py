"""The label-efficiency benchmark's record and report: results.csv (one row per run, read back
by `read_rows`, appended to by `appender`), and what `ssl-em benchmark report` makes of it:
table.md (mean ± std over seeds; gains over the random-init twin and over the U-Net, paired by
seed; labels saved), summary.csv and plot.png. The runner is `ssl_em.finetune.benchmark`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ssl_em.atomic import write_csv
from ssl_em.errors import UserError

FIELDS = ["arm", "backbone", "random_init", "twin", "baseline", "budget", "seed", "train_slices", "metric", "score", "seconds", "metrics_json", "pool", "settings"]


def twin_name(backbone: str) -> str:
    return f"random-init ({Path(backbone).name} arch)"



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
            r["twin"] = twin_name(r["backbone"])
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
def appender(csv_path: Path, rows: list[dict]):
    """(file, DictWriter) appending to results.csv; a file with an older header is first
    rewritten with the current columns, so old and new rows stay one table."""
    if rows and list(rows[0]) != FIELDS:
        # Rewritten whole (write_csv: a temporary file renamed): a crash never leaves half the rows.
        write_csv(csv_path, FIELDS, rows, extrasaction="ignore")
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


def is_semi_supervised(row: dict) -> bool:
    """Whether the row's cell was fine-tuned with --semi-supervised (its recorded settings)."""
    return bool(json.loads(row.get("settings") or "{}").get("semi_supervised", False))


def protocol_rows(rows: list[dict]) -> list[dict]:
    """The rows whose fine-tuning protocol can differ: a row that labels the whole pool has
    no unlabeled slices, so it runs supervised either way and is left out."""
    return [r for r in rows if not (r.get("pool") and int(r["budget"]) >= int(r["pool"]))]


def check_one_protocol(rows: list[dict], csv_path: Path) -> None:
    """Rows of one table are one protocol: an arm's cells fine-tuned with and without
    --semi-supervised would be averaged as one arm (`protocol_rows` are counted)."""
    kinds = {is_semi_supervised(r) for r in protocol_rows(rows)}
    if len(kinds) > 1:
        raise UserError(f"{csv_path}: the rows (with those merged in) mix cells fine-tuned with and without --semi-supervised; "
                        "report them in separate folders")


def report(out: str | Path, metric: str, title: str = "", merge: list[str | Path] = ()) -> str:
    """Write table.md (scores with the ceiling row, then gains over the random-init twin and
    over the U-Net from scratch, paired by seed, then the labels saved, see `labels_saved`),
    summary.csv (`write_summary`) and plot.png from results.csv; returns the tables.
    `merge`: other benchmark folders (e.g. seeds run in parallel processes) whose rows are
    appended to out/results.csv first, skipping rows it already has."""
    out = Path(out)
    rows = read_rows(out / "results.csv")
    have = {(r["arm"], r["budget"], r["seed"]) for r in rows}
    extra = []
    for m in merge:
        for r in read_rows(Path(m) / "results.csv"):
            # Folders run from one start often carry the same baseline rows: each cell once.
            if (r["arm"], r["budget"], r["seed"]) not in have:
                have.add((r["arm"], r["budget"], r["seed"]))
                extra.append(r)
    check_one_protocol(rows + extra, out / "results.csv")
    if extra:
        out.mkdir(parents=True, exist_ok=True)
        with appender(out / "results.csv", rows) as (_, writer):
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
