#!/usr/bin/env python
"""A ChangeNet pool resolved into a listing (every row × light, image and golden) against the bare
cost of one stat per candidate path, measured in the same run on the same files."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _machine import machine_lines, scratch
from deft_mine.engine import changenet as cn
from deft_mine.engine.listings import open_listing
from deft_mine.schemas.inputs import ChangeNetOptions

LIGHTS = ("SolderLight", "UniformLight", "LowAngleLight")


def build(work: Path, rows: int, per_board: int, golden_boards: int) -> Path:
    """The loop's layout: <work>/images/BOARD/PerComponent/C_<light>.jpg (empty files), goldens under
    images/golden/images/<board type>/, and augmentation/mining_pool/mining_pool.csv naming them."""
    images = work / "images"
    lines = ["input_path,golden_path,label,object_name,boardname"]
    for board in range((rows + per_board - 1) // per_board):
        folder = images / f"B{board:05d}" / "PerComponent"
        folder.mkdir(parents=True)
        kind = board % golden_boards
        for c in range(min(per_board, rows - board * per_board)):
            for light in LIGHTS:
                (folder / f"C{c}_{light}.jpg").touch()
            lines.append(f"images/B{board:05d}/PerComponent,golden/images/T{kind}/,{'PASS' if c % 7 else 'missing'},"
                         f"C{c},B{board:05d}")
    for kind in range(golden_boards):
        golden = images / "golden" / "images" / f"T{kind}"
        golden.mkdir(parents=True)
        for c in range(per_board):
            for light in LIGHTS:
                (golden / f"C{c}_{light}.jpg").touch()
    csv = work / "augmentation" / "mining_pool" / "mining_pool.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join(lines) + "\n")
    return csv


def bare_stats(csv: Path, layout: cn.Layout) -> tuple[float, int]:
    """The reference: os.path.isfile on every candidate of every row × light, image and golden, in
    the resolver's order (strings built beforehand, so only the stats are timed)."""
    table = cn.read_csv(csv)
    paths = []
    for value, golden, obj in zip(*(table.column(c).to_pylist() for c in ("input_path", "golden_path", "object_name"))):
        for light in layout.lights:
            paths += [str(p) for p in cn.candidates(value, obj, light, layout)]
            paths += [str(p) for p in cn.candidates(golden, obj, light, layout)]
    t0 = time.perf_counter()
    found = sum(map(os.path.isfile, paths))
    return time.perf_counter() - t0, len(paths) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--per-board", type=int, default=100, help="components per board folder")
    parser.add_argument("--golden-boards", type=int, default=20, help="board types with a golden folder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    print(f"# bench_changenet: a ChangeNet pool of {args.rows} rows × {len(LIGHTS)} lights resolved (goal: ≤ 30 s)")
    for line in machine_lines():
        print(f"# {line}")
    with scratch("bench_changenet_", args.keep) as work:
        t0 = time.perf_counter()
        csv = build(work, args.rows, args.per_board, args.golden_boards)
        print(f"# built {args.rows * len(LIGHTS)} images + goldens in {time.perf_counter() - t0:.1f}s")
        options = ChangeNetOptions(images_dir=str(work / "images"), lights=list(LIGHTS))
        layout = cn.layout_of(options, csv, work / "images")
        ours, listing = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            listing = open_listing(csv, "source", None, options)
            ours.append(time.perf_counter() - t0)
        reference, candidates = bare_stats(csv, layout)
        assert listing is not None and listing.rows == args.rows * len(LIGHTS) and not listing.unresolved
        best = min(ours)
        print(f"ours (open_listing: read CSV, resolve image + golden, build the table): best {best:.2f}s "
              f"of {args.repeat} ({', '.join(f'{t:.2f}' for t in ours)}); {listing.rows / best:,.0f} row-lights/s")
        print(f"reference (bare os.path.isfile on all {candidates:,} candidates, strings prebuilt): {reference:.2f}s")
        print(f"ratio ours / reference: {best / reference:.2f}; goal met (≤ 30 s): {best <= 30}")


if __name__ == "__main__":
    main()
