"""Issue 17: does semi-supervised fine-tuning (mean teacher, `--semi-supervised`) help the
shipped backbone on ISBI 2012 membranes?

The label-efficiency benchmark's protocol (`isbi_cnn_label_efficiency.sh`: pool 0-19, scored
slices 20-29, membrane Dice, batch 4, head width 64, the backbone's own recipe), for the
pretrained arm only, once without and once with `semi_supervised`; the semi-supervised run
learns from the pool slices its budget leaves unlabeled. Each run writes its own folder
(results.csv, table.md), so a rerun resumes.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/isbi_semi_supervised.py --budget 1 --seed 0 --out /tmp/isbi_semi
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssl_em.finetune.benchmark import arms_for, head_of_width, label_efficiency

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isbi2012" / "train"))
    p.add_argument("--backbone", default=str(ROOT / "checkpoints" / "em_resnet18_spark"))
    p.add_argument("--budget", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    arm = arms_for([args.backbone], random_twins=False, unet_encoder=None)[0]
    common = {"batch_size": 4, "tile_size": 128, "lr": 1e-3, "holdout": 0.15, "dice_weight": 1.0, "head": head_of_width(64),
              "data_kwargs": {"classes": ["membrane", "cell"], "label_values": [0, 255], "class_balance": 0.5}}
    for name, extra in (("supervised", {}), ("semi_supervised", {"semi_supervised": True})):
        rows = label_efficiency([arm], f"{args.data}/image", f"{args.data}/label", list(range(20)), list(range(20, 30)), [args.budget], [args.seed],
                                Path(args.out) / name, metric="dice/membrane", finetune_kwargs={**common, **extra}, ceiling=False, progress=False)
        for r in rows:
            print(f"{name}: {r['arm']}, {r['budget']} slice(s) {r['train_slices']}, seed {r['seed']}: dice/membrane {float(r['score']):.4f} "
                  f"({r['seconds']} s; settings {r['settings']})", flush=True)


if __name__ == "__main__":
    main()
