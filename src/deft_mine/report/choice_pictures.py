"""choose's picture, drawn with Pillow alone (deterministic PNG): label agreement against k per
encoder, and the pick's same-label vs cross-label neighbour similarities."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deft_mine.engine import tables

WHITE, INK, GRID = (255, 255, 255), (33, 33, 33), (220, 220, 220)
SAME, CROSS, FLOOR = (46, 139, 87), (200, 50, 50), (20, 20, 20)
PALETTE = [(40, 90, 200), (230, 140, 40), (46, 139, 87), (200, 50, 50), (140, 80, 180), (90, 160, 170),
           (120, 120, 120), (180, 150, 40)]
PANEL_W, PANEL_H, MARGIN, LEGEND_LINE = 420, 260, 40, 14
BINS = 40


def _axes(draw: ImageDraw.ImageDraw, left: int, top: int, title: str, x_label: str) -> tuple[int, int, int, int]:
    """A panel's frame and title; returns its plot box (x0, y0, x1, y1)."""
    box = (left + MARGIN, top + 24, left + PANEL_W - 10, top + PANEL_H - 30)
    draw.rectangle(box, outline=INK)
    draw.text((left + MARGIN, top + 6), title, fill=INK)
    draw.text((box[0] + (box[2] - box[0]) // 2 - 3 * len(x_label), box[3] + 14), x_label, fill=INK)
    return box


def _curves(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], curves: Sequence[tuple[str, Sequence[float]]],
            topn: int) -> None:
    x0, y0, x1, y1 = box
    k_max = max(len(values) for _, values in curves)
    x_of = (lambda k: x0 + (x1 - x0) * (k - 1) / max(k_max - 1, 1))
    y_of = (lambda v: y1 - (y1 - y0) * v)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(x0, y_of(tick)), (x1, y_of(tick))], fill=GRID)
        draw.text((x0 - 30, y_of(tick) - 6), f"{tick:.2f}", fill=INK)
    draw.line([(x_of(topn), y0), (x_of(topn), y1)], fill=FLOOR)
    draw.text((x_of(topn) + 2, y0 + 2), f"topn={topn}", fill=INK)
    for k in sorted({1, k_max, topn}):
        draw.text((x_of(k) - 3, y1 + 2), str(k), fill=INK)
    for index, (name, values) in enumerate(curves):
        colour = PALETTE[index % len(PALETTE)]
        points = [(x_of(k + 1), y_of(v)) for k, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((x1 - 150, y1 - 14 - LEGEND_LINE * (len(curves) - 1 - index)), name, fill=colour)


def _histograms(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], same: np.ndarray, cross: np.ndarray,
                floor: float | None) -> None:
    x0, y0, x1, y1 = box
    both = np.concatenate([same, cross])
    low, high = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, BINS + 1)
    counts = [np.histogram(values, edges)[0] for values in (same, cross)]
    peak = max(1, *(int(c.max()) for c in counts if len(c)))
    width = (x1 - x0) / BINS
    for colour, count, shift in ((SAME, counts[0], 0.0), (CROSS, counts[1], 0.5)):
        for b, n in enumerate(count):
            if n:
                left = x0 + width * (b + shift)
                draw.rectangle([left, y1 - (y1 - y0) * n / peak, left + width / 2, y1], fill=colour)
    for value, anchor in ((low, x0), (high, x1 - 30)):
        draw.text((anchor, y1 + 2), f"{value:.2f}", fill=INK)
    if floor is not None and low <= floor <= high:
        x = x0 + (x1 - x0) * (floor - low) / (high - low)
        draw.line([(x, y0), (x, y1)], fill=FLOOR, width=2)
        draw.text((x + 2, y0 + 2), f"floor {floor:.4f}", fill=INK)
    draw.text((x0 + 4, y0 + 2), "same label", fill=SAME)
    draw.text((x0 + 4, y0 + 2 + LEGEND_LINE), "cross label", fill=CROSS)


def draw_choice(path: Path, curves: Sequence[tuple[str, Sequence[float]]], topn: int, pick: str,
                same: np.ndarray, cross: np.ndarray, floor: float | None) -> Path:
    """The two panels side by side, written atomically to `path`."""
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H), WHITE)
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default()
    if curves:
        _curves(draw, _axes(draw, 0, 0, "label agreement against k", "k (neighbours)"), curves, topn)
    _histograms(draw, _axes(draw, PANEL_W, 0, f"{pick}: neighbour similarity", "cosine similarity"),
                same, cross, floor)
    with tables.atomic_output(path) as temp:
        image.save(temp, format="PNG")
    return path
