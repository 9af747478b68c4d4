#!/usr/bin/env bash
# Issue 19: SparK, MoCo v3, DINO and BYOL at equal CPU time on ISBI 2012 membranes.
#
# Each method's CPU recipe pretrains a ResNet-18 from random weights on POOL for the steps
# that fill 20 minutes of one core at that method's rate (measured on the 2-core development
# machine: SparK 0.938 it/s, MoCo 0.508, BYOL 0.500, DINO 0.375; remeasure on another machine
# and set STEPS_<METHOD>), is exported; then all four are fine-tuned with the label-efficiency benchmark on
# 1 and 2 labeled slices against the ResNet-18 U-Net from scratch. Fixed steps, not
# --max-time, so the budget stays equal when the load changes. Results: benchmarks/RESULTS.md,
# "Issue 19: four methods at equal CPU time" (there the cells ran in
# parallel folders, merged with `ssl-em benchmark report --merge`).
#
#   POOL=pool.zarr bash benchmarks/isbi_equal_cpu.sh
#   POOL=pool.zarr WORK=/tmp/eq SEEDS=0,1 CORE=1 bash benchmarks/isbi_equal_cpu.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data}
POOL=${POOL:?an archive of unlabeled EM (ssl-em ingest ... --out pool.zarr)}
WORK=${WORK:-/tmp/ssl_em_equal_cpu}
SEEDS=${SEEDS:-0,1}
CORE=${CORE:-0}
declare -A STEPS=([spark]=${STEPS_SPARK:-1125} [moco]=${STEPS_MOCO:-610} [dino]=${STEPS_DINO:-450} [byol]=${STEPS_BYOL:-600})
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=1
mkdir -p "$WORK"
for m in spark moco dino byol; do
  extra=()
  # DINO's teacher-temperature warm-up is a third of its run, as in its recipe
  [ "$m" = dino ] && extra=(--model.init_args.teacher_temp_warmup_steps $((STEPS[dino] / 3)))
  resume=false
  [ -f "$WORK/$m/checkpoints/last.ckpt" ] && resume=true
  taskset -c "$CORE" ssl-em pretrain --config "$ROOT/recipes/pretrain/${m}_resnet18_cpu.yaml" --data "$POOL" \
    --max-steps "${STEPS[$m]}" --run_dir "$WORK/$m" --resume "$resume" "${extra[@]}"
  ssl-em export "$WORK/$m" --out "$WORK/${m}_20min"
done
# One benchmark over the four exports: the U-Net from scratch runs once for all of them.
taskset -c "$CORE" ssl-em benchmark label-efficiency --backbones "$WORK"/{spark,moco,dino,byol}_20min \
  --images "$DATA/isbi2012/train/image" --labels "$DATA/isbi2012/train/label" \
  --classes membrane,cell --label-values 0,255 --metric dice/membrane --pool 0-19 --val-slices 20-29 \
  --budgets 1,2 --seeds "$SEEDS" --batch-size 4 --head-width 64 --no-ceiling --out "$WORK/label_efficiency"
cat "$WORK/label_efficiency/table.md"
