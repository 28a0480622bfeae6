"""A contact sheet: one source image and every effect's output on it, each with a label strip.

For curators to see the whole library at a glance, and for us to check every effect is visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .effects import EFFECTS, Effect, get_effect
from .scenes import Scene, make_scene, to_pil

GAP = 2  # grey gutter between cells, so white-edged effects stay apart
LABEL_LINES = 2
BACKGROUND = (150, 150, 150)
LABEL_BG = (255, 255, 255)
LABEL_FG = (20, 20, 20)


def _font_size(cell: int) -> int:
    return max(8, round(cell * 10 / 64))


def _line_height(cell: int) -> int:
    ascent, descent = ImageFont.load_default(size=_font_size(cell)).getmetrics()
    return ascent + descent


def label_height(cell: int) -> int:
    """Height of the label strip under a cell of side ``cell``."""
    return LABEL_LINES * _line_height(cell) + 2


def sheet_size(n_cells: int, cell: int = 64, cols: int = 8) -> tuple[int, int]:
    """(width, height) of a sheet with ``n_cells`` cells (the source counts as one)."""
    rows = -(-n_cells // cols)
    return cols * cell + (cols + 1) * GAP, rows * (cell + label_height(cell)) + (rows + 1) * GAP


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str] | None:
    """Greedy word wrap into at most LABEL_LINES lines of ``width`` px; None if it does not fit."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width:
            lines[-1] = trial
        elif font.getlength(word) <= width:
            lines.append(word)
        else:
            return None
    return lines if len(lines) <= LABEL_LINES else None


def _label(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, cell: int) -> None:
    width = cell - 2
    for size in range(_font_size(cell), 5, -1):
        font = ImageFont.load_default(size=size)
        lines = _wrap(text, font, width)
        if lines is not None:
            break
    else:  # too long even in the smallest size: truncate
        font = ImageFont.load_default(size=6)
        lines = [text]
        while len(lines[0]) > 1 and font.getlength(lines[0] + "…") > width:
            lines[0] = lines[0][:-1]
        lines[0] += "…"
    line_h = _line_height(cell)
    for i, line in enumerate(lines):
        tx = x + (cell - font.getlength(line)) / 2
        draw.text((tx, y + 1 + i * line_h), line, fill=LABEL_FG, font=font)


def _cell_image(arr: np.ndarray, cell: int) -> Image.Image:
    img = to_pil(arr)
    if img.size == (cell, cell):
        return img
    exact = cell % img.width == 0 and cell % img.height == 0
    return img.resize((cell, cell), Image.Resampling.NEAREST if exact else Image.Resampling.LANCZOS)


def contact_sheet(
    effects: Sequence[Effect | str] = EFFECTS, scene: Scene | None = None, cell: int = 64, cols: int = 8
) -> Image.Image:
    """The source, then each effect's output on it, left to right and top to bottom."""
    if cell < 16 or cols < 1:
        raise ValueError(
            f"A contact sheet needs cells of at least 16 px and one column (got {cell}, {cols})."
        )
    scene = scene or make_scene("animal", 0)
    chosen = [get_effect(e) if isinstance(e, str) else e for e in effects]
    tiles = [("Source", scene.image)] + [(e.display_name, e.fn(scene.image, scene.mask)) for e in chosen]
    sheet = Image.new("RGB", sheet_size(len(tiles), cell, cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    lh = label_height(cell)
    for i, (name, arr) in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = GAP + c * (cell + GAP), GAP + r * (cell + lh + GAP)
        sheet.paste(_cell_image(arr, cell), (x, y))
        draw.rectangle([x, y + cell, x + cell - 1, y + cell + lh - 1], fill=LABEL_BG)
        _label(draw, name, x, y + cell, cell)
    return sheet


def write_contact_sheet(
    path: Path | str,
    effects: Sequence[Effect | str] = EFFECTS,
    scene: Scene | None = None,
    cell: int = 64,
    cols: int = 8,
) -> Path:
    """Render the contact sheet to a PNG at ``path`` (folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(effects, scene, cell, cols).save(path)
    return path
