"""`ssl-em demo`: the whole story on the built-in synthetic volume, in about a minute on a 2-core CPU.

Each stage is the same `ssl-em` command a user would type, run in order into `--out`:

 1. synth      a 32 x 256 x 256 synthetic EM volume with membrane/mitochondria labels
 2. ingest     into an OME-Zarr archive (pyramid, statistics, curation)
 3. inspect    summary + a contact sheet of kept/flagged tiles
 4. sample     a sheet of what the pretraining stream yields
 5. pretrain   the tiny MAE recipe (recipes/pretrain/tiny_cpu.yaml)
 6. export     the backbone as a timm-loadable checkpoint
 7. benchmark  fine-tune with 2 labeled slices from the pretrained and a random backbone,
               score held-out slices, write the comparison table and plot
 8. predict    the whole volume with the pretrained fine-tuned model; evaluate it

The synthetic volume is for demonstrating the pipeline, not evidence that pretraining
helps on real EM: see README.md and benchmarks/RESULTS.md for real-data results.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ssl_em.cli import main as ssl_em
from ssl_em.finetune.benchmark import head_of_width

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: The UNETR decoder at half its default width: about 4x less compute, which a CPU needs.
HEAD_WIDTH = 64


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes (default ./demo)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds for the comparison (default 0)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")


def _stage(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}: ssl-em {' '.join(argv)}", flush=True)
    t0 = time.time()
    code = ssl_em(argv)
    if code:
        raise SystemExit(f"ssl-em demo: stage '{title}' failed with exit code {code}")
    print(f"--- {title} done in {time.time() - t0:.0f}s", flush=True)


def run(args) -> int:
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    synth = out / "synthetic"
    if not (synth / "image.tif").is_file():
        _stage("synthetic volume", ["synth", "--out", str(synth), "--shape", "32,256,256"])
    archive = out / "archive.zarr"
    _stage("ingest", ["ingest", str(synth / "image.tif"), "--voxel-size", "8,8,8", "--out", str(archive)])
    _stage("inspect", ["inspect", str(archive), "--sheet", str(out / "curation_sheet.png")])
    _stage("sample", ["sample", str(archive), "--out", str(out / "stream_sheet.png"), "--tile-size", "64", "--n", "32"])
    run_dir = out / "runs" / "mae_tiny"
    if not (out / "checkpoints" / "demo_mae_tiny" / "model.safetensors").is_file():
        # Slices 24-31 are scored later; pretraining sees the whole unlabeled image, as a lab's
        # archive would, but never a label.
        _stage("pretrain", ["pretrain", "--config", str(RECIPES / "pretrain" / "tiny_cpu.yaml"), "--data", str(archive),
                            "--run_dir", str(run_dir), "--trainer.max_steps", str(args.pretrain_steps), "--resume"])
        _stage("export", ["export", str(run_dir), "--out", str(out / "checkpoints" / "demo_mae_tiny")])
    bench = out / "label_efficiency"
    _stage("benchmark", ["benchmark", "label-efficiency", "--backbones", str(out / "checkpoints" / "demo_mae_tiny"),
                         "--images", str(synth / "image.tif"), "--labels", str(synth / "semantic.tif"),
                         "--classes", "cytoplasm,membrane,mitochondrion", "--label-values", "0,1,2",
                         "--metric", "mean_iou", "--pool", "0-15", "--val-slices", "24-31", "--budgets", "2",
                         "--seeds", args.seeds, "--max-steps", str(args.finetune_steps), "--tile-size", "64", "--head-width", str(HEAD_WIDTH), "--out", str(bench)])
    model = out / "finetuned_pretrained"
    if not (model / "model.safetensors").is_file():
        from ssl_em.finetune.cli import finetune

        print("\n=== fine-tune the pretrained backbone on slices 0,8 for whole-volume prediction", flush=True)
        finetune(out / "checkpoints" / "demo_mae_tiny", synth / "image.tif", synth / "semantic.tif", [0, 8], [24, 25],
                 max_steps=args.finetune_steps, tile_size=64, out=model, head=head_of_width(HEAD_WIDTH),
                 data_kwargs={"classes": ["cytoplasm", "membrane", "mitochondrion"], "label_values": [0, 1, 2]})
    _stage("predict", ["predict", str(model), str(synth / "image.tif"), "--out", str(out / "prediction.zarr"), "--overwrite"])
    _stage("evaluate", ["evaluate", str(out / "prediction.zarr"), str(synth / "semantic.tif"), "--slices", "16-31", "--json", str(out / "scores.json")])
    print(f"\nssl-em demo finished in {time.time() - t0:.0f}s. Comparison (mean IoU on held-out slices 24-31, 2 labeled slices):")
    print((bench / "table.md").read_text())
    print(f"figure: {bench / 'plot.png'}; sheets: {out / 'curation_sheet.png'}, {out / 'stream_sheet.png'}; prediction: {out / 'prediction.zarr'}")
    return 0
