#!/usr/bin/env python
"""Unique matching (`tmm unique_neighbor_matching`, global) against nearest_neighbors mining on the
same parquets: wall time and peak RSS, each in a fresh interpreter, and results against brute force."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from _machine import add_worker_flags, in_fresh_interpreter, machine_lines, peak_rss_mib, scratch, write_vector_parquet
from deft_mine.engine.knn import l2_normalise
from deft_mine.schemas.specs import AllocationPolicy, Metric, MiningSpec, UniqueMatchingSpec

GOAL_TIME, GOAL_MIB = 1.5, 1.5 * 1024
POOL_SEED, TARGET_SEED = 20240601, 20240602
METRIC = Metric.euclidean  # unique matching's default; mining runs with the same metric
FACTOR = 5  # candidate_expansion_factor, the spec default


# --------------------------------------------------------------------------- workers (one per process)

def unique_spec(pool: Path, targets: Path, out: Path, desired: int, block_rows: int) -> UniqueMatchingSpec:
    return UniqueMatchingSpec(source_path=str(pool), target_path=str(targets), output_dir=str(out),
                              desired_unique_count=desired, allocation_policy=AllocationPolicy.global_,
                              distance_metric=METRIC, candidate_expansion_factor=FACTOR, block_rows=block_rows)


def worker(args: argparse.Namespace) -> None:
    from deft_mine.engine.mining import mine_files
    from deft_mine.engine.unique_matching import unique_match
    from deft_mine.engine.unique_outputs import write_outputs
    from deft_mine.events import NullEvents

    root = Path(args.w_dir)
    result: dict = {"mode": args.w_mode, "rss_before_MiB": peak_rss_mib()}
    t0 = time.perf_counter()
    if args.w_mode == "mine":
        spec = MiningSpec(topn=5, knn_metric=METRIC, block_rows=args.block_rows)
        outcome = mine_files(root / "pool.parquet", root / "targets.parquet", spec, NullEvents())
        result["mined"] = outcome.mined.num_rows
    elif args.w_mode == "unique":
        spec = unique_spec(root / "pool.parquet", root / "targets.parquet", root / "out", args.desired,
                           args.block_rows)
        outcome = unique_match(spec)
        write_outputs(spec, outcome)
        first = outcome.passes[0]
        result.update(selected=outcome.selected.num_rows,
                      passes=[[p.number, p.candidates, p.targets, p.retry, p.added] for p in outcome.passes],
                      first_pass={"share": first.topn, "candidates": first.candidates,
                                  "target_rows": first.target_rows, "pool_rows": first.pool_rows,
                                  "distances": first.distances})
    result.update(seconds=time.perf_counter() - t0, peak_MiB=peak_rss_mib())
    (root / f"result_{args.w_mode}.json").write_text(json.dumps(result))


def run_worker(args: argparse.Namespace, root: Path, mode: str) -> dict:
    return in_fresh_interpreter(__file__, mode, root, ["--desired", str(args.desired), "--block-rows", str(args.block_rows)])


# --------------------------------------------------------------------------- brute-force references

def read_unit(path: Path, rows: int | None = None) -> np.ndarray:
    """A side's vectors L2-normalised as the matcher normalises them (float32), then widened."""
    column = pq.read_table(path, columns=["embedding"]).column("embedding")
    if rows is not None:
        column = column.slice(0, rows)
    flat = column.combine_chunks().values.to_numpy()
    return l2_normalise(flat.reshape(len(column), -1)).astype(np.float64)


def exact_distances(queries: np.ndarray, pool_file: Path, batch_rows: int = 65536) -> np.ndarray:
    """(queries, pool) euclidean distances in float64, the pool streamed (float64 GEMM, no index)."""
    out, q2 = [], np.einsum("ij,ij->i", queries, queries)
    for batch in pq.ParquetFile(pool_file).iter_batches(batch_rows, columns=["embedding"]):
        flat = batch.column(0).values.to_numpy()
        x = l2_normalise(flat.reshape(batch.num_rows, -1)).astype(np.float64)
        out.append(np.sqrt(np.maximum(q2[:, None] + np.einsum("ij,ij->i", x, x)[None, :] - 2 * queries @ x.T, 0)))
    return np.concatenate(out, axis=1)


