"""Contact sheets: a grid of 2D tiles with captions, written as one PNG.

Used by `ssl-em inspect --sheet` (what curation kept and flagged) and `ssl-em sample`
(what the pretraining stream yields), so a user can *see* the data a model will learn from.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CAPTION_HEIGHT = 14  # px: one line of Pillow's default bitmap font
BORDER = 3  # px


def to_uint8(tile: np.ndarray) -> np.ndarray:
    """Display a tile: uint8 as is; anything else stretched over its p0.5..p99.5."""
    tile = np.asarray(tile)
    if tile.dtype == np.uint8:
        return tile
    lo, hi = np.percentile(tile, (0.5, 99.5)) if tile.size else (0.0, 1.0)
    return (np.clip((tile.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def tile_sheet(
    tiles: list[np.ndarray],
    labels: list[str] | None,
    columns: int,
    out_path: str | Path,
    borders: list[tuple[int, int, int] | None] | None = None,
    cell: int | None = None,
) -> Path:
    """Write tiles (each 2D (h, w), any dtype) as a grid PNG, `columns` wide.

    labels: one caption per tile, drawn under it (None: no captions).
    borders: an RGB frame colour per tile (None entries: no frame), e.g. by curation reason.
    cell: edge of each grid cell in px; tiles are resized to fit (default: the largest tile).
    """
    from PIL import Image, ImageDraw

    if not tiles:
        raise ValueError("tile_sheet needs at least one tile")
    cell = cell or max(max(t.shape[-2:]) for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    caption = CAPTION_HEIGHT if labels else 0
    pitch_x, pitch_y = cell + 2 * BORDER, cell + 2 * BORDER + caption
    sheet = Image.new("RGB", (columns * pitch_x, rows * pitch_y), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x0, y0 = (i % columns) * pitch_x, (i // columns) * pitch_y
        colour = borders[i] if borders else None
        if colour is not None:
            draw.rectangle([x0, y0, x0 + pitch_x - 1, y0 + cell + 2 * BORDER - 1], fill=tuple(colour))
        image = Image.fromarray(to_uint8(np.squeeze(tile)))
        scale = cell / max(image.size)
        if scale != 1:  # nearest keeps pixels honest: a sheet is for judging the data
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
        sheet.paste(image.convert("RGB"), (x0 + BORDER, y0 + BORDER))
        if labels:
            draw.text((x0 + BORDER, y0 + cell + 2 * BORDER), labels[i][: max(4, cell // 6)], fill=(230, 230, 230))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
