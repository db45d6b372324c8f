"""choose's scoring after embedding (engine/choice.py): 5 encoders × 2000 sampled images, leave-one-out
agreement for k = 1…20, the similarity quantiles and the floor, timed; equality with a plain loop on a prefix.

    .venv/bin/python benchmarks/bench_choose.py                       # 5 × 2000, dims 768/1024/512/768/768
    .venv/bin/python benchmarks/bench_choose.py --rows 500 --check 200

Labels: 20 classes; vectors a class centre plus noise, so agreement lies between 0 and 1 (ties are rare).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deft_mine.engine import choice  # noqa: E402

DIMS = (768, 1024, 512, 768, 768)  # DINOv2 cls/mean, CLIP, SigLIP, thumbnail-sized stand-ins


def encoder_vectors(rows: int, dim: int, labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels.max() + 1, dim))
    return (centres[labels] + noise * rng.normal(size=(rows, dim))).astype(np.float32)


def brute(vectors: np.ndarray, labels: np.ndarray, k_max: int) -> np.ndarray:
    """Per-image agreement for k = 1…k_max by a loop over images (float64 cosine, ties to the lower row)."""
    unit = vectors / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    out = np.empty((len(vectors), k_max))
    for i in range(len(vectors)):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        order = sorted(range(len(vectors)), key=lambda j: (-sims[j], j))[:k_max]
        hits = labels[order] == labels[i]
        out[i] = np.cumsum(hits) / np.arange(1, k_max + 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--k-max", type=int, default=20)
    parser.add_argument("--check", type=int, default=300, help="images checked against the loop (0: none)")
    args = parser.parse_args()
    labels = np.random.default_rng(0).integers(0, 20, args.rows)
    keys = [f"L{v}" for v in labels]
    encoders = [encoder_vectors(args.rows, dim, labels, noise=2.0 + i, seed=i) for i, dim in enumerate(DIMS)]
    t0 = time.perf_counter()
    at5 = []
    for vectors in encoders:
        found = choice.agreement(vectors, keys, args.k_max)
        at5.append(found.macro[4])
        choice.quantiles(found.same_similarities), choice.quantiles(found.cross_similarities)
        choice.suggest_floor(found.same_similarities, found.cross_similarities)
        choice.suggest_topn(found.macro, 0.05)
    seconds = time.perf_counter() - t0
    print(f"scoring {len(encoders)} encoders x {args.rows} images, k_max={args.k_max}: {seconds:.2f} s "
          f"(at k=5: {', '.join(f'{a:.3f}' for a in at5)})")
    if args.check:
        vectors, n = encoders[0][:args.check], args.check
        ids, _ = choice.nearest(vectors, vectors, args.k_max, exclude_self=True)
        got = np.cumsum(labels[:n][ids] == labels[:n, None], axis=1) / np.arange(1, args.k_max + 1)
        assert np.array_equal(got, brute(vectors, labels[:n], args.k_max)), "differs from the loop"
        print(f"per-image agreement of the first {n} images equals the loop")


if __name__ == "__main__":
    main()
