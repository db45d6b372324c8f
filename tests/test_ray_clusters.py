"""The ray backend on cluster shapes of their own: a single node with one CPU (Ray Data's own
one-CPU tasks must not starve behind the encoder actor) and a head reached through Ray Client
(ray://), where the embedding's driver runs inside the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from ray_helpers import free_port, own_head, ray_env, summary_text

pytestmark = pytest.mark.e2e
pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")
DEFT_MINE = str(Path(sys.executable).with_name("deft-mine"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    for i in range(30):
        write_image(root / "imgs" / f"{i}.png", seed=i % 11)  # repeats: ties for the tie rule
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(4)]}), root / "targets.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(4, 30)]}), root / "pool.parquet")
    return root


@pytest.fixture(scope="module")
def local_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("local") / "run"
    _run(images, folder, "--backend", "local")
    return folder


def _run(images: Path, folder: Path, *backend: str) -> dict:
    """`deft-mine run` as a user types it; run.json of the finished run."""
    proc = subprocess.run([DEFT_MINE, "run", *backend, "--targets", str(images / "targets.parquet"),
                           "--source", str(images / "pool.parquet"), "--run-dir", str(folder), "--no-store",
                           "model=thumbnail", "batch_size=4", "topn=3"],
                          env=ray_env() | {"DEFT_MINE_RAY_STALL_SECONDS": "90"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "run.json").read_text())


def _same_answer(left: Path, right: Path) -> None:
    assert pq.read_table(left / "mined.parquet").equals(pq.read_table(right / "mined.parquet"))
    assert summary_text(left) == summary_text(right)
    assert pq.read_table(left / "mined_pairs.parquet").equals(pq.read_table(right / "mined_pairs.parquet"))


def test_a_single_node_with_one_cpu_runs_to_the_end(images, local_run, tmp_path):
    """Before: an actor holding half the only CPU left Ray Data's one-CPU read and repartition
    tasks unschedulable, and the run stalled (ray_stalled after the timeout)."""
    with own_head(cpus=1) as (_, address):
        manifest = _run(images, tmp_path / "run", "--backend", "ray", "--ray-address", address)
    facts = manifest["embeddings"]["source"]["cluster"]
    assert (facts["nodes"], facts["cpus"], facts["workers"]) == (1, 1.0, 1)
    _same_answer(local_run, tmp_path / "run")


def test_through_ray_client_the_run_equals_local(images, local_run, tmp_path):
    """ray://host:port: mining runs its shard tasks through the client; embedding, whose Ray
    Data executor cannot run on a client, runs its driver as a task inside the cluster."""
    client_port = free_port()
    with own_head(cpus=2, client_port=client_port):
        address = f"ray://127.0.0.1:{client_port}"
        manifest = _run(images, tmp_path / "run", "--backend", "ray", "--ray-address", address)
    assert manifest["status"] == "finished"
    for side in ("target", "source"):
        assert manifest["embeddings"][side]["cluster"]["address"] == address
    assert manifest["mining"]["cluster"]["address"] == address
    _same_answer(local_run, tmp_path / "run")
    for name in ("target_embeddings.parquet", "source_embeddings.parquet"):
        ours, theirs = pq.read_table(tmp_path / "run" / name), pq.read_table(local_run / name)
        assert ours.schema.equals(theirs.schema, check_metadata=True) and ours.num_rows == theirs.num_rows
