"""The embedding store across real processes: `kill -9` mid-pool then the same command, two
processes filling one store at once, the docker backend's container, and the MCP roots rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from deft_mine.engine import store as stores
from mcp_helpers import SyncClient, ok, refused, stdio_params
from test_docker_backend import docker_args, docker_image  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def make_pool(folder: Path, n: int, first_seed: int = 0, side: int = 48) -> Path:
    for i in range(n):
        write_image(folder / "imgs" / f"{first_seed + i}.png", seed=first_seed + i, size=(side, side))
    listing = folder / f"pool_{first_seed}_{n}.parquet"
    pq.write_table(pa.table({"filepath": [f"imgs/{first_seed + i}.png" for i in range(n)]}), listing)
    return listing


def embed_command(listing: Path, output: Path, store: Path, *extra: str) -> list[str]:
    return [str(BIN / "deft-mine"), "embed", "--json", "--store", str(store), "model=thumbnail", "batch_size=8",
            f"input_parquet={listing}", f"output_parquet={output}", *extra]


def shard_rows(store: Path) -> int:
    return sum(info.vectors for info in stores.describe(store))


def test_kill_9_mid_pool_then_the_same_command_finishes_with_an_identical_output(tmp_path: Path) -> None:
    listing = make_pool(tmp_path, 400, side=224)  # large enough that decoding takes seconds
    store = tmp_path / "store"
    proc = subprocess.Popen(embed_command(listing, tmp_path / "e.parquet", store),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while shard_rows(store) < 160 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = shard_rows(store)
    assert 160 <= stored < 400, stored  # killed about half-way; every finished batch was kept
    assert not (tmp_path / "e.parquet").exists()
    again = subprocess.run(embed_command(listing, tmp_path / "e.parquet", store), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["reused"] == stored and result["embedded"] == 400 - stored
    whole = subprocess.run(embed_command(listing, tmp_path / "whole.parquet", store, "--no-store"),
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    ours, theirs = pq.read_table(tmp_path / "e.parquet"), pq.read_table(tmp_path / "whole.parquet")
    assert ours.equals(theirs)  # rows, order, columns, vectors bit for bit


def test_two_processes_filling_one_store_at_once_both_finish(tmp_path: Path) -> None:
    shared = make_pool(tmp_path, 120)
    more = make_pool(tmp_path, 60, first_seed=1000)
    both = pa.concat_tables([pq.read_table(shared), pq.read_table(more)])
    pq.write_table(both, tmp_path / "overlapping.parquet")
    store = tmp_path / "store"
    procs = [subprocess.Popen(embed_command(listing, tmp_path / f"o{i}.parquet", store),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, listing in enumerate([shared, tmp_path / "overlapping.parquet"])]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert [r["rows"] for r in results] == [120, 180]
    # consistent afterwards: every image is stored, a third process embeds nothing
    third = subprocess.run(embed_command(tmp_path / "overlapping.parquet", tmp_path / "o3.parquet", store),
                           capture_output=True, text=True)
    assert json.loads(third.stdout)["embedded"] == 0 and json.loads(third.stdout)["warnings"] == []
    assert pq.read_table(tmp_path / "o3.parquet").equals(pq.read_table(tmp_path / "o1.parquet"))
    info = subprocess.run([str(BIN / "deft-mine"), "store", "info", "--json", "--store", str(store)],
                          capture_output=True, text=True)
    (shelf,) = json.loads(info.stdout)["encoders"]
    assert shelf["model"] == "thumbnail" and 180 <= shelf["vectors"] <= 300  # overlap may be stored twice


def test_a_store_outside_the_roots_is_refused_unless_it_is_the_servers(tmp_path: Path) -> None:
    root, elsewhere, own = tmp_path / "root", tmp_path / "elsewhere", tmp_path / "server_store"
    make_pool(root, 4)
    params = stdio_params(root)
    params.args = [*params.args, "--store", str(own)]
    with SyncClient(params) as client:
        arguments = {"input_parquet": "pool_0_4.parquet", "output_parquet": "e.parquet",
                     "overrides": {"model": "thumbnail"}}
        error = refused(client.call("embed", {**arguments, "store": str(elsewhere)}), "path_outside_roots")
        assert error["field"] == "store" and not elsewhere.exists()
        first = ok(client.call("embed", {**arguments, "store": str(own)}))  # the server's own: allowed
        second = ok(client.call("embed", {**arguments, "output_parquet": "e2.parquet"}))  # and the default
        assert first["store"] == second["store"] == str(own)
        assert (first["embedded"], second["reused"]) == (4, 4)
        info = ok(client.call("store_info", {}))
        assert info["store"] == str(own) and info["encoders"][0]["vectors"] == 4


def test_the_docker_backend_passes_the_store_through_to_our_image(image_set: Path, docker_image: str,
                                                                  tmp_path: Path) -> None:
    from deft_mine.tools import embed

    store = tmp_path / "store"
    first = embed(image_set / "pool.parquet", image_set / "d1.parquet", overrides={"model": "thumbnail"},
                  store=store, **docker_args(docker_image))
    second = embed(image_set / "pool.parquet", image_set / "d2.parquet", overrides={"model": "thumbnail"},
                   store=store, **docker_args(docker_image))
    local = embed(image_set / "pool.parquet", image_set / "l.parquet", overrides={"model": "thumbnail"}, store=store)
    assert (first.embedded, second.reused, local.reused) == (4, 4, 4)  # written in the container, reused outside
    assert np.array_equal(pq.read_table(image_set / "d1.parquet").column("embedding").to_pylist(),
                          pq.read_table(image_set / "l.parquet").column("embedding").to_pylist())