def claim(order: list[np.ndarray], free: np.ndarray, k: int, share: int) -> tuple[list, list]:
    """The contract's one pass (file = row here: every pool path is distinct): targets in order,
    each takes its share of its k nearest free rows no earlier target took, or none."""
    taken, picks, failed = set(), [], []
    for t, ranked in enumerate(order):
        mine = [r for r in ranked[free[ranked]][:k].tolist() if r not in taken][:share]
        if len(mine) < share:
            failed.append(t)
            continue
        taken.update(mine)
        picks.append((t, mine))
    return picks, failed


def reference_match(dist: np.ndarray, budget: int) -> dict[int, tuple[int, float, int]]:
    """Every pass, brute force over the full distance matrix: pool row -> (target, distance, pass)."""
    order = [np.argsort(d, kind="stable") for d in dist]  # stable: equal distances to the lower row
    held = np.zeros(dist.shape[1], dtype=bool)
    got: dict[int, tuple[int, float, int]] = {}
    topn, current, number = math.ceil(budget / len(dist)), list(range(len(dist))), 0
    while len(got) < budget and not held.all():
        free = ~held
        share, number = min(topn, int(free.sum())), number + 1
        k = min(FACTOR * number * share, int(free.sum()))
        picks, failed = claim([order[t] for t in current], free, k, share)
        pairs = sorted((dist[current[q], r], r, current[q]) for q, rows in picks for r in rows)
        for d, r, t in pairs[:budget - len(got)]:  # nearest, then filepath (= row order here)
            got[r] = (t, float(d), number)
            held[r] = True
        current = [current[q] for q in failed] or list(range(len(dist)))
    return got


