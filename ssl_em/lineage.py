"""Where a backbone comes from: the backbones it continued (`--init_from`), the tiles each
stage saw, and the images they were cut from. Recorded in every pretraining checkpoint and
every export's `ssl_em.json`, and printed in the model card, so a lab that is sent a
backbone can tell what it was trained on (and check those data's terms) without asking.

All of it is plain data read from files, never paths of the training machine: a source is
named by its last two path parts (`pssr_tsem/HR_small.tif`) and its content fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Keys of one ancestor in `BackboneMeta.lineage` (oldest first).
ANCESTOR_KEYS = ("name", "weights_sha256", "method", "recipe", "steps", "tiles", "data_fingerprint")


def weights_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a weights file, hex: what names a parent beyond its folder name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lineage_of(folder: str | Path) -> list[dict]:
    """The lineage a run started from export `folder` inherits: the folder's own lineage,
    then the folder itself. `folder` is an exported backbone (ssl_em.json, model.safetensors);
    its metadata is checked by the one schema (ssl_em.metadata) before it is trusted."""
    from ssl_em.metadata import check_backbone

    folder = Path(folder)
    where = folder / "ssl_em.json"
    meta = check_backbone(json.loads(where.read_text()), str(where))
    me = {"name": folder.name, "weights_sha256": weights_sha256(folder / "model.safetensors")}
    me.update({k: meta.get(k) for k in ANCESTOR_KEYS if k not in me})
    return [*meta.get("lineage", []), me]


def data_sources(dataset) -> list[dict]:
    """One record per image a tile stream draws from: its name, where it came from (last
    two path parts of the ingested file), content fingerprint, pixel size in nm (None when
    unknown) and its share of the tiles. dataset: a `TileDataset` after setup."""
    out = []
    for src, weight in zip(dataset.sources, dataset.weights):
        origin = Path(src.origin) if src.origin else None
        out.append({
            "image": src.name,
            "source": "/".join(origin.parts[-2:]) if origin else None,
            "fingerprint": src.fingerprint,
            "pixel_size_nm": float(src.voxel_sizes[0].y) if src.voxel_size_known else None,
            "share": round(float(weight), 5),
        })
    return out


def total_tiles(tiles: int | None, lineage: list[dict]) -> int | None:
    """Tiles seen by a backbone and everything it continued; None when a stage did not record them."""
    counts = [tiles, *(a.get("tiles") for a in lineage)]
    return None if any(c is None for c in counts) else int(sum(counts))


def card_section(meta) -> str:
    """The model card's lineage and training-data section (markdown) for a BackboneMeta."""
    lines = ["## Lineage and training data", ""]
    stages = [*meta.lineage, {"name": "this backbone", "steps": meta.steps, "tiles": meta.tiles,
                              "method": meta.method, "data_fingerprint": meta.data_fingerprint, "weights_sha256": None}]
    lines += ["| stage | method | steps | tiles | data | weights sha256 |", "|---|---|---|---|---|---|"]
    for s in stages:
        method = (s.get("method") or "?").rsplit(".", 1)[-1]
        tiles = f"{s['tiles']:,}" if s.get("tiles") is not None else "not recorded"
        sha = f"`{s['weights_sha256'][:16]}`" if s.get("weights_sha256") else ""
        lines.append(f"| {s['name']} | {method} | {s.get('steps') if s.get('steps') is not None else '?'} | {tiles} | `{s.get('data_fingerprint')}` | {sha} |")
    total = total_tiles(meta.tiles, meta.lineage)
    lines += ["", f"Tiles seen in all: {total:,}." if total is not None else "Tiles seen in all: not known (a stage did not record them)."]
    if meta.data_sources:
        lines += ["", f"This stage drew its tiles from {len(meta.data_sources)} images (the full list, with fingerprints and "
                  "pixel sizes, is `data_sources` in ssl_em.json); by folder:", "",
                  "| folder | images | share of tiles | pixel size (nm) |", "|---|---|---|---|"]
        for folder, rows in _by_folder(meta.data_sources).items():
            sizes = sorted({r["pixel_size_nm"] for r in rows if r["pixel_size_nm"] is not None})
            size = ", ".join(f"{s:g}" for s in sizes) or "not recorded"
            lines.append(f"| {folder} | {len(rows)} | {sum(r['share'] for r in rows):.1%} | {size} |")
    return "\n".join(lines) + "\n"


def _by_folder(sources: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in sources:
        folder = r["source"].rsplit("/", 1)[0] if r.get("source") and "/" in r["source"] else (r.get("source") or r["image"])
        groups.setdefault(folder, []).append(r)
    return groups
