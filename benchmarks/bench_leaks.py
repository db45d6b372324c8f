#!/usr/bin/env python
"""The leakage guard's cost: mining 1,000 targets at topn 10 with the guard in the search (leak_scope=mined,
10k protected images: the targets and a protect listing's) beside the same mining without it, each in a fresh
interpreter (time, peak RSS); the guarded answer against a float64 brute-force reference on a subsample of
targets; optionally the whole-pool scan (leak_scope=pool); and the byte-copy check over a whole pool of tiny
files (leak_scope=pool, docker, mode=unique)."""

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
from deft_mine.engine.leak_search import slack  # the search's room for leaks beyond topn
from deft_mine.schemas.specs import Metric, MiningSpec

GOAL_RATIO, GOAL_MIB = 1.3, 1.5 * 1024
POOL_SEED, TARGET_SEED, PROTECTED_SEED = 20240701, 20240702, 20240703
METRIC, THRESHOLD, TOPN = Metric.cosine, 0.95, 10
PLANTED = 500  # listed protected images that are near-copies of pool rows spread over the pool (rarely mined)
NOISE = 0.1  # a near-copy: a vector plus this much noise per element (cosine about 0.995 at 768 dims)
DEPTH = 200  # the reference ranks each checked target's topn + DEPTH nearest pool rows
# What each checked target (cycling) has planted: listed near-copies of its pool rows at these float64
# ranks (0: its nearest); the flood: --flood leaks among its first --flood + 3 rows (the default 16 fits
# the search's room for leaks at topn 10; more runs it out of clean candidates, so it is searched
# again). COPY: the target itself is a near-copy of a pool row, which is then a leak of the target's own
# (the targets are protected too).
COPY = "copy"


def patterns(flood: int) -> tuple:
    return ((), (0,), (0, 2, 5), tuple(range(10)), tuple(range(flood - 1)) + (flood + 2,), COPY)


PATTERNS: tuple = patterns(16)


# --------------------------------------------------------------------------- workers (one per process)

def save_pairs(pairs: pa.Table, path: Path) -> None:
    pq.write_table(pairs.select(["target_row", "rank", "source_row", "score"]), path)


def worker(args: argparse.Namespace) -> None:
    from deft_mine.engine import leaks
    from deft_mine.engine.leak_search import read_protected
    from deft_mine.engine.mining import mine_files, pool_vectors
    from deft_mine.events import NullEvents

    root = Path(args.w_dir)
    result: dict = {"mode": args.w_mode, "rss_before_MiB": peak_rss_mib()}
    t0 = time.perf_counter()
    if args.w_mode in ("mine", "guarded"):
        guard = dict(protected_parquet=str(root / "protected.parquet"), leak_similarity=THRESHOLD) \
            if args.w_mode == "guarded" else {}
        spec = MiningSpec(topn=TOPN, knn_metric=METRIC, block_rows=args.block_rows, **guard)
        outcome = mine_files(root / "pool.parquet", root / "targets.parquet", spec, NullEvents())
        result["seconds"] = time.perf_counter() - t0
        result.update(mined=outcome.mined.num_rows, timings=outcome.timings)
        if outcome.leaks is not None:
            result.update(leaks=outcome.leaks.table.num_rows, judged=outcome.leaks.judged)
        save_pairs(outcome.pairs, root / f"pairs_{args.w_mode}.parquet")
        pq.write_table(outcome.mined.select(["filepath"]), root / f"mined_{args.w_mode}.parquet")
    elif args.w_mode == "guard":  # leak_scope=pool, as tools/run_leaks.guard calls it: every pool row, by block
        protected = read_protected(root / "protected.parquet", True)
        paths = [str(p) for p in pq.read_table(root / "pool.parquet", columns=["filepath"]).column(0).to_pylist()]
        pool = leaks.pool_of(paths, root / "absent", protected.filepaths[:int(protected.is_target.sum())])
        found = leaks.find_leaks(pool, protected, METRIC, THRESHOLD,
                                 pool_vectors(root / "pool.parquet", "embedding", args.block_rows))
        np.save(root / "guard_nearest.npy", found.nearest)
        result["leaks"] = found.table.num_rows
    elif args.w_mode == "bytes":  # leak_scope=pool's byte check: every pool and target file stat'ed, equal sizes hashed
        pool = leaks.pool_of([f"pool/{i:06d}.png" for i in range(args.files)], root / "tiny", [])
        targets = [f"targets/{i:04d}.png" for i in range(args.targets)]
        protected = leaks.Protected(targets, [root / "tiny" / t for t in targets], [leaks.TARGETS] * len(targets))
        result["leaks"] = leaks.find_leaks(pool, protected, METRIC, None).table.num_rows
    result.setdefault("seconds", time.perf_counter() - t0)
    result["peak_MiB"] = peak_rss_mib()
    (root / f"result_{args.w_mode}.json").write_text(json.dumps(result))


