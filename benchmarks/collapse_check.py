"""Collapse check of exported backbones on EM tiles they were not trained on.

For each backbone folder (and a random-init twin of the first one's architecture, seed 0)
prints, over non-overlapping tiles of the given PNG slices: the per-dimension std of the
l2-normalised pooled embeddings (mean over dimensions, and as a fraction of 1/sqrt(D), its
value for embeddings spread evenly over the sphere), the share of "dead" dimensions (std
under a tenth of 1/sqrt(D)), and the effective rank (exp of the entropy of the normalised
singular values; Roy & Vetterli 2007). A collapsed backbone has std near 0 and rank near 1.

    python benchmarks/collapse_check.py checkpoints/A checkpoints/B \
        --images /work/shared/data/isbi2012/train/image --slices 20 --tile 128
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiles(images: Path, slices: int, tile: int) -> np.ndarray:
    """(N, H, W) uint8: non-overlapping tiles of the first `slices` PNGs (natural order)."""
    files = sorted(images.glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)[:slices]
    out = []
    for f in files:
        a = np.asarray(Image.open(f).convert("L"))
        for y in range(0, a.shape[0] - tile + 1, tile):
            for x in range(0, a.shape[1] - tile + 1, tile):
                out.append(a[y : y + tile, x : x + tile])
    return np.stack(out)


@torch.no_grad()
def spread(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """x: (N, 1, H, W) normalised -> collapse statistics of model(x): (N, D)."""
    z = torch.cat([model(b) for b in x.split(64)]).float()
    z = torch.nn.functional.normalize(z, dim=1)
    D = z.shape[1]
    std = z.std(dim=0)
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum()
    return {"D": D, "std": std.mean().item(), "std_x_sqrtD": std.mean().item() * math.sqrt(D),
            "dead": (std < 0.1 / math.sqrt(D)).float().mean().item(), "eff_rank": math.exp(-(p * torch.log(p + 1e-12)).sum().item())}


def main() -> None:
    import timm

    import ssl_em

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--images", type=Path, default=Path("/work/shared/data/isbi2012/train/image"))
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--tile", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = tiles(args.images, args.slices, args.tile)
    rows = []
    for folder in args.folders:
        model, meta = ssl_em.load_backbone(folder)
        pre = ssl_em.preprocessing(folder)
        stats = pre.stats(raw)  # the whole stack's percentiles, as ssl_em stretches a volume
        x = pre(raw, stats)[:, None]
        rows.append((str(folder), spread(model.eval(), x)))
        if len(rows) == 1:
            torch.manual_seed(0)
            twin = timm.create_model(meta.architecture, pretrained=False, **meta.model_args).eval()
            first_x = x
    rows.append((f"random init {meta.architecture}", spread(twin, first_x)))
    print(f"{len(raw)} tiles of {args.tile} px from {args.slices} slices of {args.images}")
    print("| backbone | D | per-dim std | std x sqrt(D) | dead dims | effective rank |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['D']} | {r['std']:.4f} | {r['std_x_sqrtD']:.2f} | {r['dead']:.0%} | {r['eff_rank']:.1f} |")


if __name__ == "__main__":
    main()
