#!/usr/bin/env python
"""End-to-end embedding images/s (embed_file) against the encoder's forward-only images/s at the same batch size."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from _machine import TINY_TEXT, machine_lines, save_random_two_tower, scratch, torch_line
from deft_mine.engine.embedding import embed_file
from deft_mine.engine.encoders import build_encoder
from deft_mine.engine.images import LoadFailure, load_rgb
from deft_mine.engine.listings import open_listing
from deft_mine.events import NullEvents

GOAL = 0.9
SEED = 20240601
WIDTH, HEIGHT = 640, 480
WARM_UP_ROWS = 4


def save_random_siglip(folder: Path, layers: int) -> None:
    """A SigLIP with a base-size vision tower (random weights) and a tiny text tower, saved offline."""
    save_random_two_tower(folder, "SigLIP", dict(image_size=224, patch_size=16, hidden_size=768,
                                                 intermediate_size=3072, num_hidden_layers=layers,
                                                 num_attention_heads=12), TINY_TEXT, SEED)


def write_images(folder: Path, n: int) -> list[str]:
    """`n` seeded 640x480 JPEGs: smooth random colour fields, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC),
                          dtype=np.float32)
        for _ in range(rng.integers(2, 6)):  # a few pads / traces
            x0, y0 = rng.integers(0, WIDTH - 40), rng.integers(0, HEIGHT - 40)
            w, h = rng.integers(10, 160), rng.integers(10, 120)
            mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            base[mask] = rng.integers(0, 256, 3)
        base += rng.normal(0, 6, base.shape).astype(np.float32)
        name = f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def write_listing(path: Path, names: list[str]) -> None:
    pq.write_table(pa.table({"filepath": pa.array(names, pa.string())}), path)


def forward_only(encoder, image_dir: Path, names: list[str], batch_size: int) -> tuple[float, int]:
    """Seconds for encoder.encode over len(names) images: one preprocessed batch, reused."""
    n = len(names)
    images = [load_rgb(name, image_dir) for name in names[: min(batch_size, n)]]
    assert not any(isinstance(im, LoadFailure) for im in images), images
    batch = encoder.preprocess(images)
    encoder.encode(batch[:WARM_UP_ROWS])  # warm-up: one small batch
    full, rest = divmod(n, len(images))
    tail = batch[:rest] if rest else None
    t0 = time.perf_counter()
    for _ in range(full):
        encoder.encode(batch)
    if tail is not None:
        encoder.encode(tail)
    return time.perf_counter() - t0, len(images)


def end_to_end(encoder, root: Path, image_dir: Path, names: list[str], batch_size: int):
    warm = root / "warm_up.parquet"
    write_listing(warm, names[:WARM_UP_ROWS])
    embed_file(open_listing(warm, "input_parquet", image_dir), root / "warm_up_out.parquet", encoder,
               batch_size=batch_size, events=NullEvents())
    listing = root / "input.parquet"
    write_listing(listing, names)
    t0 = time.perf_counter()
    stats = embed_file(open_listing(listing, "input_parquet", image_dir), root / "output.parquet", encoder,
                       batch_size=batch_size, events=NullEvents())
    wall = time.perf_counter() - t0
    return stats, wall


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=256, help="images to embed (default 256)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="rows per batch, both sides (default 64, the spec default)")
    p.add_argument("--layers", type=int, default=12,
                   help="vision transformer layers of the random SigLIP (default 12 = base size)")
    p.add_argument("--model", choices=("SigLIP", "thumbnail"), default="SigLIP",
                   help="SigLIP (random weights, offline) or the weight-free thumbnail encoder")
    p.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print("# bench_embedding: embed_file end to end vs encoder.encode forward only")
    for line in machine_lines(torch_line()):
        print("#", line)
    with scratch("deft_bench_embedding_", args.keep) as root:
        t0 = time.perf_counter()
        image_dir = root / "images"
        names = write_images(image_dir, args.images)
        mib = sum(f.stat().st_size for f in image_dir.iterdir()) / 2**20
        model_path = None
        if args.model == "SigLIP":
            model_path = root / "siglip"
            save_random_siglip(model_path, args.layers)
        encoder = build_encoder(args.model, str(model_path) if model_path else None, "auto")
        desc = (f"SigLIP vision tower: 224px, patch 16, width 768, {args.layers} layers, random weights"
                if args.model == "SigLIP" else "thumbnail (no weights)")
        processor = getattr(encoder, "processor", None)
        print(f"# model: {desc}; device={encoder.device}; dim={encoder.dim}"
              + (f"; image processor {type(processor).__name__}" if processor is not None else ""))
        print(f"# data: {args.images} JPEGs {WIDTH}x{HEIGHT} ({mib:.1f} MiB) + parquet listing, "
              f"batch_size={args.batch_size}; set-up took {time.perf_counter() - t0:.1f}s; {root}")
        print(flush=True)

        fwd_s, fwd_batch = forward_only(encoder, image_dir, names, args.batch_size)
        stats, wall = end_to_end(encoder, root, image_dir, names, args.batch_size)
        timings = stats.timings
        fwd_ips = args.images / fwd_s
        e2e_ips = stats.rows_out / timings["total"]
        enc_ips = stats.rows_out / timings["encode"] if timings["encode"] else float("nan")

        head = (f"{'model':<10} {'layers':>6} {'device':>6} {'images':>6} {'batch':>5} "
                f"{'forward_img/s':>13} {'end_to_end_img/s':>16} {'ratio':>6}")
        print(head)
        print("-" * len(head))
        layers = args.layers if args.model == "SigLIP" else 0
        print(f"{args.model:<10} {layers:>6} {encoder.device:>6} {args.images:>6} "
              f"{args.batch_size:>5} {fwd_ips:>13.2f} {e2e_ips:>16.2f} {e2e_ips / fwd_ips:>6.3f}")
        print()
        print(f"goal: end_to_end / forward >= {GOAL}")
        print(f"forward only: {fwd_s:.2f}s for {args.images} images (one preprocessed batch of "
              f"{fwd_batch} re-encoded)")
        print(f"end to end: rows_out={stats.rows_out} skipped={sum(stats.skipped_by_reason.values())} "
              f"wall={wall:.2f}s; stage seconds: "
              + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        print(f"  encode inside embed_file: {enc_ips:.2f} img/s "
              f"({enc_ips / fwd_ips:.3f} of forward only); decode+preprocess runs in a loader "
              "thread, overlapped with encode, so the stages do not add up to total")
        decode_ips = stats.rows_out / timings["decode"] if timings["decode"] else float("nan")
        print(f"  decode+preprocess alone would allow {decode_ips:.2f} img/s")
        if args.model == "thumbnail":
            print("  (thumbnail: encode is a few vector ops, so the ratio only shows that end to "
                  "end is bound by decode+preprocess)")


if __name__ == "__main__":
    main()
