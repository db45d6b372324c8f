#!/usr/bin/env python
"""The MCP server under load: 8 concurrent sessions over streamable HTTP, each running `run` on its
own tiny set and calling `preflight` in between, for a while. Counts the server's threads, open
files and child processes before and after, checks every run folder, and compares `preflight`
latency under that load with its latency on the idle server, measured in the same run."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from mcp import Client
from PIL import Image

from _machine import machine_lines

BIN = Path(sys.executable).parent / "deft-mine"
SETTLE_S = 12.0  # anyio retires a worker thread idle for 10 s; counts wait past that
KEEP_ALIVE_S = 6.0  # uvicorn closes an idle client connection after 5 s: its socket is no leak


def write_set(folder: Path, images: int, seed: int) -> None:
    """`images` seeded 64×48 PNGs: the first third are targets, the rest the pool."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(images):
        path = folder / "imgs" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        names.append(f"imgs/{i}.png")
    cut = max(1, images // 3)
    pq.write_table(pa.table({"filepath": names[:cut]}), folder / "targets.parquet")
    pq.write_table(pa.table({"filepath": names[cut:]}), folder / "pool.parquet")


def counts(pid: int) -> dict[str, int]:
    process = psutil.Process(pid)
    return {"threads": process.num_threads(), "open fds": process.num_fds(),
            "child processes": len(process.children(recursive=True))}


def settled_counts(pid: int, url: str, ceiling: dict[str, int] | None = None) -> dict[str, int]:
    """Counts once idle workers have retired. anyio retires a worker idle for 10 s only when the
    next call takes a thread, so: wait SETTLE_S, make one preflight call, wait out that call's
    keep-alive connection, count; given a ceiling, repeat until back under it, for up to
    4 × SETTLE_S, then report what is left."""
    deadline = time.monotonic() + 4 * SETTLE_S
    while True:
        time.sleep(SETTLE_S)
        anyio.run(idle_latency, url, 0)
        time.sleep(KEEP_ALIVE_S)
        now = counts(pid)
        if not ceiling or all(now[k] <= ceiling[k] for k in now) or time.monotonic() > deadline:
            return now


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return (statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], ordered[-1])


async def preflight(client: Client) -> float:
    t0 = time.perf_counter()
    result = await client.call_tool("preflight", {})
    elapsed = time.perf_counter() - t0
    if result.is_error:
        raise RuntimeError(f"preflight refused: {result.content}")
    return elapsed


async def idle_latency(url: str, calls: int) -> list[float]:
    async with Client(url, mode="legacy") as client:
        await preflight(client)  # warm-up: the first call imports what preflight checks
        return [await preflight(client) for _ in range(calls)]


