#!/usr/bin/env python
"""The leakage guard's cost: its vector check (10k protected images against the pool) beside the mining
of 1,000 targets at topn 10 on the same pool, each in a fresh interpreter (time, peak RSS), exact
against float64 brute force on a subsample; and the always-on byte-copy check on a pool of tiny files."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _machine import add_worker_flags, in_fresh_interpreter, machine_lines, peak_rss_mib, scratch, write_vector_parquet
from deft_mine.schemas.specs import Metric, MiningSpec

GOAL_RATIO, GOAL_MIB = 1.3, 1.5 * 1024
POOL_SEED, TARGET_SEED, PROTECTED_SEED = 20240701, 20240702, 20240703
METRIC, THRESHOLD = Metric.cosine, 0.95
PLANTED = 500  # protected images that are near-copies of pool rows (so the guard has leaks to find)


# --------------------------------------------------------------------------- workers (one per process)

def protected_of(root: Path):
    from deft_mine.engine import leaks

    vectors = np.load(root / "protected.npy")
    names = [f"protected/{i:06d}.jpg" for i in range(len(vectors))]
    return leaks.Protected(names, [root / "absent" / n for n in names], ["val.parquet"] * len(names), vectors)


def worker(args: argparse.Namespace) -> None:
    from deft_mine.engine import leaks
    from deft_mine.engine.mining import mine_files, pool_vectors
    from deft_mine.events import NullEvents

    root = Path(args.w_dir)
    result: dict = {"mode": args.w_mode, "rss_before_MiB": peak_rss_mib()}
    t0 = time.perf_counter()
    if args.w_mode == "mine":
        spec = MiningSpec(topn=10, knn_metric=METRIC, block_rows=args.block_rows)
        result["mined"] = mine_files(root / "pool.parquet", root / "targets.parquet", spec, NullEvents()).mined.num_rows
    elif args.w_mode == "guard":  # as tools/run_leaks.guard calls it: the pool's paths, then its vectors by block
        protected = protected_of(root)
        paths = [str(p) for p in pq.read_table(root / "pool.parquet", columns=["filepath"]).column(0).to_pylist()]
        pool = leaks.pool_of(paths, root / "absent", [])
        found = leaks.find_leaks(pool, protected, METRIC, THRESHOLD,
                                 pool_vectors(root / "pool.parquet", "embedding", args.block_rows))
        np.save(root / "guard_nearest.npy", found.nearest)
        result["leaks"] = found.table.num_rows
    elif args.w_mode == "bytes":  # a default run's check: every pool and target file stat'ed, equal sizes hashed
        pool = leaks.pool_of([f"pool/{i:06d}.png" for i in range(args.files)], root / "tiny", [])
        targets = [f"targets/{i:04d}.png" for i in range(args.targets)]
        protected = leaks.Protected(targets, [root / "tiny" / t for t in targets], [leaks.TARGETS] * len(targets))
        result["leaks"] = leaks.find_leaks(pool, protected, METRIC, None).table.num_rows
    result.update(seconds=time.perf_counter() - t0, peak_MiB=peak_rss_mib())
    (root / f"result_{args.w_mode}.json").write_text(json.dumps(result))


def run_worker(args: argparse.Namespace, root: Path, mode: str) -> dict:
    return in_fresh_interpreter(__file__, mode, root, ["--block-rows", str(args.block_rows), "--files", str(args.files),
                                 "--targets", str(args.targets)])


# --------------------------------------------------------------------------- data and the reference

def write_protected(root: Path, args: argparse.Namespace) -> None:
    """--protected unit vectors: the first PLANTED are pool rows (spread over the pool) with a little
    noise, cosine about 0.99 to them; the rest random."""
    rng = np.random.default_rng(PROTECTED_SEED)
    vectors = rng.standard_normal((args.protected, args.dim), dtype=np.float32)
    rows = np.linspace(0, args.pool - 1, PLANTED).astype(np.int64)
    table = pq.read_table(root / "pool.parquet", columns=["embedding"]).column(0).combine_chunks().take(pa.array(rows))
    planted = table.values.to_numpy().reshape(len(rows), args.dim)
    vectors[:PLANTED] = planted + 0.1 * rng.standard_normal(planted.shape, dtype=np.float32)
    np.save(root / "protected.npy", vectors)


def unit64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_subsample(root: Path, rows: int) -> str:
    """The guard's nearest protected score of the first `rows` pool rows against float64 brute force,
    and the leak decision at the threshold."""
    column = pq.read_table(root / "pool.parquet", columns=["embedding"]).column(0).slice(0, rows).combine_chunks()
    pool = unit64(column.values.to_numpy().reshape(len(column), -1))
    exact = (pool @ unit64(np.load(root / "protected.npy")).T).max(axis=1)
    ours = np.load(root / "guard_nearest.npy")[:rows]
    same = bool(np.array_equal(ours >= THRESHOLD, exact >= THRESHOLD))
    return (f"subsample: first {rows} pool rows x all protected (float64 GEMM): max |nearest score diff| "
            f"{np.abs(ours - exact).max():.1e}; leaks {int((exact >= THRESHOLD).sum())}; same leak decision: {same}")


def write_tiny_files(root: Path, args: argparse.Namespace) -> None:
    """--files pool files and --targets target files of 60..2047 random bytes: sizes collide often,
    so many pool files are hashed (the check's worst case for its size); one pool file is a target's copy."""
    rng = np.random.default_rng(7)
    for folder, count in (("pool", args.files), ("targets", args.targets)):
        (root / "tiny" / folder).mkdir(parents=True)
        width = 6 if folder == "pool" else 4
        for i, size in enumerate(rng.integers(60, 2048, count)):
            (root / "tiny" / folder / f"{i:0{width}d}.png").write_bytes(rng.bytes(int(size)))
    (root / "tiny" / "pool" / f"{0:06d}.png").write_bytes((root / "tiny" / "targets" / "0000.png").read_bytes())


# --------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--targets", type=int, default=1000, help="target rows (default 1000)")
    p.add_argument("--pool", type=int, default=1_000_000, help="pool rows (default 1000000)")
    p.add_argument("--protected", type=int, default=10_000, help="protected vectors (default 10000)")
    p.add_argument("--dim", type=int, default=768, help="vector length (default 768)")
    p.add_argument("--block-rows", type=int, default=32768, help="pool rows per block (default 32768)")
    p.add_argument("--check-rows", type=int, default=20000, help="subsample check: pool rows (default 20000)")
    p.add_argument("--files", type=int, default=100_000, help="byte check: tiny pool files (default 100000)")
    add_worker_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.w_mode:
        worker(args)
        return
    from deft_mine.engine.embedding import rows_per_group

    print("# bench_leaks: leak guard (find_leaks, leak_similarity) vs mine_files topn 10, same pool parquet")
    for line in machine_lines():
        print("#", line)
    print(f"# targets={args.targets}, protected={args.protected} ({PLANTED} planted near-copies), pool={args.pool}, "
          f"dim={args.dim} float32 random normal; {METRIC.value}, leak_similarity={THRESHOLD}, "
          f"block_rows={args.block_rows}")
    with scratch("deft_bench_leaks_", args.keep) as root:
        t0 = time.perf_counter()
        rows = rows_per_group(args.dim)
        write_vector_parquet(root / "targets.parquet", args.targets, args.dim, TARGET_SEED, "target", rows)
        write_vector_parquet(root / "pool.parquet", args.pool, args.dim, POOL_SEED, "pool", rows)
        write_protected(root, args)
        print(f"# wrote data in {time.perf_counter() - t0:.1f}s; each step in its own fresh interpreter", flush=True)
        mine, guard = run_worker(args, root, "mine"), run_worker(args, root, "guard")
        ratio = (guard["seconds"] + mine["seconds"]) / mine["seconds"]
        print(f"mine_files topn 10:  {mine['seconds']:8.2f} s  peak {mine['peak_MiB']:6.0f} MiB  (mined {mine['mined']})")
        print(f"guard (vectors):     {guard['seconds']:8.2f} s  peak {guard['peak_MiB']:6.0f} MiB  "
              f"(leaks {guard['leaks']})")
        print(f"(guard + mining) / mining = {ratio:.2f} (goal <= {GOAL_RATIO}); guard peak {guard['peak_MiB']:.0f} MiB "
              f"(goal <= {GOAL_MIB:.0f}); idle interpreter floor {guard['rss_before_MiB']:.0f} MiB", flush=True)
        check = check_subsample(root, min(args.check_rows, args.pool))
        print(check)
        t0 = time.perf_counter()
        write_tiny_files(root, args)
        print(f"# wrote {args.files} + {args.targets} tiny files in {time.perf_counter() - t0:.1f}s", flush=True)
        tiny = run_worker(args, root, "bytes")
        print(f"byte-copy check (default run): {tiny['seconds']:.2f} s for {args.files} pool + {args.targets} target "
              f"files ({1e6 * tiny['seconds'] / (args.files + args.targets):.0f} us a file; leaks {tiny['leaks']}); "
              f"peak {tiny['peak_MiB']:.0f} MiB")
        ok = ratio <= GOAL_RATIO and guard["peak_MiB"] <= GOAL_MIB and check.endswith("True") and tiny["leaks"] == 1
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
