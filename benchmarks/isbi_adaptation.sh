#!/usr/bin/env bash
# Issue 17, item 3: does adapting the shipped backbone to the lab's own volume help?
#
# 1. ingest the unlabeled EM of the volume being segmented that is never scored (ISBI 2012
#    train slices 0-19, images only; slices 20-29 are scored and stay out) and more data of
#    the same instrument (the ISBI test stack);
# 2. continue SparK pretraining from BASE (default: the first shipped backbone,
#    checkpoints/em_resnet18_spark) with the adaptation recipe
#    (recipes/pretrain/spark_resnet18_adapt.yaml: 300 steps, peak lr 5e-4, 30-minute budget;
#    an export without SparK's decoder has the decoder train alone for the first 100 steps);
# 3. export it, then fine-tune it, BASE and the U-Net from scratch with the
#    label-efficiency benchmark's defaults on 1 and 2 labeled slices, and score membrane Dice
#    on slices 20-29.
#
#   bash benchmarks/isbi_adaptation.sh
#   DATA=/path/to/shared/data WORK=/tmp/adapt SEEDS=0-3 BUDGETS=1,2 BASE=checkpoints/em_resnet18_spark_v2 bash benchmarks/isbi_adaptation.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data}
WORK=${WORK:-/tmp/ssl_em_adapt}
BUDGETS=${BUDGETS:-1,2}
SEEDS=${SEEDS:-0,1}
BASE=$(cd "${BASE:-$ROOT/checkpoints/em_resnet18_spark}" && pwd)
ADAPTED="$WORK/$(basename "$BASE")_isbi"
RUN="$WORK/run_$(basename "$BASE")"  # one run per base: a rerun with another BASE must not resume this one
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK/unscored"
for i in $(seq 0 19); do cp -n "$DATA/isbi2012/train/image/$i.png" "$WORK/unscored/"; done
[ -d "$WORK/isbi_adapt.zarr" ] || ssl-em ingest --out "$WORK/isbi_adapt.zarr" --quiet --voxel-size 50,4,4 "$WORK/unscored" "$DATA/isbi2012/test"
resume=false
[ -f "$RUN/checkpoints/last.ckpt" ] && resume=true
ssl-em pretrain --config "$ROOT/recipes/pretrain/spark_resnet18_adapt.yaml" --data "$WORK/isbi_adapt.zarr" \
  --init_from "$BASE" --run_dir "$RUN" --resume "$resume" --trainer.enable_progress_bar false
ssl-em export "$RUN" --out "$ADAPTED" --dtype float16
ssl-em benchmark label-efficiency --backbones "$BASE" "$ADAPTED" \
  --images "$DATA/isbi2012/train/image" --labels "$DATA/isbi2012/train/label" \
  --classes membrane,cell --label-values 0,255 --metric dice/membrane --pool 0-19 --val-slices 20-29 \
  --budgets "$BUDGETS" --seeds "$SEEDS" --batch-size 4 --head-width 64 --no-ceiling --out "$WORK/label_efficiency"
