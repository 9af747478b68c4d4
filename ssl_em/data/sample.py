"""`ssl-em sample ARCHIVE.zarr --out sheet.png`: a grid of what the pretraining stream yields.

Shows tiles exactly as a model would receive them (after the per-source percentile
stretch), optionally after an augmented view, so a user can check pixel size, curation
and augmentation strength before spending GPU hours.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ssl_em.data.stream import EMDataModule, NoTilesError
from ssl_em.errors import UserError, check_at_least, check_writable_file


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", help="an ssl_em archive, or raw volumes")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=64, help="number of tiles (default 64)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--pixel-size", type=float, default=None, help="nm per pixel to resample to (default: native)")
    parser.add_argument("--augment", action="store_true", help="show one augmented view (ssl_em.data.augment.em_view) of each tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=8)


def sample_tiles(dm: EMDataModule, n: int, augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised tiles (n, 1, T, T) and their source indices (n,), drawn in-process."""
    dm.setup()
    images, sources = [], []
    for i, item in zip(range(n), dm.dataset):
        images.append(item["image"])
        sources.append(item["source"])
    batch = dm.normalize_batch({"image": torch.stack(images), "source": torch.tensor(sources)})
    x = batch["image"]
    if augment:
        from ssl_em.data.augment import em_view

        x = em_view(x.shape[-1])(x)
    return x, batch["source"]


def balance(dm: EMDataModule, src: torch.Tensor) -> list[tuple[str, float, int]]:
    """(image, the stream's share of tiles, tiles on this sheet) per image drawn from."""
    counts = np.bincount(src.numpy(), minlength=len(dm.dataset.sources))
    return [(s.name, float(w), int(c)) for s, w, c in zip(dm.dataset.sources, dm.dataset.weights, counts)]


def run(args) -> int:
    from ssl_em.data.sheets import tile_sheet

    check_at_least(1, {"--n": args.n, "--tile-size": args.tile_size, "--columns": args.columns})
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise UserError(f"--pixel-size {args.pixel_size}: must be a positive number of nm")
    check_writable_file(args.out, "--out")
    torch.manual_seed(args.seed)
    data = args.data[0] if len(args.data) == 1 else args.data
    dm = EMDataModule(data, tile_size=args.tile_size, pixel_size_nm=args.pixel_size, batch_size=1, num_workers=0,
                      samples_per_epoch=max(args.n, 1), shuffle_buffer=min(256, args.n), seed=args.seed)
    try:
        x, src = sample_tiles(dm, args.n, args.augment)
    except NoTilesError as e:
        raise NoTilesError(f"{' '.join(args.data)}: {e}") from None
    ds = dm.dataset
    names = [s.name for s in ds.sources]
    # Map standardised values back to a display range: mean +- 2.5 std.
    tiles = [np.clip((t[0].numpy() * 0.2 + 0.5) * 255, 0, 255).astype(np.uint8) for t in x]
    rows = balance(dm, src)
    total = len(ds.sources) + len(ds.left_out)
    shown = sum(c > 0 for _, _, c in rows)
    pixels = f"{args.pixel_size:g} nm/px" if args.pixel_size else "native pixels"
    title = (f"{len(tiles)} tiles as the pretraining stream yields them ({args.tile_size} px, {pixels}{', augmented' if args.augment else ''}) "
             f"from {shown} of {len(ds.sources)} images drawn from" + (f" ({len(ds.left_out)} of {total} left out)" if ds.left_out else "")
             + ". The stream reads tiles in blocks, so a short sample comes from few images; shares over a run:\n"
             + "; ".join(f"{n} {w:.0%} ({c} here)" for n, w, c in sorted(rows, key=lambda r: -r[1])[:12]) + ("; ..." if len(rows) > 12 else ""))
    tile_sheet(tiles, [names[int(s)] for s in src], args.columns, args.out, title=title)
    print(f"wrote {len(tiles)} tiles from {shown} image(s) to {args.out}; the stream draws from {len(ds.sources)} of the {total} images"
          + (f", {len(ds.left_out)} left out (below)" if ds.left_out else ""))
    print(f"{'image':32s} {'share of a run':>14s} {'tiles here':>10s}")
    for n, w, c in sorted(rows, key=lambda r: -r[1]):
        print(f"{n[:32]:32s} {w:14.1%} {c:10d}")
    by_reason: dict[str, list[str]] = {}
    for n, why in ds.left_out:
        by_reason.setdefault(why, []).append(n)
    for why, left in by_reason.items():
        print(f"left out {len(left)} image(s), {why}: {', '.join(left[:8])}{', ...' if len(left) > 8 else ''}")
    return 0
