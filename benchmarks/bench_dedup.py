"""Near-duplicate collapse (engine/dedup.py) of a mined set: time, and equality with a brute-force walk on a prefix.

    .venv/bin/python benchmarks/bench_dedup.py                   # 50k x 768 at 0.95, 30 % near copies
    .venv/bin/python benchmarks/bench_dedup.py --copies 0        # worst case: nothing collapses
    .venv/bin/python benchmarks/bench_dedup.py --rows 5000 --check 1000

The walk's verdict on image i depends only on images before it, so the collapse of the whole set,
cut to its first --check rows, must equal a brute-force walk over just those rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deft_mine.engine.dedup import collapse  # noqa: E402
from deft_mine.engine.knn import l2_normalise  # noqa: E402
from deft_mine.schemas.specs import Metric  # noqa: E402


def mined_set(rows: int, dim: int, copies: float, seed: int) -> np.ndarray:
    """Random distinct images, and a share `copies` of near copies of earlier ones (cosine ~0.97-0.99
    to their original at 768-d), in a shuffled order."""
    rng = np.random.default_rng(seed)
    distinct = max(1, int(rows * (1 - copies)))
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    original = rng.integers(0, distinct, rows - distinct)
    noise = rng.uniform(0.1, 0.25, (rows - distinct, 1)).astype(np.float32)
    x[distinct:] = x[original] + noise * rng.standard_normal((rows - distinct, dim), dtype=np.float32)
    return x[rng.permutation(rows)]


def brute(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """duplicate_of by the rule as written, cosine, one image at a time against every kept one, float64."""
    x = l2_normalise(vectors).astype(np.float64)
    kept: list[int] = []
    out = np.full(len(x), -1, np.int64)
    for i in range(len(x)):
        if kept:
            sims = (x[kept] * x[i]).sum(axis=1)
            best = int(np.argmax(sims))  # the first of the highest: the earliest kept on a tie
            if sims[best] >= threshold:
                out[i] = kept[best]
                continue
        kept.append(i)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--copies", type=float, default=0.3, help="share of near copies (0: worst case)")
    parser.add_argument("--check", type=int, default=3000, help="prefix checked against the brute-force walk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    vectors = mined_set(args.rows, args.dim, args.copies, args.seed)
    t0 = time.perf_counter()
    found = collapse(vectors, Metric.cosine, args.threshold)
    seconds = time.perf_counter() - t0
    print(f"collapse {args.rows} x {args.dim} at {args.threshold}: {seconds:.2f} s, "
          f"{found.removed} removed ({args.copies:.0%} near copies made)")
    check = min(args.check, args.rows)
    t0 = time.perf_counter()
    reference = brute(vectors[:check], args.threshold)
    same = np.array_equal(collapse(vectors[:check], Metric.cosine, args.threshold).duplicate_of, reference) and \
        np.array_equal(found.duplicate_of[:check], reference)
    print(f"brute-force walk of the first {check}: {time.perf_counter() - t0:.2f} s, "
          f"{int((reference >= 0).sum())} removed, equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
