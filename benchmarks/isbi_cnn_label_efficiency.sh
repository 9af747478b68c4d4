#!/usr/bin/env bash
# Issue 8's question: with a few labeled slices, does an ssl_em CNN backbone beat the U-Net a
# lab would otherwise train from scratch? (The ViT experiment is isbi_label_efficiency.sh.)
#
# 1. ingest every unlabeled EM image of ../shared/data that no benchmark scores on: the ISBI
#    2012 *test* stack, the FlyEM FIB-SEM sample, the gala *train* image, the bioimage.io
#    crops and the CEM500K occlusion patches;
# 2. pretrain a ResNet-18 with SparK-style masked modeling (the dense method) and with MoCo
#    (the contrastive reference, CEM500K's choice), for the same wall time side by side;
# 3. export the SparK encoder in float16 (the shipped checkpoints/em_resnet18_spark);
# 4. fine-tune it and a ResNet-18 U-Net from scratch (its random-init twin: the same
#    network) on 1, 2 and 4 labeled slices of the ISBI 2012 *train* stack, plus the U-Net on
#    all 20 (the ceiling), with the benchmark's converged schedule, and score membrane Dice
#    on the held-out slices 20-29. The pretrained arm is fine-tuned with the U-Net's own
#    recipe (backbone at the full lr from step 0; session 5 measured it +0.011 and +0.013
#    Dice over the default 0.1 x lr and 50 frozen steps at one slice), so the two arms
#    differ only in their initial weights.
#
# Every stage resumes (rerun to continue). MINUTES is the Trainer's max_time, which counts
# the time of earlier runs a resume continues. On a shared 2-core CPU the session-4 run took
# ~80 min of pretraining and ~10 min per fine-tuning run.
#
#   bash benchmarks/isbi_cnn_label_efficiency.sh
#   DATA=/path/to/shared/data WORK=/tmp/cnn MINUTES=240 SEEDS="0 1 2 3" bash benchmarks/isbi_cnn_label_efficiency.sh
set -euo pipefail
DATA=${DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
WORK=${WORK:-/tmp/ssl_em_cnn}
MINUTES=${MINUTES:-35}          # wall time of each pretraining run (both run side by side)
BUDGETS=${BUDGETS:-1,2,4}
SEEDS=${SEEDS:-0 1}
RECIPES=$(cd "$(dirname "$0")/.." && pwd)/recipes/pretrain
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=1
mkdir -p "$WORK"

POOL=$WORK/pool.zarr
ssl-em ingest "$DATA/isbi2012/test" --voxel-size 50,4,4 --out "$POOL" --quiet
ssl-em ingest "$DATA/flyem_fibsem_sample1/grayscale_maps" --voxel-size 10,10,10 --out "$POOL" --quiet
ssl-em ingest "$DATA"/bioimageio_crops/*.tif "$DATA"/cem500k_examples/occlusion/*.tiff --out "$POOL" --quiet
ssl-em ingest "$DATA/gala_fibsem/train-image.h5:/stack" --voxel-size 10,10,10 --out "$POOL" --quiet

pretrain() {  # NAME RECIPE: resumes from the run's last checkpoint
  local run=$WORK/runs/$1 resume=false
  [ -f "$run/checkpoints/last.ckpt" ] && resume=true
  ssl-em pretrain --config "$RECIPES/$2" --data "$POOL" --run_dir "$run" --resume "$resume" \
    --trainer.max_time "00:00:$MINUTES:00" --trainer.enable_progress_bar false
}
pretrain spark_r18 spark_resnet18_cpu.yaml & pretrain moco_r18 moco_resnet18_cpu.yaml & wait
ssl-em export "$WORK/runs/spark_r18" --out "$WORK/ckpt/em_resnet18_spark" --dtype float16
ssl-em export "$WORK/runs/moco_r18" --out "$WORK/ckpt/em_resnet18_moco" --dtype float16

OUT=$WORK/label_efficiency
mkdir -p "$OUT"
for s in $SEEDS; do
  ssl-em benchmark label-efficiency --backbones "$WORK/ckpt/em_resnet18_spark" \
    --images "$DATA/isbi2012/train/image" --labels "$DATA/isbi2012/train/label" \
    --classes membrane,cell --label-values 0,255 --metric dice/membrane --pool 0-19 --val-slices 20-29 \
    --budgets "$BUDGETS" --seeds "$s" --batch-size 4 --head-width 64 --unfreeze-at-step 0 --backbone-lr-scale 1.0 \
    --out "$OUT/seed$s" > "$OUT.seed$s.log" 2>&1 &
done
wait
ssl-em benchmark report --out "$OUT" --metric dice/membrane --merge "$OUT"/seed* \
  --title "ISBI 2012 membranes: SparK ResNet-18 vs a ResNet-18 U-Net from scratch"
