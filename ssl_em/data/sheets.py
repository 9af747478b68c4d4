"""Contact sheets: a grid of 2D tiles with captions, written as one PNG.

Used by `ssl-em inspect --sheet` (what curation kept and flagged) and `ssl-em sample`
(what the pretraining stream yields), so a user can *see* the data a model will learn from.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

LINE_HEIGHT = 14  # px: one line of Pillow's default bitmap font
CHAR_WIDTH = 6  # px: one character of that font
BORDER = 3  # px
CAPTION_LINES = 2  # a caption wraps onto this many lines rather than being cut


def to_uint8(tile: np.ndarray) -> np.ndarray:
    """Display a tile: uint8 as is; anything else stretched over its p0.5..p99.5."""
    tile = np.asarray(tile)
    if tile.dtype == np.uint8:
        return tile
    lo, hi = np.percentile(tile, (0.5, 99.5)) if tile.size else (0.0, 1.0)
    return (np.clip((tile.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def wrap(text: str, width_px: int, lines: int | None = None) -> list[str]:
    """`text` in lines of at most width_px (default font); the last kept line ends in '~'
    when `lines` cuts it short (the bitmap font has no ellipsis)."""
    n = max(1, width_px // CHAR_WIDTH)
    out = textwrap.wrap(text, n, break_long_words=True, break_on_hyphens=False) or [""]
    if lines is not None and len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: n - 1] + "~"
    return out


def tile_sheet(
    tiles: list[np.ndarray],
    labels: list[str] | None,
    columns: int,
    out_path: str | Path,
    borders: list[tuple[int, int, int] | None] | None = None,
    cell: int | None = None,
    title: str = "",
    legend: list[tuple[str, tuple[int, int, int]]] | None = None,
) -> Path:
    """Write tiles (each 2D (h, w), any dtype) as a grid PNG, `columns` wide.

    labels: one caption per tile, drawn under it, wrapped onto up to two lines (None: none).
    borders: an RGB frame colour per tile (None entries: no frame), e.g. by curation reason.
    cell: edge of each grid cell in px (default: the largest tile). Every tile is drawn at
        one common scale, cell / largest tile side, so a small edge tile looks small
        instead of magnified.
    title: text above the grid (wrapped to its width); legend: (name, colour) swatches
        drawn under the title, e.g. what each frame colour means.
    """
    from PIL import Image, ImageDraw

    if not tiles:
        raise ValueError("tile_sheet needs at least one tile")
    largest = max(max(t.shape[-2:]) for t in tiles)
    cell = cell or largest
    scale = cell / largest
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    caption = LINE_HEIGHT * CAPTION_LINES if labels else 0
    pitch_x, pitch_y = cell + 2 * BORDER, cell + 2 * BORDER + caption
    width = columns * pitch_x
    head = [line for part in title.splitlines() for line in wrap(part, width - 2 * BORDER)] if title else []
    entries = [(name, tuple(colour)) for name, colour in (legend or [])]
    legend_rows = _legend_rows(entries, width - 2 * BORDER)
    top = LINE_HEIGHT * (len(head) + len(legend_rows)) + (BORDER if head or entries else 0)
    sheet = Image.new("RGB", (width, top + rows * pitch_y), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(head):
        draw.text((BORDER, BORDER + k * LINE_HEIGHT), line, fill=(240, 240, 240))
    for k, row in enumerate(legend_rows):
        y = BORDER + (len(head) + k) * LINE_HEIGHT
        for x, name, colour in row:
            draw.rectangle([x, y + 2, x + 9, y + 11], fill=colour)
            draw.text((x + 13, y), name, fill=(230, 230, 230))
    for i, tile in enumerate(tiles):
        x0, y0 = (i % columns) * pitch_x, top + (i // columns) * pitch_y
        image = Image.fromarray(to_uint8(np.squeeze(tile)))
        if scale != 1:  # nearest keeps pixels honest: a sheet is for judging the data
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
        colour = borders[i] if borders else None
        if colour is not None:  # a frame around the tile as drawn, small edge tiles included
            draw.rectangle([x0, y0, x0 + image.width + 2 * BORDER - 1, y0 + image.height + 2 * BORDER - 1], fill=tuple(colour))
        sheet.paste(image.convert("RGB"), (x0 + BORDER, y0 + BORDER))
        if labels:
            for k, line in enumerate(wrap(labels[i], cell + BORDER, CAPTION_LINES)):
                draw.text((x0 + BORDER, y0 + cell + 2 * BORDER + k * LINE_HEIGHT), line, fill=(230, 230, 230))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path


def _legend_rows(entries: list[tuple[str, tuple]], width: int) -> list[list[tuple[int, str, tuple]]]:
    """Swatches laid out left to right, wrapping: rows of (x, name, colour)."""
    rows, row, x = [], [], BORDER
    for name, colour in entries:
        w = 13 + CHAR_WIDTH * len(name) + 12
        if row and x + w > width:
            rows.append(row)
            row, x = [], BORDER
        row.append((x, name, colour))
        x += w
    return rows + ([row] if row else [])