def check_subsample(root: Path, args: argparse.Namespace) -> list[str]:
    """unique_match on the first --check-targets x --check-pool rows (in process) against
    reference_match, at the run's share and at one that takes 90% of the pool (the pool runs dry: many passes)."""
    from deft_mine.engine.unique_matching import unique_match

    pool, targets = root / "check_pool.parquet", root / "check_targets.parquet"
    pq.write_table(pq.read_table(root / "pool.parquet").slice(0, args.check_pool), pool)
    pq.write_table(pq.read_table(root / "targets.parquet").slice(0, args.check_targets), targets)
    dist = exact_distances(read_unit(targets), pool)
    lines = []
    for budget in (math.ceil(args.desired / args.targets) * args.check_targets, args.check_pool * 9 // 10):
        outcome = unique_match(unique_spec(pool, targets, root / "check_out", budget, args.block_rows))
        rows = {int(p.rsplit("/", 1)[1].split(".")[0]): p for p in outcome.selected.column("filepath").to_pylist()}
        table = outcome.selected.to_pydict()
        ours = {row: (int(t.rsplit("/", 1)[1].split(".")[0]), d, n)
                for row, t, d, n in zip(rows, table["matched_target"], table["distance"], table["pass"])}
        ref = reference_match(dist, budget)
        same = ours.keys() == ref.keys() and all(ours[r][0] == ref[r][0] and ours[r][2] == ref[r][2]
                                                 and abs(ours[r][1] - ref[r][1]) < 1e-9 for r in ref)
        lines.append(f"subsample {args.check_targets} targets x {args.check_pool} pool, desired {budget}: "
                     f"{len(outcome.passes)} passes, {len(ours)} selected; identical to brute force "
                     f"(files, targets, passes, distances to 1e-9): {same}")
    return lines


def check_first_pass(root: Path, args: argparse.Namespace, first: dict) -> str:
    """The full run's first pass for its first --check-first targets: a target's claims depend
    only on the targets before it, so their picks follow from their brute-force top-k alone."""
    m = min(args.check_first, args.targets)
    dist = exact_distances(read_unit(root / "targets.parquet", m), root / "pool.parquet")
    order = [np.argsort(d, kind="stable") for d in dist]
    picks, _ = claim(order, np.ones(dist.shape[1], dtype=bool), first["candidates"], first["share"])
    ref = {t: rows for t, rows in picks}
    ours = {t: rows for t, rows in zip(first["target_rows"], first["pool_rows"]) if t < m}
    gaps = np.diff(np.sort(dist, axis=1)[:, :first["candidates"] + 1], axis=1).min()
    far = max((abs(d - dist[t, r]) for t, rows, ds in zip(first["target_rows"], first["pool_rows"],
                                                          first["distances"]) if t < m
               for r, d in zip(rows, ds)), default=0.0)
    return (f"full run, first pass, first {m} targets (their top {first['candidates']} over all "
            f"{dist.shape[1]} pool rows by float64 GEMM): picks identical: {ours == ref}; max |distance diff| "
            f"{far:.1e}; smallest gap between neighbours {gaps:.1e} (no near-tie if >> 1e-12)")


# --------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--targets", type=int, default=1000, help="target rows (default 1000)")
    p.add_argument("--pool", type=int, default=1_000_000, help="pool rows (default 1000000)")
    p.add_argument("--dim", type=int, default=768, help="vector length (default 768)")
    p.add_argument("--desired", type=int, default=5000, help="desired_unique_count (default 5000)")
    p.add_argument("--block-rows", type=int, default=32768, help="pool rows per block, both sides (default 32768)")
    p.add_argument("--check-targets", type=int, default=200, help="subsample check: targets (default 200)")
    p.add_argument("--check-pool", type=int, default=20000, help="subsample check: pool rows (default 20000)")
    p.add_argument("--check-first", type=int, default=50,
                   help="first-pass check of the full run: how many first targets (default 50)")
    add_worker_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.w_mode:
        worker(args)
        return
    from deft_mine.engine.embedding import rows_per_group

    print("# bench_unique: unique_match (global) vs mine_files nearest_neighbors topn 5, same parquets")
    for line in machine_lines():
        print("#", line)
    print(f"# targets={args.targets} x pool={args.pool} x dim={args.dim} float32 random normal (seeds {POOL_SEED}, "
          f"{TARGET_SEED}); metric {METRIC.value} for both (unique matching's default; it L2-normalises); "
          f"desired_unique_count={args.desired}, candidate_expansion_factor={FACTOR}, block_rows={args.block_rows}")
    with scratch("deft_bench_unique_", args.keep) as root:
        t0 = time.perf_counter()
        rows = rows_per_group(args.dim)
        write_vector_parquet(root / "targets.parquet", args.targets, args.dim, TARGET_SEED, "target", rows)
        write_vector_parquet(root / "pool.parquet", args.pool, args.dim, POOL_SEED, "pool", rows)
        size = (root / "pool.parquet").stat().st_size / 2**20
        print(f"# wrote data in {time.perf_counter() - t0:.1f}s (pool.parquet {size:.0f} MiB, row groups of {rows})")
        print("# each side runs in its own fresh interpreter; the files are in the page cache (just written)",
              flush=True)
        mine = run_worker(args, root, "mine")
        unique = run_worker(args, root, "unique")
        print(f"mine_files topn 5:  {mine['seconds']:8.2f} s  peak {mine['peak_MiB']:6.0f} MiB  "
              f"(mined {mine['mined']})")
        print(f"unique_match:       {unique['seconds']:8.2f} s  peak {unique['peak_MiB']:6.0f} MiB  "
              f"(selected {unique['selected']}; passes [number, candidates, targets, retry, added]: "
              f"{unique['passes']})")
        ratio = unique["seconds"] / mine["seconds"]
        print(f"time unique / mine = {ratio:.2f} (goal <= {GOAL_TIME}); unique peak {unique['peak_MiB']:.0f} MiB "
              f"(goal <= {GOAL_MIB:.0f}); idle interpreter floor {unique['rss_before_MiB']:.0f} MiB", flush=True)
        checks = [check_first_pass(root, args, unique["first_pass"]), *check_subsample(root, args)]
        for line in checks:
            print(line)
        ok = ratio <= GOAL_TIME and unique["peak_MiB"] <= GOAL_MIB and all(": True" in c for c in checks)
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
