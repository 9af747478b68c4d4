"""gala FIB-SEM neurons: fine-tune the instance task on `train`, predict `test` in 3D, score
VOI and adapted Rand error over a range of watershed seed thresholds.

    OMP_NUM_THREADS=1 python benchmarks/gala_instances.py BACKBONE --arm pretrained --out /tmp/gala
    OMP_NUM_THREADS=1 python benchmarks/gala_instances.py BACKBONE --arm random --out /tmp/gala

Exploratory: the thresholds are scored on the test volume, so the best row is an upper bound,
not a fair result. Pick the threshold on held-out training slices for a real comparison.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gala_fibsem"


def main() -> None:
    import zarr

    from ssl_em.data.readers.open import open_volume
    from ssl_em.finetune.benchmark import head_of_width
    from ssl_em.finetune.cli import finetune
    from ssl_em.finetune.instance import foreground_boundary, watershed_instances
    from ssl_em.finetune.metrics import instance_scores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbone")
    p.add_argument("--arm", choices=["pretrained", "random"], default="pretrained")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path("/tmp/gala"))
    args = p.parse_args()
    model, pred = args.out / f"{args.arm}_{args.steps}", args.out / f"{args.arm}_{args.steps}" / "test.zarr"
    _, val = finetune(args.backbone, str(args.data / "train-image.h5"), str(args.data / "train-gt.lzf.h5"), "0-39", "40-49", task="instance",
                      random_init=args.arm == "random", max_steps=args.steps, seed=0, tile_size=96, batch_size=4,
                      unfreeze_at_step=args.steps // 4, head=head_of_width(64), out=model)
    print("2D scores on train slices 40-49:", {k: round(val[k], 3) for k in ("ap50", "voi", "adapted_rand_error")})
    subprocess.run(["ssl-em", "predict", str(model), str(args.data / "test-image.h5"), "--out", str(pred), "--planes", "xy,xz,yz",
                    "--instances", "none", "--overwrite", "--no-progress"], check=True)
    gt_volume = open_volume(str(args.data / "test-gt.lzf.h5"))
    gt = gt_volume.read(slice(0, gt_volume.shape[0]))
    fg, bd = foreground_boundary(zarr.open_group(str(pred), mode="r")["0"][:].astype(np.float32))
    for t in (0.5, 0.7, 0.8, 0.9):
        ids = watershed_instances(fg, bd, seed_threshold=t, min_size=64)
        s = instance_scores(ids, gt)
        print(f"{args.arm} seed threshold {t}:", {k: round(float(s[k]), 3) for k in ("voi", "voi_split", "voi_merge", "adapted_rand_error", "ap50")},
              "instances", int(ids.max()), "of", len(np.unique(gt)) - 1)


if __name__ == "__main__":
    main()
