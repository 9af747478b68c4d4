"""`ssl-em demo`: the whole story on the built-in synthetic volume, in minutes on a 2-core CPU.

Each stage is the same `ssl-em` command a user would type, run in order into `--out`, and
printed as `[k/10]` with its time:

 1. synth      a 32 x 256 x 256 synthetic EM volume with membrane/mitochondria labels
 2. ingest     into an OME-Zarr archive (pyramid, statistics, curation)
 3. inspect    summary + a contact sheet of kept/flagged tiles
 4. sample     a sheet of what the pretraining stream yields
 5. pretrain   the tiny MAE recipe (recipes/pretrain/tiny_cpu.yaml)
 6. export     the backbone as a timm-loadable checkpoint
 7. benchmark  fine-tune with 2 labeled slices from the demo's backbone, the shipped EM
               backbone (checkpoints/em_resnet18_spark), a random-init twin and a
               ResNet-18 U-Net from scratch; score held-out slices 24-31, write the
               comparison table and plot
 8. fine-tune  the pretrained backbone on slices 0 and 8, for prediction
 9. predict    the whole volume with that model
10. evaluate   it on the same held-out slices 24-31

The summary says whether the comparison shows a gain or a difference within noise (one
seed cannot tell), and why the prediction model's score differs from the comparison's.
On a busy machine the demo uses one thread per process (`threads_for_load`).

The synthetic volume is for demonstrating the pipeline, not evidence that pretraining
helps on real EM: see README.md and benchmarks/RESULTS.md for real-data results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from ssl_em.backbones import SHIPPED_BACKBONE
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


#: The demo's stages, in order, for "[k/N]" in what it prints.
STAGES = ("synthetic volume", "ingest", "inspect", "sample", "pretrain", "export", "benchmark", "fine-tune for prediction", "predict", "evaluate")


def threads_for_load(cores: int, load: float) -> int:
    """Intra-op threads for this process: the cores nobody else is using, at least one.

    On a busy machine PyTorch's default (one thread per core) makes its threads wait for
    each other behind other processes' work: a 2-core demo that takes about a minute idle
    took 20 minutes beside other jobs. One thread per process keeps it near its idle time."""
    return max(1, min(cores, int(cores - load + 0.5)))


def _stage(title: str, argv: list[str] | None = None, fn=None) -> None:
    k = STAGES.index(title) + 1
    print(f"\n=== [{k}/{len(STAGES)}] {title}" + (f": ssl-em {' '.join(argv)}" if argv else ""), flush=True)
    t0 = time.time()
    code = ssl_em(argv) if argv else fn()
    if code:
        raise SystemExit(f"ssl-em demo: stage '{title}' failed with exit code {code}")
    print(f"--- [{k}/{len(STAGES)}] {title} done in {time.time() - t0:.0f}s", flush=True)


def verdict(gains: dict, metric: str, noise: float = 0.01) -> list[str]:
    """One sentence per (pretrained arm, budget) saying what the paired comparison shows.

    gains: `ssl_em.finetune.benchmark_report.paired_gains` (arm -> budget -> (mean, std, wins,
    pairs)). A single seed cannot separate a difference from seed-to-seed noise, and a
    difference under `noise` is not a gain whatever the seeds; with several seeds a gain
    must clear two standard errors of the paired differences."""
    out = []
    for arm, by_budget in gains.items():
        for budget, (mean, std, wins, pairs) in by_budget.items():
            what = f"{arm}, {budget} labeled slice(s): {mean:+.3f} {metric} against random init"
            if abs(mean) < noise:
                out.append(f"{what} ({wins}/{pairs} seeds better): within noise, no measurable difference")
            elif pairs < 2:
                out.append(f"{what} from one seed: a single run cannot tell this from noise (--seeds 0,1,2,3 measures it)")
            elif abs(mean) > 2 * std / (pairs - 1) ** 0.5:
                out.append(f"{what}, {wins}/{pairs} seeds better: a {'gain' if mean > 0 else 'loss'} beyond seed-to-seed noise")
            else:
                out.append(f"{what}, {wins}/{pairs} seeds better: within seed-to-seed noise (std {std:.3f})")
    return out


def run(args) -> int:
    import torch

    from ssl_em.console import quiet

    from ssl_em.errors import check_at_least

    check_at_least(1, {"--pretrain-steps": args.pretrain_steps, "--finetune-steps": args.finetune_steps})  # -1 would train forever
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    torch.set_num_threads(threads_for_load(cores, load))
    print(f"ssl-em demo: writing to {out}; {torch.get_num_threads()} thread(s) on {cores} cores (load {load:.1f})", flush=True)
    t0 = time.time()
    with quiet():
        bench = _run_stages(args, out)
    print(f"\nssl-em demo finished in {time.time() - t0:.0f}s. Comparison (mean IoU on held-out slices {VAL}, {BUDGET} labeled slices from {POOL}):")
    from ssl_em.finetune.benchmark_report import markdown_table, paired_gains, read_rows, summarize

    rows = read_rows(bench / "results.csv")
    print(markdown_table(summarize(rows), "mean_iou"))
    for line in verdict(paired_gains(rows), "mean IoU"):
        print(f"- {line}")
    scores = json.loads((out / "scores.json").read_text())
    print(f"\nThe prediction model ({out / 'finetuned_pretrained'}) is a separate fine-tuning run on slices "
          f"{', '.join(map(str, PREDICT_TRAIN))}; after whole-volume prediction it scores mean IoU {scores['mean_iou']:.3f} "
          f"on the same held-out slices {VAL}. It need not match the comparison's pretrained score: its training "
          f"slices differ, and prediction blends overlapping windows.")
    print(f"figure: {bench / 'plot.png'}; sheets: {out / 'curation_sheet.png'}, {out / 'stream_sheet.png'}; prediction: {out / 'prediction.zarr'}")
    return 0


#: Held-out slices every score is measured on; the pool the benchmark draws labels from.
VAL, POOL, BUDGET = "24-31", "0-15", 2
#: The labeled slices of the model the demo uses for whole-volume prediction.
PREDICT_TRAIN = (0, 8)


def _run_stages(args, out: Path) -> Path:
    synth = out / "synthetic"
    if not (synth / "image.tif").is_file():
        _stage("synthetic volume", ["synth", "--out", str(synth), "--shape", "32,256,256"])
    archive = out / "archive.zarr"
    _stage("ingest", ["ingest", str(synth / "image.tif"), "--voxel-size", "8,8,8", "--out", str(archive)])
    _stage("inspect", ["inspect", str(archive), "--sheet", str(out / "curation_sheet.png")])
    _stage("sample", ["sample", str(archive), "--out", str(out / "stream_sheet.png"), "--tile-size", "64", "--n", "32"])
    run_dir = out / "runs" / "mae_tiny"
    backbone = out / "checkpoints" / "demo_mae_tiny"
    if not (backbone / "model.safetensors").is_file():
        # Slices 24-31 are scored later; pretraining sees the whole unlabeled image, as a lab's
        # archive would, but never a label.
        _stage("pretrain", ["pretrain", "--config", str(RECIPES / "pretrain" / "tiny_cpu.yaml"), "--data", str(archive),
                            "--run_dir", str(run_dir), "--trainer.max_steps", str(args.pretrain_steps), "--resume"])
        _stage("export", ["export", str(run_dir), "--out", str(backbone)])
    bench = out / "label_efficiency"
    # The comparison adds the shipped backbone when the checkout has it (an editable install does).
    shipped = [str(SHIPPED_BACKBONE)] if (SHIPPED_BACKBONE / "model.safetensors").is_file() else []
    # No all-labels ceiling here: it would double the demo's time for a number the synthetic
    # volume does not need.
    _stage("benchmark", ["benchmark", "label-efficiency", "--backbones", str(backbone), *shipped, "--no-ceiling",
                         "--images", str(synth / "image.tif"), "--labels", str(synth / "semantic.tif"),
                         "--classes", "cytoplasm,membrane,mitochondrion", "--label-values", "0,1,2",
                         "--metric", "mean_iou", "--pool", POOL, "--val-slices", VAL, "--budgets", str(BUDGET),
                         "--seeds", args.seeds, "--max-steps", str(args.finetune_steps), "--tile-size", "64", "--head-width", str(HEAD_WIDTH), "--out", str(bench)])
    model = out / "finetuned_pretrained"
    if not (model / "model.safetensors").is_file():
        from ssl_em.finetune.cli import finetune

        def finetune_for_prediction() -> int:
            finetune(backbone, synth / "image.tif", synth / "semantic.tif", list(PREDICT_TRAIN), None, max_steps=args.finetune_steps,
                     tile_size=64, out=model, head=head_of_width(HEAD_WIDTH), progress=True,
                     data_kwargs={"classes": ["cytoplasm", "membrane", "mitochondrion"], "label_values": [0, 1, 2]})
            return 0

        _stage("fine-tune for prediction", fn=finetune_for_prediction)
    _stage("predict", ["predict", str(model), str(synth / "image.tif"), "--out", str(out / "prediction.zarr"), "--overwrite"])
    _stage("evaluate", ["evaluate", str(out / "prediction.zarr"), str(synth / "semantic.tif"), "--slices", VAL, "--json", str(out / "scores.json")])
    return bench
