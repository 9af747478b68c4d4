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
    names = [s.name for s in dm.dataset.sources]
    # Map standardised values back to a display range: mean +- 2.5 std.
    tiles = [np.clip((t[0].numpy() * 0.2 + 0.5) * 255, 0, 255).astype(np.uint8) for t in x]
    tile_sheet(tiles, [names[int(s)][:18] for s in src], args.columns, args.out)
    print(f"wrote {len(tiles)} tiles from {len(set(src.tolist()))} of {len(names)} images to {args.out}")
    return 0