def run_worker(args: argparse.Namespace, root: Path, mode: str) -> dict:
    return in_fresh_interpreter(__file__, mode, root, ["--block-rows", str(args.block_rows), "--files", str(args.files),
                                 "--targets", str(args.targets)])


# --------------------------------------------------------------------------- data

def unit64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def take_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The float32 vectors of these pool rows (in the order given), reading only the row groups that hold them."""
    file = pq.ParquetFile(path)
    starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
    out = np.zeros((len(rows), 0), np.float32)
    for group in np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist():
        at = np.flatnonzero((rows >= starts[group]) & (rows < starts[group + 1]))
        column = file.read_row_group(group, columns=["embedding"]).column(0).combine_chunks()
        block = column.values.to_numpy().reshape(len(column), -1)
        if not out.shape[1]:
            out = np.zeros((len(rows), block.shape[1]), np.float32)
        out[at] = block[rows[at] - starts[group]]
    return out


def write_vectors(path: Path, names: list[str], vectors: np.ndarray) -> None:
    from deft_mine.engine import tables

    pq.write_table(pa.table({"filepath": pa.array(names, pa.string()), "embedding": tables.vector_array(vectors)}),
                   path)


def checked_targets(args: argparse.Namespace) -> np.ndarray:
    return np.linspace(0, args.targets - 1, min(args.check_targets, args.targets)).astype(np.int64)


def plant_copies(root: Path, checked: np.ndarray, rng: np.random.Generator, pool_rows: int) -> list[str]:
    """The checked targets whose pattern is COPY made near-copies of random pool rows (targets.parquet rewritten)."""
    table = pq.read_table(root / "targets.parquet")
    names = [str(p) for p in table.column("filepath").to_pylist()]
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(len(names), -1).copy()
    copies = [int(t) for j, t in enumerate(checked) if PATTERNS[j % len(PATTERNS)] == COPY]
    if copies:
        source = take_rows(root / "pool.parquet", np.sort(rng.choice(pool_rows, len(copies), replace=False)))
        vectors[copies] = source + NOISE * rng.standard_normal(source.shape, dtype=np.float32)
    write_vectors(root / "targets.parquet", names, vectors)
    return names


def ranking(root: Path, queries: np.ndarray, depth: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's `depth` nearest pool rows by float64 cosine over the whole pool (rows, scores; best first)."""
    q = unit64(queries)
    rows, scores, seen = np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0)), 0
    for batch in pq.ParquetFile(root / "pool.parquet").iter_batches(batch_size=block_rows, columns=["embedding"]):
        column = batch.column(0)
        block = unit64(column.values.to_numpy().reshape(len(column), -1))
        rows = np.concatenate([rows, np.broadcast_to(np.arange(seen, seen + len(block)), (len(q), len(block)))], 1)
        scores = np.concatenate([scores, q @ block.T], 1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # ties to the lower row: earlier rows first
        rows, scores = np.take_along_axis(rows, keep, 1), np.take_along_axis(scores, keep, 1)
        seen += len(block)
    return rows, scores


def write_protected(root: Path, args: argparse.Namespace, targets: list[str], near: np.ndarray,
                    rng: np.random.Generator) -> int:
    """protected.parquet as a run writes it: the targets (origin TARGETS), then --protected less the targets
    listed images: near-copies of `near` pool rows (the checked targets' neighbours), PLANTED near-copies of
    rows spread over the pool, the rest random. Returns the listed count."""
    from deft_mine.engine import leaks
    from deft_mine.engine.leak_search import write_protected as write

    listed = args.protected - len(targets)
    spread = np.linspace(0, args.pool - 1, PLANTED).astype(np.int64)
    if listed < len(near) + PLANTED:
        raise SystemExit(f"--protected {args.protected}: needs at least {len(targets) + len(near) + PLANTED} "
                         f"(the {len(targets)} targets, {len(near)} near the checked targets, {PLANTED} planted)")
    vectors = rng.standard_normal((listed, args.dim), dtype=np.float32)
    copied = take_rows(root / "pool.parquet", np.concatenate([near, spread]))
    vectors[:len(copied)] = copied + NOISE * rng.standard_normal(copied.shape, dtype=np.float32)
    target_vectors = pq.read_table(root / "targets.parquet", columns=["embedding"]).column(0).combine_chunks()
    names = targets + [f"protected/{i:06d}.jpg" for i in range(listed)]
    protected = leaks.Protected(names, [root / "absent" / n for n in names],
                                [leaks.TARGETS] * len(targets) + ["val.parquet"] * listed,
                                np.concatenate([target_vectors.values.to_numpy().reshape(len(targets), -1), vectors]))
    write(protected, root / "protected.parquet")
    np.save(root / "protected.npy", protected.vectors)
    return listed


def plant_near(rows: np.ndarray) -> np.ndarray:
    """The pool rows the listed near-copies copy: each checked target's rows at its pattern's ranks."""
    picked = [rows[j, list(p)] for j, p in ((j, PATTERNS[j % len(PATTERNS)]) for j in range(len(rows)))
              if p != COPY and p]
    return np.unique(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- the references

def reference(root: Path, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The guarded answer without our guard: per checked target (its float64 ranking), the first TOPN rows
    whose float64 max cosine to every protected vector is below the threshold (a row -1 where the ranking
    ran out: DEPTH too shallow); how many of the ranked rows are leaks; and how many targets have fewer
    than TOPN clean rows among the search's candidates (topn + slack), which the guard must search again."""
    candidates = np.unique(rows)
    nearest = (unit64(take_rows(root / "pool.parquet", candidates)) @ unit64(np.load(root / "protected.npy")).T)
    leak = candidates[nearest.max(axis=1) >= THRESHOLD]
    is_leak = np.isin(rows, leak)
    width = TOPN + slack(TOPN)
    again = int(((~is_leak[:, :width]).sum(axis=1) < TOPN).sum())
    out_rows, out_scores = np.full((len(rows), TOPN), -1, np.int64), np.full((len(rows), TOPN), np.nan)
    for j in range(len(rows)):
        clean = np.flatnonzero(~is_leak[j])[:TOPN]
        out_rows[j, :len(clean)], out_scores[j, :len(clean)] = rows[j, clean], scores[j, clean]
    return out_rows, out_scores, len(leak), again


def run_rows(root: Path, mode: str, checked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's pairs for the checked targets: (targets, TOPN) source rows and scores in rank order."""
    pairs = pq.read_table(root / f"pairs_{mode}.parquet")
    target, rank = pairs.column("target_row").to_numpy(), pairs.column("rank").to_numpy()
    rows, scores = np.full((len(checked), TOPN), -1, np.int64), np.full((len(checked), TOPN), np.nan)
    for j, t in enumerate(checked.tolist()):
        at = np.flatnonzero(target == t)
        rows[j, rank[at] - 1] = pairs.column("source_row").to_numpy()[at]
        scores[j, rank[at] - 1] = pairs.column("score").to_numpy()[at]
    return rows, scores


def compare(root: Path, checked: np.ndarray, ranked: tuple[np.ndarray, np.ndarray]) -> tuple[str, bool]:
    """The guarded run's and the unguarded run's pairs of the checked targets against float64 brute force."""
    want, want_scores, leaks, again = reference(root, *ranked)
    got, got_scores = run_rows(root, "guarded", checked)
    plain, plain_scores = run_rows(root, "mine", checked)
    same = (got == want).all(axis=1)
    plain_same = bool((plain == ranked[0][:, :TOPN]).all())
    changed = int((want != ranked[0][:, :TOPN]).any(axis=1).sum())
    diff = float(np.nanmax(np.abs(np.concatenate([got_scores - want_scores, plain_scores - ranked[1][:, :TOPN]]))))
    ok = bool(same.all()) and plain_same and bool((want >= 0).all())
    text = (f"exactness: {len(checked)} targets x all pool rows (float64), leak verdict of their top {TOPN}+{DEPTH} "
            f"against all protected (float64): {leaks} of those rows are leaks, which change {changed} targets' "
            f"top {TOPN} ({again} have under {TOPN} clean among the search's {TOPN + slack(TOPN)} candidates: "
            f"searched again); "
            f"guarded run equal on {int(same.sum())}/{len(checked)} targets (rows and rank order), "
            f"unguarded run equal: {plain_same}; max |score diff| {diff:.1e}")
    if not same.all():
        j = int(np.flatnonzero(~same)[0])
        text += f"\n  first difference: target row {checked[j]}: run {got[j].tolist()} reference {want[j].tolist()}"
    return text, ok


def check_subsample(root: Path, rows: int) -> tuple[str, bool]:
    """leak_scope=pool: the guard's nearest protected score of the first `rows` pool rows against float64
    brute force, and the leak decision at the threshold."""
    column = pq.read_table(root / "pool.parquet", columns=["embedding"]).column(0).slice(0, rows).combine_chunks()
    pool = unit64(column.values.to_numpy().reshape(len(column), -1))
    exact = (pool @ unit64(np.load(root / "protected.npy")).T).max(axis=1)
    ours = np.load(root / "guard_nearest.npy")[:rows]
    same = bool(np.array_equal(ours >= THRESHOLD, exact >= THRESHOLD))
    return (f"pool scope subsample: first {rows} pool rows x all protected (float64 GEMM): max |nearest score diff| "
            f"{np.abs(ours - exact).max():.1e}; leaks {int((exact >= THRESHOLD).sum())}; same leak decision: {same}",
            same)


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
    p.add_argument("--protected", type=int, default=10_000,
                   help="protected vectors, the targets among them (default 10000)")
    p.add_argument("--dim", type=int, default=768, help="vector length (default 768)")
    p.add_argument("--block-rows", type=int, default=32768, help="pool rows per block (default 32768)")
    p.add_argument("--check-targets", type=int, default=50, help="exactness: targets checked (default 50)")
    p.add_argument("--flood", type=int, default=16, help="leaks planted among the first flood + 3 rows of every "
                   "sixth checked target (default 16: within the search's room at topn 10; more: searched again)")
    p.add_argument("--pool-scope", action="store_true",
                   help="also time the whole-pool scan (leak_scope=pool; about 10x the mining)")
    p.add_argument("--check-rows", type=int, default=20000, help="--pool-scope check: pool rows (default 20000)")
    p.add_argument("--files", type=int, default=100_000, help="byte check: tiny pool files (default 100000)")
    add_worker_flags(p)
    return p.parse_args(argv)


def write_data(root: Path, args: argparse.Namespace) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], int]:
    """The pool and targets parquets, the checked targets' float64 ranking, and protected.parquet."""
    from deft_mine.engine.embedding import rows_per_group

    rows = rows_per_group(args.dim)
    rng = np.random.default_rng(PROTECTED_SEED)
    write_vector_parquet(root / "targets.parquet", args.targets, args.dim, TARGET_SEED, "target", rows)
    write_vector_parquet(root / "pool.parquet", args.pool, args.dim, POOL_SEED, "pool", rows)
    checked = checked_targets(args)
    names = plant_copies(root, checked, rng, args.pool)
    queries = pq.read_table(root / "targets.parquet", columns=["embedding"]).column(0).combine_chunks()
    queries = queries.values.to_numpy().reshape(args.targets, -1)[checked]
    ranked = ranking(root, queries, TOPN + DEPTH, args.block_rows)
    listed = write_protected(root, args, names, plant_near(ranked[0]), rng)
    return checked, ranked, listed


def line(name: str, r: dict, extra: str) -> str:
    steps = ", ".join(f"{k} {v:.2f}" for k, v in r.get("timings", {}).items() if k in ("search", "leaks", "collect"))
    return f"{name:<22}{r['seconds']:8.2f} s  peak {r['peak_MiB']:6.0f} MiB  ({extra}{'; ' + steps if steps else ''})"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    global PATTERNS
    PATTERNS = patterns(args.flood)
    if args.w_mode:
        worker(args)
        return
    print(f"# bench_leaks: mine_files topn {TOPN} with the guard in the search (leak_scope=mined) vs without")
    for text in machine_lines():
        print("#", text)
    with scratch("deft_bench_leaks_", args.keep) as root:
        t0 = time.perf_counter()
        checked, ranked, listed = write_data(root, args)
        print(f"# targets={args.targets}, pool={args.pool}, dim={args.dim} float32 random normal; protected="
              f"{args.protected} ({args.targets} targets + {listed} listed: {len(plant_near(ranked[0]))} near-copies "
              f"of checked targets' neighbours, {PLANTED} of rows spread over the pool, the rest random; "
              f"{sum(PATTERNS[j % len(PATTERNS)] == COPY for j in range(len(checked)))} targets near-copies of "
              f"pool rows); {METRIC.value}, leak_similarity={THRESHOLD}, block_rows={args.block_rows}")
        print(f"# wrote data and the reference ranking in {time.perf_counter() - t0:.1f}s; each run in its own "
              "fresh interpreter", flush=True)
        mine, guarded = run_worker(args, root, "mine"), run_worker(args, root, "guarded")
        ratio = guarded["seconds"] / mine["seconds"]
        print(line(f"mine_files topn {TOPN}:", mine, f"mined {mine['mined']}"))
        print(line("guarded (mined):", guarded, f"mined {guarded['mined']}; leaks {guarded['leaks']} among "
                                                f"{guarded['judged']} rows judged"))
        print(f"guarded / mining = {ratio:.2f} (goal <= {GOAL_RATIO}); guarded peak {guarded['peak_MiB']:.0f} MiB "
              f"(goal <= {GOAL_MIB:.0f}); idle interpreter floor {guarded['rss_before_MiB']:.0f} MiB", flush=True)
        exact, ok = compare(root, checked, ranked)
        print(exact, flush=True)
        if args.pool_scope:
            scan = run_worker(args, root, "guard")
            print(line("pool scope (guard):", scan, f"leaks {scan['leaks']}; "
                       f"(scan + mining) / mining = {(scan['seconds'] + mine['seconds']) / mine['seconds']:.2f}"))
            text, same = check_subsample(root, min(args.check_rows, args.pool))
            print(text)
            ok = ok and same
        t0 = time.perf_counter()
        write_tiny_files(root, args)
        print(f"# wrote {args.files} + {args.targets} tiny files in {time.perf_counter() - t0:.1f}s", flush=True)
        tiny = run_worker(args, root, "bytes")
        print(f"byte-copy check (whole pool): {tiny['seconds']:.2f} s for {args.files} pool + {args.targets} target "
              f"files ({1e6 * tiny['seconds'] / (args.files + args.targets):.0f} us a file; leaks {tiny['leaks']}); "
              f"peak {tiny['peak_MiB']:.0f} MiB")
        ok = ok and ratio <= GOAL_RATIO and guarded["peak_MiB"] <= GOAL_MIB and tiny["leaks"] == 1
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
