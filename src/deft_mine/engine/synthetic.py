"""A small, offline, AOI-like sample set: board patches with a few defect classes as `label`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "solder_bridge", "missing_component", "contamination")
SIDE = 96


def board_patch(rng: np.random.Generator, defect: str) -> Image.Image:
    """A green solder-mask patch with copper traces and pads, and one defect drawn on it."""
    base = np.array([28, 92, 48]) + rng.integers(-12, 12, 3)
    img = Image.new("RGB", (SIDE, SIDE), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(img)
    copper = tuple(int(c) for c in np.array([176, 128, 64]) + rng.integers(-15, 15, 3))
    for _ in range(rng.integers(2, 5)):  # traces
        y = int(rng.integers(4, SIDE - 4))
        draw.line([(0, y), (SIDE, y + int(rng.integers(-8, 8)))], fill=copper, width=2)
    for x, y in rng.integers(10, SIDE - 22, (3, 2)).tolist():  # pads
        draw.rectangle([x, y, x + 12, y + 8], fill=(200, 200, 190))
    c = SIDE // 2 + int(rng.integers(-6, 6))
    if defect == "scratch":
        offset = int(rng.integers(-10, 10))
        draw.line([(0, offset), (SIDE, SIDE + offset)], fill=(235, 235, 225), width=int(rng.integers(4, 7)))
    elif defect == "solder_bridge":
        draw.rounded_rectangle([12, c - 9, SIDE - 12, c + 9], radius=8, fill=(215, 215, 205))
    elif defect == "missing_component":
        draw.rectangle([c - 24, c - 18, c + 24, c + 18], fill=(14, 22, 14))
        draw.rectangle([c - 20, c - 14, c + 20, c + 14], outline=(200, 200, 190), width=2)
    elif defect == "contamination":
        for _ in range(int(rng.integers(5, 8))):
            x, y = (int(v) for v in rng.integers(8, SIDE // 2, 2))
            r = int(rng.integers(5, 10))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(60, 45, 25))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    noise = rng.normal(0, 6, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_sample_set(folder: Path, *, targets_per_class: int = 3, pool_per_class: int = 60,
                    seed: int = 7) -> tuple[Path, Path]:
    """Write images plus `targets.parquet` and `pool.parquet` (relative filepaths, `label`,
    and carried metadata like `siamese_score`); return the two parquet paths."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"targets": [], "pool": []}
    for split, per_class in (("targets", targets_per_class), ("pool", pool_per_class)):
        for defect in DEFECTS:
            for i in range(per_class):
                rel = f"images/{split}_{defect}_{i:03d}.png"
                board_patch(rng, defect).save(folder / rel)
                row = {"filepath": rel, "label": defect}
                if split == "targets":
                    row["siamese_score"] = round(float(rng.uniform(0.2, 0.6)), 3)
                    row["weakness"] = "low_recall"
                rows[split].append(row)
    order = rng.permutation(len(rows["pool"]))  # the pool is not sorted by class
    rows["pool"] = [rows["pool"][i] for i in order]
    for split, split_rows in rows.items():
        pq.write_table(pa.Table.from_pylist(split_rows), folder / f"{split}.parquet")
    return folder / "targets.parquet", folder / "pool.parquet"
