#!/usr/bin/env bash
# Issue 8: CEM500K mitochondria with a few labels, the shipped backbone against the U-Net
# from scratch (session 6). ../shared/data/cem500k_examples/correlation holds five
# mitochondria patches from different CEM500K sources; mitochondria2-5 are 224 x 224
# (mitochondria1 is 138 px high and 1.4% mitochondria, left out).
#
# Within a patch (the figures in RESULTS.md): each patch becomes a 2-slice stack, its left
# half (112 px wide) to label and its right half to score, as a lab labels part of its own
# data and segments the rest. 96 px tiles, because the halves are 112 px wide. The
# pretrained arm is fine-tuned with the recipe its ssl_em.json records.
#
#   bash benchmarks/cem500k_mitochondria.sh
#   DATA=/path/to/shared/data WORK=/tmp/cem SEEDS="0 1" bash benchmarks/cem500k_mitochondria.sh
#
# On the shared 2-core CPU: about 3 minutes per run with one thread, 16 runs for 2 seeds.
set -euo pipefail
DATA=${DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
WORK=${WORK:-/tmp/ssl_em_cem}
SEEDS=${SEEDS:-0 1}
BACKBONE=${BACKBONE:-$(cd "$(dirname "$0")/.." && pwd)/checkpoints/em_resnet18_spark}
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"

python - "$DATA/cem500k_examples/correlation" "$WORK" <<'PY'
import sys
import imageio.v3 as iio
import numpy as np
import tifffile

src, work = sys.argv[1:]
for i in (2, 3, 4, 5):
    image, mask = (iio.imread(f"{src}/{kind}/mitochondria{i}.png") for kind in ("images", "masks"))
    for name, a in (("image", image), ("mask", mask)):
        tifffile.imwrite(f"{work}/mito{i}_{name}.tif", np.stack([a[:, :112], a[:, 112:]]))  # (2, 224, 112)
PY

for s in $SEEDS; do
  for i in 2 3 4 5; do
    ssl-em benchmark label-efficiency --backbones "$BACKBONE" \
      --images "$WORK/mito${i}_image.tif" --labels "$WORK/mito${i}_mask.tif" \
      --classes background,mito --label-values 0,255 --metric iou/mito --pool 0 --val-slices 1 \
      --budgets 1 --seeds "$s" --batch-size 4 --head-width 64 --tile-size 96 --no-ceiling \
      --out "$WORK/mito$i" > "$WORK/mito$i.seed$s.log" 2>&1
  done
done
for i in 2 3 4 5; do echo "mitochondria$i:"; cat "$WORK/mito$i/table.md"; done
