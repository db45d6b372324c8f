"""The ray backend against the local one, in the same run: mining (output, wall time, driver peak RSS) and embedding throughput with 1 vs 2 encoder actors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_lines  # noqa: E402
from bench_mining import SEED, peak_rss_mib, pool_path, targets_path, write_data  # noqa: E402

# Ray turns token auth on when a token file happens to exist in ~/.ray; the nodes here are ours.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_cluster(cpus_per_node: int) -> object:
    """A head and a second node on this machine (Ray's own multi-node test cluster)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


# --------------------------------------------------------------------------- mining

def mine_worker(args: argparse.Namespace) -> None:
    """One side, in a fresh interpreter: mine with the `mine` tool, print seconds and peak RSS."""
    from deft_mine.tools.mine import mine

    root = Path(args.w_dir)
    out = root / args.w_mode / "mined.parquet"
    extra = {"ray_address": args.w_address} if args.w_mode == "ray" else {}
    t0 = time.perf_counter()
    result = mine(pool_path(root), targets_path(root, args.targets), out, backend=args.w_mode,
                  overrides={"topn": args.topn, "block_rows": args.block_rows}, **extra)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_MiB": peak_rss_mib(), "mined": result.mined,
                      "search_s": result.timings.get("search"),
                      "cluster": result.cluster.model_dump() if result.cluster else None}))


def run_side(args: argparse.Namespace, root: Path, mode: str, address: str | None) -> dict:
    cmd = [sys.executable, __file__, "--_worker", mode, "--_dir", str(root), "--targets", str(args.targets),
           "--topn", str(args.topn), "--block-rows", str(args.block_rows)] + (["--_address", address] if address else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_mining(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_data(root, args.pool, [args.targets], args.dim, args.row_group_rows)
        size = pool_path(root).stat().st_size / 2**30
        print(f"# mining: {args.targets} targets x {args.pool} x {args.dim} float32 pool ({size:.2f} GiB parquet, "
              f"seed {SEED}), topn {args.topn}, block_rows {args.block_rows}; written in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        cluster = start_cluster(1)
        try:
            address = cluster.address
            ray_side = run_side(args, root, "ray", address)
        finally:
            cluster.shutdown()
        local = run_side(args, root, "local", None)
        same = (pq.read_table(root / "ray" / "mined.parquet").equals(pq.read_table(root / "local" / "mined.parquet"))
                and (root / "ray" / "mining_summary.txt").read_bytes()
                == (root / "local" / "mining_summary.txt").read_bytes())
        c = ray_side["cluster"]
        print(f"local: {local['seconds']:.1f}s wall, driver peak RSS {local['peak_MiB']:.0f} MiB")
        print(f"ray:   {ray_side['seconds']:.1f}s wall, driver peak RSS {ray_side['peak_MiB']:.0f} MiB "
              f"({c['workers']} shard tasks on {c['nodes_used']} of {c['nodes']} nodes, {c['cpus']:g} CPUs)")
        print(f"identical mined.parquet and mining_summary.txt: {same}")
        print(f"ratios ray/local: wall {ray_side['seconds'] / local['seconds']:.2f}, "
              f"driver peak RSS {ray_side['peak_MiB'] / local['peak_MiB']:.2f}", flush=True)


# --------------------------------------------------------------------------- embedding

def bench_embedding(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench_embedding import save_random_siglip, write_images
    from deft_mine.backends.local import LocalBackend
    from deft_mine.backends.ray import HeadWatch, connect, disconnect
    from deft_mine.backends.ray_embed import embed_on_ray
    from deft_mine.engine.listings import open_listing
    from deft_mine.events import NullEvents
    from deft_mine.schemas.specs import EmbeddingSpec

    with tempfile.TemporaryDirectory(prefix="bench_ray_embed_") as tmp:
        root = Path(tmp)
        names = write_images(root / "imgs", args.images)
        pq.write_table(pa.table({"filepath": [f"imgs/{n}" for n in names]}), root / "list.parquet")
        if args.model == "thumbnail":
            spec = EmbeddingSpec(model="thumbnail", batch_size=args.batch_size, device="cpu")
            what = "thumbnail (weight-free)"
        else:
            save_random_siglip(root / "model", args.layers)
            spec = EmbeddingSpec(model="SigLIP", model_path=str(root / "model"), batch_size=args.batch_size,
                                 device="cpu")
            what = f"SigLIP vision tower 224px/16, width 768, {args.layers} layers, random weights"
        # Two logical CPUs per node: room for two actors and the read tasks beside them. This
        # machine has os.cpu_count() cores in all, which caps what the second actor can add.
        cluster = start_cluster(2)
        try:
            ray = connect(cluster.address)
            encoder = LocalBackend.shared().encoder(spec, NullEvents())
            print(f"# embedding: {args.images} images 640x480 JPEG, {what}, batch {args.batch_size}; "
                  f"cluster 2 nodes x 2 logical CPUs on {os.cpu_count()} cores", flush=True)
            # Worker processes, Ray Data and the encoder's imports start once, untimed: both timed
            # runs then pay only what a run pays on a warm cluster (its actors and their weights).
            pq.write_table(pa.table({"filepath": [f"imgs/{n}" for n in names[:4]]}), root / "warm.parquet")
            embed_on_ray(ray, spec, open_listing(root / "warm.parquet", "input_parquet", root), root / "warm_out.parquet",
                         encoder, NullEvents(), None, HeadWatch(ray, cluster.address), actors=2)
            rates = {}
            for actors in (1, 2):
                t0 = time.perf_counter()
                stats, used = embed_on_ray(ray, spec, open_listing(root / "list.parquet", "input_parquet", root),
                                           root / f"out{actors}.parquet", encoder, NullEvents(), None,
                                           HeadWatch(ray, cluster.address), actors=actors)
                seconds = time.perf_counter() - t0
                rates[actors] = stats.rows_out / seconds
                print(f"{actors} encoder actor(s) on {used.nodes} node(s): {stats.rows_out} images in "
                      f"{seconds:.1f}s = {rates[actors]:.2f} images/s", flush=True)
            print(f"throughput ratio 2/1 actors: {rates[2] / rates[1]:.2f}")
        finally:
            disconnect()
            cluster.shutdown()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("mine", "embed", "all"), default="all")
    p.add_argument("--pool", type=int, default=1_000_000, help="pool rows (default 1000000)")
    p.add_argument("--targets", type=int, default=1000, help="targets (default 1000)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--topn", type=int, default=10)
    p.add_argument("--block-rows", type=int, default=32768)
    p.add_argument("--row-group-rows", type=int, default=10240)
    p.add_argument("--images", type=int, default=2000, help="images to embed (default 2000)")
    p.add_argument("--model", choices=("siglip", "thumbnail"), default="siglip")
    p.add_argument("--layers", type=int, default=12, help="vision layers of the random SigLIP (12 = base)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--_worker", dest="w_mode", help=argparse.SUPPRESS)
    p.add_argument("--_dir", dest="w_dir", help=argparse.SUPPRESS)
    p.add_argument("--_address", dest="w_address", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.w_mode:
        mine_worker(args)
        return
    print("# bench_ray: the ray backend (a 2-node Ray cluster on this machine) vs the local backend")
    for line in machine_lines():
        print("# " + line)
    if args.part in ("mine", "all"):
        bench_mining(args)
    if args.part in ("embed", "all"):
        bench_embedding(args)


if __name__ == "__main__":
    main()
