"""`ssl-em inspect ARCHIVE.zarr [--sheet out.png]`: what an archive holds, and what curation did.

Prints one row per complete image (shape, dtype, voxel size, pyramid, intensity
statistics, kept and flagged tiles by reason) and names incomplete images (an
interrupted ingest; re-run it). `--sheet` writes a contact sheet of randomly sampled
level-0 tiles, half kept and half flagged, each framed in the colour of its reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ssl_em.data.archive import Archive, ArchiveImage, TileFlag
from ssl_em.data.sheets import tile_sheet
from ssl_em.errors import check_at_least, check_writable_file

#: Frame colour of each tile on the sheet: the first (lowest) flag bit decides.
COLOURS = {
    0: (60, 200, 80),  # kept
    TileFlag.LOW_INFORMATION: (240, 200, 40),
    TileFlag.SATURATED: (230, 50, 50),
    TileFlag.PADDING: (60, 120, 240),
    TileFlag.DUPLICATE: (210, 60, 210),
}
SHORT = {TileFlag.LOW_INFORMATION: "low", TileFlag.SATURATED: "sat", TileFlag.PADDING: "pad", TileFlag.DUPLICATE: "dup"}


def reason(bits: int) -> str:
    """"kept" or the flags' short names joined by '+' ("low+pad")."""
    return "+".join(SHORT[f] for f in TileFlag if bits & f) or "kept"


def summary_table(archive: Archive):
    """A rich Table describing every complete image."""
    from rich.table import Table

    table = Table(title=f"{archive.path}  (fingerprint {archive.fingerprint})")
    for col in ("image", "shape z,y,x", "dtype", "voxel nm z,y,x", "levels", "lo..hi (mean±std)", "kept/tiles", "low-info", "saturated", "padding", "duplicate", "source"):
        table.add_column(col, no_wrap=col == "levels")
    for im in archive.images:
        m, s = im.meta, im.stats
        c = m["curation"]["counts"]
        vs = ",".join(f"{v:g}" for v in m["voxel_size_nm"]) + ("" if m.get("voxel_size_known", True) else " ?")
        shapes = [lv.shape for lv in im.levels]
        levels = f"{len(shapes)}: " + " > ".join(",".join(map(str, s)) for s in (shapes[0], shapes[-1])[: min(2, len(shapes))])
        table.add_row(
            im.name, ",".join(map(str, m["shape"])), m["dtype"], vs, levels,
            f"{s.lo:g}..{s.hi:g} ({s.mean:.1f}±{s.std:.1f})", f"{c['kept']}/{c.get('total', '?')}",
            *(str(c[k]) for k in ("low_information", "saturated", "padding", "duplicate")), str(Path(*Path(m["source"]).parts[-2:])),
        )
    return table


def sample_tiles(archive: Archive, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str], list[tuple]]:
    """Up to n level-0 tiles, half kept and half flagged where there are enough of each.
    Returns tiles (uint8, stretched with the image's own lo..hi), captions and frame colours."""
    rng = np.random.default_rng(seed)
    kept, flagged = [], []  # (image index, z, ty, tx, bits)
    for i, im in enumerate(archive.images):
        cur = im.curation
        for where, bucket in ((cur == 0, kept), (cur != 0, flagged)):
            idx = np.argwhere(where)
            for z, ty, tx in idx[rng.permutation(len(idx))[:n]]:
                bucket.append((i, int(z), int(ty), int(tx), int(cur[z, ty, tx])))
    n_flagged = min(len(flagged), n // 2)
    picks = [flagged[j] for j in rng.permutation(len(flagged))[:n_flagged]]
    picks += [kept[j] for j in rng.permutation(len(kept))[: n - n_flagged]]
    tiles, labels, colours = [], [], []
    for i, z, ty, tx, bits in picks:
        im: ArchiveImage = archive.images[i]
        t = im.curation_tile
        raw = im.levels[0].read(slice(z, z + 1), slice(ty * t, (ty + 1) * t), slice(tx * t, (tx + 1) * t))[0]
        s = im.stats
        tiles.append((np.clip((raw.astype(np.float32) - s.lo) / max(s.hi - s.lo, 1e-12), 0, 1) * 255).astype(np.uint8))
        labels.append(f"{reason(bits)} z{z} {im.name}")
        colours.append(COLOURS[TileFlag(bits & -bits)] if bits else COLOURS[0])
    return tiles, labels, colours


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", help="an archive written by `ssl-em ingest`")
    parser.add_argument("--sheet", default=None, help="write a PNG contact sheet of kept and flagged tiles here")
    parser.add_argument("--n", type=int, default=32, help="tiles on the sheet (default 32)")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    check_at_least(1, {"--n": args.n, "--columns": args.columns})
    if args.sheet:
        check_writable_file(args.sheet, "--sheet")
    archive = Archive(args.archive)  # not an archive, corrupt metadata: one line from `ssl-em`
    console.print(summary_table(archive))
    if archive.incomplete:
        console.print(f"[yellow]incomplete (interrupted ingest; re-run it to redo them):[/yellow] {', '.join(archive.incomplete)}")
    if args.sheet:
        tiles, labels, colours = sample_tiles(archive, args.n, args.seed)
        if not tiles:
            console.print("no tiles to show")
            return 0
        names = {0: "kept", TileFlag.LOW_INFORMATION: "low information", TileFlag.SATURATED: "saturated", TileFlag.PADDING: "padding", TileFlag.DUPLICATE: "duplicate"}
        title = (f"{archive.path.name}: {len(tiles)} random level-0 curation tiles, half kept, half flagged where there are enough; "
                 f"frame colour = first flag; caption = flags, z, image")
        path = tile_sheet(tiles, labels, args.columns, args.sheet, borders=colours, cell=128, title=title,
                          legend=[(names[k], c) for k, c in COLOURS.items()])
        console.print(f"contact sheet: {path} ({len(tiles)} tiles; legend in the image)", highlight=False)
    return 0