async def load(url: str, root: Path, sessions: int, seconds: float, tag: str = "") -> dict[str, Any]:
    """`sessions` sessions, each: run on its own set (into runs/<tag><n>), then preflight, until
    the time is up."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    run_dirs: list[Path] = []
    errors: list[str] = []

    async def session(index: int) -> None:
        folder = root / f"s{index}"
        try:
            async with Client(url, mode="legacy") as client:
                n = 0
                while time.monotonic() < deadline:
                    run_dir = folder / "runs" / f"{tag}{n}"
                    result = await client.call_tool("run", {
                        "targets": str(folder / "targets.parquet"), "source": str(folder / "pool.parquet"),
                        "run_dir": str(run_dir), "overrides": {"model": "thumbnail", "topn": 2}})
                    n += 1
                    if result.is_error:
                        errors.append(f"s{index} run {n}: {result.content}")
                    else:
                        run_dirs.append(Path(result.structured_content["run_dir"]))
                    latencies.append(await preflight(client))
        except Exception as exc:  # noqa: BLE001 - counted and printed: the figure must be 0
            errors.append(f"s{index}: {type(exc).__name__}: {exc}")

    async with anyio.create_task_group() as group:
        for index in range(sessions):
            group.start_soon(session, index)
    return {"latencies": latencies, "run_dirs": run_dirs, "errors": errors}


def incomplete(run_dir: Path) -> str | None:
    manifest = run_dir / "run.json"
    if not manifest.is_file():
        return "no run.json"
    status = json.loads(manifest.read_text()).get("status")
    if status != "finished":
        return f"status {status}"
    return None if (run_dir / "Mining_Report.md").is_file() else "no Mining_Report.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120, help="how long the load lasts")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--images", type=int, default=6, help="images per session's set")
    parser.add_argument("--idle-calls", type=int, default=50, help="preflight calls on the idle server")
    parser.add_argument("--warm-up", type=float, default=10, help="seconds of the same load before counting")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    print(f"# bench_server: {args.sessions} MCP sessions over streamable HTTP, run + preflight, {args.seconds:.0f} s")
    for line in machine_lines():
        print(f"# {line}")
    root = work / "root"
    for index in range(args.sessions):
        write_set(root / f"s{index}", args.images, seed=index)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (work / "server.log").open("w")
    server = subprocess.Popen([str(BIN), "serve", "--transport", "streamable-http", "--host", "127.0.0.1",
                               "--port", str(port), "--root", str(root), "--store", str(work / "store")],
                              cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the server did not start:\n{(work / 'server.log').read_text()}")
                time.sleep(0.2)
        # Warm-up under the same load: pools that grow lazily to a bound with concurrency (Arrow's
        # I/O threads, torch's, ...) reach it before `before` is counted, and are not taken for a leak.
        warm = anyio.run(load, url, root, args.sessions, args.warm_up, "warm")
        idle = anyio.run(idle_latency, url, args.idle_calls)
        before = settled_counts(server.pid, url)
        t0 = time.perf_counter()
        loaded = anyio.run(load, url, root, args.sessions, args.seconds)
        wall = time.perf_counter() - t0
        after = settled_counts(server.pid, url, ceiling=before)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    bad = {str(d): why for d in [*warm["run_dirs"], *loaded["run_dirs"]] if (why := incomplete(d))}
    runs = len(loaded["run_dirs"]) + sum(1 for e in loaded["errors"] if " run " in e)
    errors = [*(f"warm-up {e}" for e in warm["errors"]), *loaded["errors"]]
    idle_p, load_p = percentiles(idle), percentiles(loaded["latencies"])
    print(f"\n{'':28}{'before':>10}{'after':>10}")
    for key in before:
        print(f"{key:28}{before[key]:>10}{after[key]:>10}")
    folders = len(warm["run_dirs"]) + len(loaded["run_dirs"])
    print(f"\nruns under load {runs} in {wall:.1f} s ({runs / wall:.1f}/s), after {len(warm['run_dirs'])} in the "
          f"warm-up; run folders complete {folders - len(bad)}/{folders}; errors {len(warm['errors'])} in the "
          f"warm-up, {len(loaded['errors'])} under load; server alive after: {alive}")
    print(f"\n{'preflight latency (ms)':28}{'p50':>10}{'p95':>10}{'max':>10}{'calls':>10}")
    print(f"{'idle':28}" + "".join(f"{v * 1000:>10.1f}" for v in idle_p) + f"{len(idle):>10}")
    print(f"{f'under load ({args.sessions} sessions)':28}" + "".join(f"{v * 1000:>10.1f}" for v in load_p)
          + f"{len(loaded['latencies']):>10}")
    print(f"{'ratio load / idle':28}" + "".join(f"{b / a:>10.1f}" for a, b in zip(idle_p, load_p)))
    for line in [*errors[:5], *(f"{d}: {why}" for d, why in list(bad.items())[:5])]:
        print(f"! {line}")
    # Arrow starts its pools' threads (I/O: 8, CPU: one per core) lazily, as concurrent reads
    # first need them, and keeps them: growth up to that is a pool filling, beyond it a leak.
    arrow_pools = pa.io_thread_count() + pa.cpu_count()
    allowed = {"threads": arrow_pools, "open fds": 0, "child processes": 0}
    leaked = {k: after[k] - before[k] for k in before if after[k] - before[k] > allowed[k]}
    print(f"(threads may grow by up to {arrow_pools}, Arrow's lazily started pools; fds and processes by 0)")
    if leaked:
        print(f"! more after than before: {leaked}")
    if args.keep:
        print(f"# kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if errors or bad or leaked or not alive else 0)


if __name__ == "__main__":
    main()
