"""The report's pictures, drawn with Pillow alone: deterministic PNGs, no display, no network.

- `contact_sheet`: one row per target, the target tile then its mined neighbours, captions under each.
- `score_histogram`: the distribution of neighbour scores, kept and dropped pairs stacked.
- `label_bars`: targets vs mined images per label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from deft_mine.engine import store
from deft_mine.engine.images import LoadFailure, load_rgb

WHITE = (255, 255, 255)
INK = (33, 33, 33)
GRID = (220, 220, 220)
PLACEHOLDER = (160, 160, 160)
TARGET_FRAME = (40, 90, 200)
KEPT = (46, 139, 87)
DROPPED = (200, 50, 50)
NEUTRAL = (90, 120, 170)
MINED = (230, 140, 40)

TILE = 112  # thumbnail side in pixels
GAP = 10
LINE = 14  # caption line height
CAPTION_LINES = 3


@dataclass
class Tile:
    """One image on the contact sheet: where it is, what to write under it, its frame colour."""

    filepath: str
    root: Path | None
    lines: list[str] = field(default_factory=list)
    frame: tuple[int, int, int] = NEUTRAL


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, face) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"


def _save(image: Image.Image, path: Path) -> None:
    with store.atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def _tile_image(tile: Tile) -> Image.Image:
    loaded = load_rgb(tile.filepath, tile.root or Path("."))
    if isinstance(loaded, LoadFailure):
        canvas = Image.new("RGB", (TILE, TILE), PLACEHOLDER)
        draw = ImageDraw.Draw(canvas)
        face = font(13)
        word = "missing" if loaded.reason == "missing" else loaded.reason.split(" (")[0]
        text = _fit(draw, word, TILE - 8, face)
        width = draw.textlength(text, font=face)
        draw.text(((TILE - width) / 2, TILE / 2 - 8), text, fill=WHITE, font=face)
        draw.line([(0, 0), (TILE - 1, TILE - 1)], fill=(180, 180, 180))
        draw.line([(0, TILE - 1), (TILE - 1, 0)], fill=(180, 180, 180))
        return canvas
    return ImageOps.contain(loaded, (TILE, TILE), method=Image.Resampling.BICUBIC)


def contact_sheet(rows: Sequence[Sequence[Tile]], path: Path, title: str) -> None:
    """Each row: the target tile, then its neighbours; at least 1 column, rows as given."""
    columns = max([len(r) for r in rows] + [1])
    cell_w, cell_h = TILE + GAP, TILE + 6 + CAPTION_LINES * LINE + GAP
    width = max(GAP + columns * cell_w, 360)
    height = 36 + max(len(rows), 1) * cell_h + GAP
    sheet = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 10), _fit(draw, title, width - 2 * GAP, font(15)), fill=INK, font=font(15))
    small = font(11)
    if not rows:
        draw.text((GAP, 50), "no pairs to show", fill=INK, font=font(13))
    for r, row in enumerate(rows):
        y = 36 + r * cell_h
        for c, tile in enumerate(row):
            x = GAP + c * cell_w
            thumb = _tile_image(tile)
            ox, oy = x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2
            sheet.paste(thumb, (ox, oy))
            draw.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=tile.frame, width=3)
            for i, text in enumerate(tile.lines[:CAPTION_LINES]):
                draw.text((x, y + TILE + 6 + i * LINE), _fit(draw, text, TILE, small), fill=INK, font=small)
        if r:
            draw.line([(0, y - GAP // 2 - 3), (width, y - GAP // 2 - 3)], fill=GRID)
    _save(sheet, path)


def score_histogram(scores: np.ndarray, kept: np.ndarray | None, path: Path, title: str,
                    axis_label: str, bins: int = 20) -> None:
    """Counts of `scores` in `bins` equal bins; with `kept`, kept (green) and dropped (red) stacked."""
    scores = np.asarray(scores, dtype=np.float64)
    width, height = 720, 400
    left, right, top, bottom = 64, 24, 64, 56
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), _fit(draw, title, width - left - right, font(15)), fill=INK, font=font(15))
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=INK)
    face = font(11)
    if scores.size == 0:
        draw.text((left + 20, top + plot_h / 2), "no scores to show (no pairs were found)", fill=INK, font=font(13))
        _save(image, path)
        return
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    layers: list[tuple[np.ndarray, tuple[int, int, int], str]] = []
    if kept is not None:
        kept = np.asarray(kept, dtype=bool)
        layers.append((np.histogram(scores[kept], edges)[0], KEPT, f"kept ({int(kept.sum())})"))
        layers.append((np.histogram(scores[~kept], edges)[0], DROPPED, f"dropped ({int((~kept).sum())})"))
    else:
        layers.append((np.histogram(scores, edges)[0], NEUTRAL, f"pairs ({scores.size})"))
    total = sum(layer[0] for layer in layers)
    step = max(1, -(-int(total.max()) // 4))  # whole-number count ticks, about four of them
    peak = step * max(1, -(-int(total.max()) // step))
    for tick in range(0, peak + 1, step):
        y = top + plot_h - tick / peak * plot_h
        if tick:
            draw.line([(left + 1, y), (left + plot_w - 1, y)], fill=GRID)
        label = str(tick)
        draw.text((left - 6 - draw.textlength(label, font=face), y - 7), label, fill=INK, font=face)
    bar_w = plot_w / bins
    base = np.zeros(bins)
    for counts, colour, _ in layers:
        for i, n in enumerate(counts):
            if n:
                x0 = left + i * bar_w + 1
                y1 = top + plot_h - base[i] / peak * plot_h
                y0 = y1 - n / peak * plot_h
                draw.rectangle([x0, y0, x0 + bar_w - 2, y1 - 1], fill=colour)
        base += counts
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        label = f"{value:.4g}"
        x = left + frac * plot_w
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=INK)
        draw.text((x - draw.textlength(label, font=face) / 2, top + plot_h + 6), label, fill=INK, font=face)
    draw.text((left, height - 22), _fit(draw, axis_label, plot_w, face), fill=INK, font=face)
    x = left
    for _, colour, name in layers:
        draw.rectangle([x, 40, x + 12, 52], fill=colour)
        draw.text((x + 18, 39), name, fill=INK, font=face)
        x += 30 + draw.textlength(name, font=face)
    _save(image, path)


def label_bars(labels: Sequence[str], targets: Sequence[int], mined: Sequence[int], path: Path,
               title: str) -> None:
    """Two horizontal bars per label: targets (blue) and mined images (orange), values written."""
    width, left, right, top, row_h = 720, 170, 60, 64, 30
    height = max(200, top + row_h * max(len(labels), 1) + 24)
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((12, 12), _fit(draw, title, width - 24, font(15)), fill=INK, font=font(15))
    face = font(11)
    for x, colour, name in ((left, TARGET_FRAME, "targets"), (left + 90, MINED, "mined")):
        draw.rectangle([x, 40, x + 12, 52], fill=colour)
        draw.text((x + 18, 39), name, fill=INK, font=face)
    peak = max(list(targets) + list(mined) + [1])
    plot_w = width - left - right
    for i, (label, t, m) in enumerate(zip(labels, targets, mined)):
        y = top + i * row_h
        draw.text((12, y + 7), _fit(draw, str(label), left - 20, face), fill=INK, font=face)
        for j, (value, colour) in enumerate(((t, TARGET_FRAME), (m, MINED))):
            y0 = y + 3 + j * 12
            x1 = left + value / peak * plot_w
            if value:
                draw.rectangle([left, y0, x1, y0 + 10], fill=colour)
            draw.text((x1 + 4, y0 - 2), str(value), fill=INK, font=face)
    draw.line([(left, top - 4), (left, top + row_h * max(len(labels), 1))], fill=INK)
    _save(image, path)
