"""Measure fine-tuning choices on ISBI 2012 membranes with a random-init U-Net (issue 8).

Each run fine-tunes a timm encoder (random weights, so no pretraining is needed) with
ssl_em's UNetHead, end to end, on `--budget` labeled slices drawn from 0-19 (the
benchmark's seeded draw), and scores Dice of the membrane class on slices 20-29. Every
flag switches one choice back to the old protocol, so each choice is measured by
difference. One JSON line per run: choice flags, budget, seed, Dice, steps, CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/finetune_schedule.py --budgets 1,2 --seeds 0,1
    OMP_NUM_THREADS=1 python benchmarks/finetune_schedule.py --ce-only --uniform --light-aug --constant-lr --no-holdout --max-steps 200
    python benchmarks/finetune_schedule.py --summarize runs.jsonl   # markdown table of the lines
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--budgets", default="1,2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=None, help="fixed steps (default: the schedule scaled to labeled pixels)")
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--steps-per-mpx", type=float, default=None)
    p.add_argument("--ce-only", action="store_true", help="cross-entropy alone (no Dice)")
    p.add_argument("--uniform", action="store_true", help="uniform tiles (no class-balanced sampling)")
    p.add_argument("--light-aug", action="store_true", help="flips + intensity only (no warp, blur, stripes)")
    p.add_argument("--constant-lr", action="store_true", help="constant lr, no warm-up or cosine decay")
    p.add_argument("--no-holdout", action="store_true", help="keep the last weights (no held-out band)")
    p.add_argument("--summarize", nargs="+", default=None, help="JSON-lines files of earlier runs: print a table and exit")
    args = p.parse_args()
    if args.summarize:
        print(summarize([json.loads(line) for f in args.summarize for line in Path(f).read_text().splitlines() if line.startswith("{")]))
        return

    from ssl_em.finetune.benchmark import choose_slices, head_of_width
    from ssl_em.finetune.cli import finetune
    from ssl_em.finetune.schedule import StepSchedule

    sched = StepSchedule(**{k: v for k, v in {"min_steps": args.min_steps, "steps_per_mpx": args.steps_per_mpx}.items() if v is not None})
    choices = {k: getattr(args, k) for k in ("ce_only", "uniform", "light_aug", "constant_lr", "no_holdout")}
    for budget in (int(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            train = choose_slices(list(range(20)), budget, seed)
            t0 = time.process_time()
            _, m = finetune(args.encoder, f"{args.data}/image", f"{args.data}/label", train, list(range(20, 30)), seed=seed, random_init=True,
                            max_steps=args.max_steps, steps=sched, head=head_of_width(args.head_width), batch_size=args.batch_size, lr=args.lr,
                            unfreeze_at_step=0, accelerator="cpu", holdout=0.0 if args.no_holdout else 0.15,
                            data_kwargs={"classes": ["membrane", "cell"], "label_values": [0, 255], "class_balance": 0.0 if args.uniform else 0.5},
                            dice_weight=0.0 if args.ce_only else 1.0, strong_augment=not args.light_aug, cosine=not args.constant_lr,
                            warmup_steps=0 if args.constant_lr else None)  # fmt: skip
            print(json.dumps({**choices, "encoder": args.encoder, "lr": args.lr, "budget": budget, "seed": seed, "slices": train,
                              "dice": round(m["dice/membrane"], 4), "steps": m["steps"], "best_step": m["best_step"],
                              "cpu_s": round(time.process_time() - t0, 1)}), flush=True)


CHOICES = ("ce_only", "uniform", "light_aug", "constant_lr", "no_holdout")
LABELS = {"ce_only": "no Dice", "uniform": "uniform tiles", "light_aug": "light aug", "constant_lr": "constant lr", "no_holdout": "last weights"}


def summarize(runs: list[dict]) -> str:
    """One row per (choices, budget): Dice mean ± std over seeds, each seed's Dice, CPU s."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(tuple(k for k in CHOICES if r[k]), r["budget"], r["steps"])].append(r)
    lines = ["| protocol (old choices switched back) | slices | steps | membrane Dice, mean ± std | per seed | CPU s per run |", "|---|---|---|---|---|---|"]
    for (off, budget, steps), rs in sorted(groups.items(), key=lambda kv: (len(kv[0][0]) != len(CHOICES), kv[0][0], kv[0][1])):
        d = [r["dice"] for r in sorted(rs, key=lambda r: r["seed"])]
        name = "old: CE, uniform, light aug, constant lr, last weights" if len(off) == len(CHOICES) else ("new" + (" but " + ", ".join(LABELS[k] for k in off) if off else ""))
        per_seed = " / ".join(f"{r['dice']:.3f} (seed {r['seed']}, best step {r['best_step']})" for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {budget} | {steps} | {np.mean(d):.3f} ± {np.std(d):.3f} | {per_seed} | {np.mean([r['cpu_s'] for r in rs]):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
