"""gala FIB-SEM neurons: the table of `gala_instances.py` runs, with the labels saved.

    python benchmarks/gala_report.py benchmarks/results/gala_instances/session10_v3.jsonl \
        benchmarks/results/gala_instances/session11_budgets.jsonl

Reads the JSON lines the runs append (a run without a "budget" key labeled all 40 slices)
and prints, for the test VOI at the threshold chosen on held-out training slices (lower is
better): mean and spread over seeds per arm and budget, the paired difference against the
U-Net from scratch (the `--arm random` run of the same seed and budget), and the labels
saved (`ssl_em.finetune.benchmark_report.labels_saved`, against the all-labels U-Net).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ssl_em.finetune.benchmark_report import Ceiling, labels_saved, labels_saved_table, lower_is_better, summarize

ALL = 40  # gala_instances.POOL: the labeled training slices
UNET = "U-Net from scratch (resnet18)"


def rows_of(paths: list[Path], metric: str) -> list[dict]:
    """One row per run: arm (the backbone's name, or the U-Net), budget, seed, score."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            arm = UNET if r["arm"] == "random" else Path(r["backbone"]).name
            rows.append({"arm": arm, "budget": r.get("budget", ALL), "seed": r["seed"], "score": r["test"][metric]})
    return rows


def paired(rows: list[dict]) -> dict[tuple[str, int], list[float]]:
    """(arm, budget) -> arm minus U-Net per seed where both ran (for VOI, negative is better)."""
    unet = {(r["budget"], r["seed"]): r["score"] for r in rows if r["arm"] == UNET}
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        key = (r["budget"], r["seed"])
        if r["arm"] != UNET and key in unet:
            out.setdefault((r["arm"], r["budget"]), []).append(r["score"] - unet[key])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", type=Path, nargs="+")
    p.add_argument("--metric", default="voi", help="a key of the runs' test scores (voi, voi_split, voi_merge, adapted_rand_error, ap50)")
    args = p.parse_args()
    rows = rows_of(args.jsonl, args.metric)
    lower = lower_is_better(args.metric)
    summary = summarize(rows)
    budgets = sorted({r["budget"] for r in rows})
    print(f"| test {args.metric}, mean ± std (n) | " + " | ".join(map(str, budgets)) + " |")
    print("|---|" + "---|" * len(budgets))
    for arm, by in summary.items():
        print(f"| {arm} | " + " | ".join(f"{by[b][0]:.3f} ± {by[b][1]:.3f} ({by[b][2]})" if b in by else "-" for b in budgets) + " |")
    print()
    for (arm, budget), d in sorted(paired(rows).items()):
        wins = sum(x < 0 for x in d) if lower else sum(x > 0 for x in d)
        print(f"{arm} - U-Net at {budget} slice(s): {np.mean(d):+.3f} mean over {len(d)} seeds, {wins}/{len(d)} pairs won")
    if UNET in summary and ALL in summary[UNET]:
        top = Ceiling(UNET, ALL, summary[UNET][ALL], ALL)
        print()
        print(labels_saved_table(labels_saved(summary, top, lower_better=lower), f"test {args.metric}", UNET))


if __name__ == "__main__":
    main()
