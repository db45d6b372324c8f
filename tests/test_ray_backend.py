"""The ray backend on a real two-node Ray cluster on this machine: same answers as local."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from test_leaks import guarded_set  # noqa: F401 - the fixture: targets, a protect listing, a pool of copies
from ray_helpers import RAY_CLI, free_port, own_head, ray_env, start_head, stop, summary_text
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.events import RecordingEvents
from deft_mine.tools.embed import embed
from deft_mine.tools.mine import mine

pytestmark = pytest.mark.e2e
ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")
THUMB = {"model": "thumbnail", "batch_size": 4}
_SECOND_NODE: dict[str, int] = {}  # the pid of the second raylet's `ray start`


@pytest.fixture(scope="module")
def cluster() -> str:
    """A head and a second raylet, one CPU each: a real multi-node cluster on this machine."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="dmray", dir="/tmp")  # Ray's socket paths must stay short
    # Token auth off on both sides: Ray turns it on when a token file happens to exist in ~/.ray,
    # and a driver without the token is then refused.
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = ray_env()
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    procs = [start_head(port, temp, env)]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        procs.append(subprocess.Popen([str(RAY_CLI), "start", f"--address={address}", *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _SECOND_NODE["pid"] = procs[1].pid
        from deft_mine.backends.ray import connect, disconnect

        session = connect(address)
        while sum(1 for n in session.nodes() if n.get("Alive")) < 2:
            assert procs[1].poll() is None and time.monotonic() < deadline, "the second raylet did not join"
            time.sleep(0.3)
        yield address
        disconnect()
    finally:
        stop(procs)
        shutil.rmtree(temp, ignore_errors=True)
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Targets and a pool with repeated pictures (exact ties), a target inside the pool, a file
    that is no image and one that is missing."""
    root = tmp_path_factory.mktemp("ray_images")
    for i in range(26):
        write_image(root / "imgs" / f"{i}.png", seed=i % 9)  # 9 distinct pictures: ties
    (root / "imgs" / "bad.png").write_bytes(b"not an image")
    pool = [f"imgs/{i}.png" for i in range(5, 26)]
    pool[4:4] = ["imgs/bad.png", "imgs/missing.png", "imgs/0.png"]
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(5)],
                             "label": ["a", "b", "a", "c", None]}), root / "targets.parquet")
    pq.write_table(pa.table({"filepath": pool, "label": [["a", "b", "c"][i % 3] for i in range(len(pool))],
                             "row": list(range(len(pool)))}), root / "pool.parquet")
    return root


def _same_embeddings(a: Path, b: Path) -> None:
    left, right = pq.read_table(a), pq.read_table(b)
    assert left.schema.equals(right.schema, check_metadata=True)  # columns, types, encoder identity
    assert left.drop_columns(["embedding"]).equals(right.drop_columns(["embedding"]))  # rows, order
    diff = np.abs(tables.vectors_from_column(left.column("embedding"), path=a, name="embedding", first_row=0, dim=None)
                  - tables.vectors_from_column(right.column("embedding"), path=b, name="embedding", first_row=0,
                                               dim=None))
    assert diff.max() <= 1e-5


def test_embed_equals_local(cluster, images, tmp_path):
    local = embed(images / "pool.parquet", tmp_path / "local.parquet", overrides=THUMB, no_store=True)
    events = RecordingEvents()
    on_ray = embed(images / "pool.parquet", tmp_path / "ray.parquet", overrides={**THUMB, "workers": 1},
                   no_store=True, backend="ray", ray_address=cluster, events=events)
    _same_embeddings(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    assert on_ray.backend == "ray" and on_ray.cluster.workers == 1  # the pool size asked for
    assert (on_ray.rows, on_ray.input_rows, on_ray.skipped) == (local.rows, local.input_rows, local.skipped) == (22, 24, 2)
    assert on_ray.skipped_by_reason == local.skipped_by_reason == {"not an image": 1, "missing": 1}
    assert on_ray.skipped_examples == local.skipped_examples
    assert [w.model_dump() for w in on_ray.warnings] == [w.model_dump() for w in local.warnings]
    assert on_ray.encoder == local.encoder and on_ray.columns == local.columns
    assert events.progress_events[-1] == ("embed", 24, 24)  # one per listing batch, the last complete
    assert len(events.progress_events) >= 24 // THUMB["batch_size"]


def test_a_hugging_face_encoder_on_ray_equals_local(cluster, images, tmp_path, tiny_siglip):
    """The read tasks preprocess with the encoder's own processor (no weights) and the actors
    encode: the vectors and the identity are the local backend's."""
    spec = {"model": "SigLIP", "model_path": str(tiny_siglip), "batch_size": 4}
    local = embed(images / "pool.parquet", tmp_path / "local.parquet", overrides=spec, no_store=True)
    on_ray = embed(images / "pool.parquet", tmp_path / "ray.parquet", overrides=spec, no_store=True,
                   backend="ray", ray_address=cluster)
    assert on_ray.encoder == local.encoder and on_ray.rows == local.rows == 22
    _same_embeddings(tmp_path / "local.parquet", tmp_path / "ray.parquet")


def test_store_reuse_sends_no_rows_to_the_encoders(cluster, images, tmp_path):
    store = tmp_path / "store"
    first = embed(images / "pool.parquet", tmp_path / "a.parquet", overrides=THUMB, store=str(store),
                  backend="ray", ray_address=cluster)
    again = embed(images / "pool.parquet", tmp_path / "b.parquet", overrides=THUMB, store=str(store),
                  backend="ray", ray_address=cluster)
    assert (first.embedded, first.reused) == (22, 0)
    assert (again.embedded, again.reused) == (0, 22)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    # and the local backend reuses what the cluster stored
    local = embed(images / "pool.parquet", tmp_path / "c.parquet", overrides=THUMB, store=str(store))
    assert (local.embedded, local.reused) == (0, 22)
    _same_embeddings(tmp_path / "a.parquet", tmp_path / "c.parquet")


@pytest.fixture(scope="module")
def embedded(images, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ray_embedded")
    embed(images / "targets.parquet", folder / "t.parquet", overrides=THUMB, no_store=True)
    embed(images / "pool.parquet", folder / "s.parquet", overrides=THUMB, no_store=True)
    return folder / "t.parquet", folder / "s.parquet"


@pytest.mark.parametrize("params", [
    {"topn": 3, "block_rows": 4},  # several shards, ties across them
    {"topn": 4, "knn_metric": "euclidean", "filter_by_label": True, "block_rows": 5},
    {"topn": 30, "knn_metric": "manhattan", "exclude_targets": True, "block_rows": 3},  # pool exhausted
    # issue 14: a floor and the per-label search, one group search per shard
    {"topn": 5, "knn_metric": "euclidean", "filter_by_label": True, "label_mode": "per_label",
     "max_distance": 1.3, "block_rows": 4},
])
def test_mine_equals_local(cluster, embedded, tmp_path, params):
    targets, pool = embedded
    done = {}
    for backend in ("local", "ray"):
        out = tmp_path / backend / "mined.parquet"
        done[backend] = mine(pool, targets, out, overrides=params, backend=backend,
                             **({"ray_address": cluster} if backend == "ray" else {}))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert summary_text(on_ray) == summary_text(local)
    assert pq.read_table(on_ray / "mined.parquet").equals(pq.read_table(local / "mined.parquet"))
    assert done["ray"].summary == done["local"].summary and done["ray"].mined > 0
    assert [w.model_dump() for w in done["ray"].warnings] == [w.model_dump() for w in done["local"].warnings]


def test_mined_pairs_equal_local(cluster, embedded, tmp_path):
    from deft_mine.backends import BackendOptions, resolve
    from deft_mine.backends.base import MineOutputs
    from deft_mine.events import NullEvents
    from deft_mine.schemas.specs import MiningSpec

    targets, pool = embedded
    spec = MiningSpec(topn=5, filter_by_label=True, block_rows=4)
    for name in ("local", "ray"):
        folder = tmp_path / name
        folder.mkdir()
        resolve(BackendOptions(backend=name, ray_address=cluster)).mine(
            spec, pool, targets, MineOutputs(folder / "mined.parquet", folder / "mined_pairs.parquet"), NullEvents())
    assert pq.read_table(tmp_path / "ray" / "mined_pairs.parquet").equals(
        pq.read_table(tmp_path / "local" / "mined_pairs.parquet"))


def test_bad_pool_vector_is_named_as_locally(cluster, embedded, tmp_path):
    targets, pool = embedded
    table = pq.read_table(pool)
    vectors = table.column("embedding").to_pylist()
    vectors[13] = vectors[13][:-1]  # a short vector in the fourth shard
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                    pa.array(vectors, pa.list_(pa.float32()))), broken)
    errors = []
    for backend in ("local", "ray"):
        with pytest.raises(DeftError) as caught:
            mine(broken, targets, tmp_path / backend / "m.parquet", overrides={"block_rows": 4}, backend=backend,
                 **({"ray_address": cluster} if backend == "ray" else {}))
        errors.append((caught.value.code, caught.value.message))
    assert errors[0] == errors[1] and "row 13" in errors[0][1]


def test_run_through_the_command_line(cluster, images, tmp_path):
    run_dir = tmp_path / "run"
    env = ray_env()  # no $RAY_ADDRESS: the flag alone says where
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deft-mine")), "run", "--backend", "ray", "--ray-address", cluster,
         "--targets", str(images / "targets.parquet"), "--source", str(images / "pool.parquet"),
         "--run-dir", str(run_dir), "--no-store", "model=thumbnail", "topn=3", "filter_by_label=true"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir.resolve())
    assert "(raylet)" not in proc.stdout  # the cluster's own messages go to stderr, stdout is the result
    names = {p.name for p in run_dir.iterdir()}
    assert {"embedding_spec.yaml", "mining_spec.yaml", "target_embeddings.parquet", "source_embeddings.parquet",
            "mined.parquet", "mined_pairs.parquet", "mining_summary.txt", "run.json", "Mining_Report.md"} <= names
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["backend"] == "ray" and set(manifest["timings"]) >= {"embed_targets", "embed_source", "mine"}
    for side in ("target", "source"):  # where each step ran, as run.json records it
        facts = manifest["embeddings"][side]["cluster"]
        assert (facts["address"], facts["nodes"], facts["cpus"], facts["workers"]) == (cluster, 2, 2.0, 1)
        assert facts["nodes_used"] == 1 and facts["gpus_used"] == 0
    report = (run_dir / "Mining_Report.md").read_text()
    assert f"Cluster: Ray {ray.__version__} at `{cluster}`, 2 nodes with 2 CPU(s) and 0 GPU(s)" in report
    assert "embedding the targets ran 1 encoder actor on 1 node" in report


@pytest.mark.parametrize("labels", [False, True], ids=["unlabelled", "filter_by_label"])
def test_two_rounds_with_a_history_ledger_equal_local(cluster, images, tmp_path, labels):
    """The whole workflow twice against one ledger, on each backend: the same candidates, the
    same selections, the same ledger counts (the ledger never selects an image twice)."""
    from deft_mine.tools.run import run

    outcome = {}
    for backend in ("local", "ray"):
        ledger, rounds = tmp_path / backend / "ledger.json", []
        for topn in (1, 3):
            folder = tmp_path / backend / f"r{topn}"
            done = run(images / "targets.parquet", images / "pool.parquet", run_dir=folder, history=ledger,
                       no_store=True, backend=backend, **({"ray_address": cluster} if backend == "ray" else {}),
                       overrides={**THUMB, "topn": topn, "filter_by_label": labels})
            rounds.append((pq.read_table(folder / "mined_candidates.parquet"), pq.read_table(folder / "mined.parquet"),
                           summary_text(folder),
                           (done.select.iteration, done.select.newly_selected, done.select.previously_selected)))
        outcome[backend] = rounds
        iterations = json.loads((tmp_path / backend / "r3" / "run.json").read_text())["history"]["iterations"]
        outcome[backend].append([it["cumulative"] for it in iterations])
    for (lc, lm, ls, lsel), (rc, rm, rs, rsel) in zip(outcome["local"][:2], outcome["ray"][:2]):
        assert rc.equals(lc) and rm.equals(lm) and rs == ls and rsel == lsel
    assert outcome["ray"][2] == outcome["local"][2]
    assert outcome["ray"][1][3][2] > 0  # round two met images round one had selected


def _match_sides(folder: Path, pool: int, targets: int, seed: int) -> Path:
    """A labelled pool in two parquet files (a folder: each file sharded on its own) with exact ties
    (repeated vectors) and files named by several rows, labelled targets; a spec over them."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(max(3, pool // 3), 6))
    vectors = base[rng.integers(0, len(base), pool)]  # repeated rows: exact ties between files
    names = [f"p{i % (pool - 3):03d}.png" for i in range(pool)]  # the last rows name earlier files again
    labels = [["dent", "ok", "ok", "scratch"][i % 4] for i in range(pool)]
    (folder / "pool").mkdir(parents=True)
    half = pool // 2
    for name, rows in (("a.parquet", slice(0, half)), ("b.parquet", slice(half, pool))):
        pq.write_table(pa.table({"filepath": names[rows], "label": labels[rows],
                                 "embedding": pa.array(vectors[rows].astype(np.float32).tolist(),
                                                       pa.list_(pa.float32()))}), folder / "pool" / name)
    queries = np.concatenate([base[:2], rng.normal(size=(targets - 2, 6))])  # two targets on pool rows
    pq.write_table(pa.table({"filepath": [f"t{i}.png" for i in range(targets)],
                             "label": [["dent", "ok", "scratch"][i % 3] for i in range(targets)],
                             "embedding": pa.array(queries.astype(np.float32).tolist(), pa.list_(pa.float32()))}),
                   folder / "targets.parquet")
    return folder


def _same_match_folders(local: Path, on_ray: Path) -> None:
    """Every file match wrote, equal: the per-pass parquets, final_unique_files, summary.json."""
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in on_ray.iterdir()) and "final_unique_files.parquet" in names
    for name in names:
        if name.endswith(".parquet"):
            assert pq.read_table(on_ray / name).equals(pq.read_table(local / name)), name
    assert json.loads((on_ray / "summary.json").read_text()) == json.loads((local / "summary.json").read_text())


@pytest.mark.parametrize("case", [
    {"pool": 40, "targets": 5, "keys": {"desired_unique_count": 12}},
    {"pool": 40, "targets": 6, "keys": {"desired_unique_count": 14, "allocation_policy": "class_stratified",
                                        "rare_class_list": "dent,scratch", "distance_metric": "euclidean"}},
    # many targets on a small pool: targets release their picks and are retried (the rollback passes)
    {"pool": 24, "targets": 12, "keys": {"desired_unique_count": 18, "candidate_expansion_factor": 1,
                                         "distance_metric": "manhattan"}},
    # more wanted than the pool holds: a shortfall, the same on both
    {"pool": 16, "targets": 4, "keys": {"desired_unique_count": 30}},
    # the near-duplicate rule while claiming: the repeated vectors are near copies (near_duplicates.parquet)
    {"pool": 40, "targets": 5, "keys": {"desired_unique_count": 10, "dedup_distance": 0.01}},
], ids=["global", "class_stratified", "retries", "shortfall", "dedup"])
def test_match_equals_local(cluster, tmp_path, case):
    from deft_mine.tools import match

    folder = _match_sides(tmp_path, case["pool"], case["targets"], seed=case["pool"] + case["targets"])
    common = {"source_path": str(folder / "pool"), "target_path": str(folder / "targets.parquet"),
              "block_rows": "4", **{k: str(v) for k, v in case["keys"].items()}}
    local = match(overrides={**common, "output_dir": str(tmp_path / "local")})
    events = RecordingEvents()
    on_ray = match(overrides={**common, "output_dir": str(tmp_path / "ray")}, backend="ray", ray_address=cluster,
                   events=events)
    _same_match_folders(tmp_path / "local", tmp_path / "ray")
    assert on_ray.backend == "ray" and local.backend == "local"
    keep = lambda r: r.model_dump(exclude={"backend", "timings", "output_dir", "final_parquet", "summary_path"})
    assert keep(on_ray) == keep(local)
    assert any(stage == "match" for stage, _, _ in events.progress_events)  # the shard searches were watched
    told = [m for _, m in events.logs if "shard task(s)" in m]
    assert told and int(told[0].split(", ")[1].split()[0]) > 1  # the pool was searched in several shards
    if case["keys"]["desired_unique_count"] == 18:
        assert any(p.retry for p in local.passes)  # the case does exercise the retries
    if "dedup_distance" in case["keys"]:
        assert pq.read_table(tmp_path / "local" / "near_duplicates.parquet").num_rows > 0
    if case["keys"]["desired_unique_count"] == 30:
        assert local.shortfalls and [w.code for w in on_ray.warnings] == [w.code for w in local.warnings]


def test_a_bad_pool_vector_in_match_is_named_as_locally(cluster, tmp_path):
    from deft_mine.tools import match

    folder = _match_sides(tmp_path, 40, 4, seed=3)
    table = pq.read_table(folder / "pool" / "b.parquet")
    column = table.column("embedding").to_pylist()
    column[13] = [1.0, 2.0]  # a 2-d vector among 6-d ones, deep in the second file
    pq.write_table(table.set_column(2, "embedding", pa.array(column, pa.list_(pa.float32()))), folder / "pool" / "b.parquet")
    common = {"source_path": str(folder / "pool"), "target_path": str(folder / "targets.parquet"), "block_rows": "4",
              "desired_unique_count": "10"}
    errors = []
    for backend in ("local", "ray"):
        with pytest.raises(DeftError) as info:
            match(overrides={**common, "output_dir": str(tmp_path / backend)}, backend=backend,
                  **({"ray_address": cluster} if backend == "ray" else {}))
        errors.append((info.value.code, info.value.message, info.value.details))
    assert errors[0] == errors[1]
    assert not (tmp_path / "ray" / "final_unique_files.parquet").exists()


def test_a_unique_run_equals_local(cluster, images, tmp_path):
    from deft_mine.tools.run import run

    found = {}
    for backend in ("local", "ray"):
        folder = tmp_path / backend
        run(images / "targets.parquet", images / "pool.parquet", run_dir=folder, no_store=True, backend=backend,
            **({"ray_address": cluster} if backend == "ray" else {}),
            overrides={**THUMB, "mode": "unique", "desired_unique_count": 9})
        found[backend] = folder
    assert pq.read_table(found["ray"] / "mined.parquet").equals(pq.read_table(found["local"] / "mined.parquet"))
    _same_match_folders(found["local"] / "unique_matching", found["ray"] / "unique_matching")


@pytest.fixture(scope="module")
def text_model(tiny_siglip, tmp_path_factory) -> Path:
    from test_text_embeddings import _with_tokenizer

    return _with_tokenizer(tiny_siglip, tmp_path_factory.mktemp("ray_text") / "model")


def test_text_embed_equals_local(cluster, text_model, tmp_path):
    from test_text_embeddings import SENTENCES, write_texts

    listing = write_texts(tmp_path / "texts.parquet", [SENTENCES[0], None, SENTENCES[1], "  ", SENTENCES[2]],
                          note=list("abcde"))
    spec = {"model": "SigLIP", "model_path": str(text_model), "batch_size": 2}
    local = embed(listing, tmp_path / "local.parquet", overrides=spec, no_store=True)
    on_ray = embed(listing, tmp_path / "ray.parquet", overrides=spec, no_store=True, backend="ray",
                   ray_address=cluster)
    assert pq.read_table(tmp_path / "ray.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
    assert pq.read_schema(tmp_path / "ray.parquet").metadata == pq.read_schema(tmp_path / "local.parquet").metadata
    assert (on_ray.rows, on_ray.skipped, on_ray.skipped_by_reason) == (local.rows, local.skipped,
                                                                       local.skipped_by_reason) == (
        3, 2, {"null text": 1, "empty text": 1})
    assert on_ray.skipped_examples == local.skipped_examples and on_ray.encoder == local.encoder
    assert [w.model_dump() for w in on_ray.warnings] == [w.model_dump() for w in local.warnings]
    assert on_ray.backend == "ray" and on_ray.cluster.workers == 1


def test_run_with_text_equals_local(cluster, image_set, text_model):
    from test_text_embeddings import SENTENCES
    from deft_mine.tools.run import run

    for backend in ("local", "ray"):
        run(text=SENTENCES[:2], source=image_set / "pool.parquet", run_dir=image_set / backend, no_store=True,
            overrides={"model": "SigLIP", "model_path": str(text_model), "batch_size": 2, "topn": 2},
            backend=backend, **({"ray_address": cluster} if backend == "ray" else {}))
    for name in ("target_embeddings.parquet", "mined.parquet"):
        assert pq.read_table(image_set / "ray" / name).equals(pq.read_table(image_set / "local" / name)), name


def test_without_ray_installed_the_refusal_says_how_to_install(images, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now fails as if not installed
            "from deft_mine.cli import main\n"
            f"sys.exit(main(['embed', '--json', '--backend', 'ray', 'input_parquet={images / 'pool.parquet'}', "
            f"'output_parquet={tmp_path / 'x.parquet'}', 'model=thumbnail']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)
    assert error["code"] == "backend_unavailable" and error["fix"] == "pip install 'deft-mine[ray]'"
    assert not (tmp_path / "x.parquet").exists()


def test_unreachable_head_is_a_coded_error_naming_it(cluster, images, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(DeftError) as caught:
        embed(images / "pool.parquet", tmp_path / "x.parquet", overrides=THUMB, backend="ray", ray_address=address)
    assert caught.value.code == "ray_unreachable" and address in caught.value.message
    assert caught.value.details["field"] == "ray_address"
    assert time.monotonic() - started < 30 and not (tmp_path / "x.parquet").exists()


def test_another_address_is_refused_while_a_step_runs(cluster):
    """The MCP server runs calls side by side: a call naming another cluster must not shut Ray
    down under a step that is running (it is refused until the step ends)."""
    from deft_mine.backends.ray import attached, connect

    with attached(cluster):
        with pytest.raises(DeftError) as caught:
            connect(f"127.0.0.1:{free_port()}")
    assert caught.value.code == "ray_busy" and caught.value.details["field"] == "ray_address"
    connect(cluster)  # the step over, the same cluster is still attached


def test_pool_plan_leaves_the_reads_a_cpu():
    from deft_mine.backends.ray_embed import plan_pool

    two = plan_pool(cpus=2, gpus=0, use_gpu=False)
    assert two.actors * two.actor_cpus <= 1 and two.read_cpus > 0
    eight = plan_pool(cpus=8, gpus=0, use_gpu=False, actors=8)
    assert eight.actors == 7
    gpu = plan_pool(cpus=2, gpus=4, use_gpu=True)
    assert (gpu.actors, gpu.actor_gpus, gpu.actor_cpus) == (4, 1.0, 0.0)
    assert plan_pool(cpus=1, gpus=0, use_gpu=False).actor_cpus < 1


# ----------------------------------------------------------------------------- faults

def _worker_running(title: str, node_pid: int | None = None) -> psutil.Process | None:
    """A Ray worker process now running `title` (Ray names a busy worker `ray::<task or actor>`),
    under the node whose `ray start` has pid `node_pid` if given."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if title in " ".join(proc.info["cmdline"] or []) and (
                    node_pid is None or node_pid in {p.pid for p in proc.parents()}):
                return proc
        except psutil.Error:
            continue
    return None


def _kill_when_running(find, timeout: float = 60.0) -> psutil.Process:
    """Wait until `find()` names a worker process of ours, then kill -9 it by its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            os.kill(found.pid, signal.SIGKILL)
            found.wait(10)
            return found
        time.sleep(0.05)
    raise AssertionError("no worker of ours appeared to kill")


def _in_thread(work):
    """Run `work` in a thread; returns a join() that gives its result or raises its error."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to join()
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 240):
        thread.join(timeout)
        assert not thread.is_alive(), "the work did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]
    return join


def test_a_shard_worker_killed_mid_mining_is_retried_and_the_answer_is_the_same(cluster, tmp_path):
    from conftest import write_embeddings

    rng = np.random.default_rng(7)
    # Big enough that each of the two shards searches for seconds: time to find and kill one.
    pool = write_embeddings(tmp_path / "pool.parquet", rng.normal(size=(80_000, 256)))
    targets = write_embeddings(tmp_path / "t.parquet", rng.normal(size=(10_000, 256)))
    params = {"topn": 3, "block_rows": 40_000}
    join = _in_thread(lambda: mine(pool, targets, tmp_path / "ray" / "mined.parquet", overrides=params,
                                   backend="ray", ray_address=cluster))
    # The second raylet's worker (SPREAD put a shard there): a worker lost on another node.
    killed = _kill_when_running(lambda: _worker_running("ray::search_shard", _SECOND_NODE["pid"]))
    on_ray = join()  # no WorkerCrashedError: Ray ran the shard again
    assert not psutil.pid_exists(killed.pid)
    local = mine(pool, targets, tmp_path / "local" / "mined.parquet", overrides=params)
    assert on_ray.summary == local.summary and on_ray.cluster.nodes_used == 2
    assert pq.read_table(tmp_path / "ray" / "mined.parquet").equals(pq.read_table(tmp_path / "local" / "mined.parquet"))
    assert summary_text(tmp_path / "ray") == summary_text(tmp_path / "local")


def test_an_encoder_actor_killed_mid_embedding_is_restarted_and_the_output_is_the_same(cluster, tmp_path):
    N, small = 400, {**THUMB, "batch_size": 2}  # 200 batches: the actor is killed with many to go
    for i in range(N):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i, size=(96, 80))
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(N)]}), tmp_path / "list.parquet")
    events = RecordingEvents()
    join = _in_thread(lambda: embed(tmp_path / "list.parquet", tmp_path / "ray.parquet", overrides=small,
                                    no_store=True, backend="ray", ray_address=cluster, events=events))

    def encoder_at_work():
        # Batches already back: the actor is past start-up (a kill then would not test a lost
        # worker) and encoding, with most of the listing still to go. Timing by progress, not by
        # the actor's CPU time, which a fast machine never spends before the last batch.
        done = events.progress_events[-1][1] if events.progress_events else 0
        return _worker_running("EncodeActor") if 10 <= done <= N // 2 else None

    killed = _kill_when_running(encoder_at_work)
    done_at_kill = events.progress_events[-1][1] if events.progress_events else 0
    on_ray = join()  # Ray Data restarts the actor and runs its batches again
    assert done_at_kill < N, "killed after the last batch: nothing was lost"
    assert not psutil.pid_exists(killed.pid)
    local = embed(tmp_path / "list.parquet", tmp_path / "local.parquet", overrides=small, no_store=True)
    assert (on_ray.rows, on_ray.skipped) == (local.rows, local.skipped) == (N, 0)
    _same_embeddings(tmp_path / "local.parquet", tmp_path / "ray.parquet")


def _image_listing(folder: Path, count: int) -> Path:
    """`count` small distinct images and their listing: with batch_size=2, many batches."""
    for i in range(count):
        write_image(folder / "imgs" / f"{i}.png", seed=i, size=(96, 80))
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(count)]}), folder / "list.parquet")
    return folder / "list.parquet"


def test_a_killed_driver_resumes_from_the_store(cluster, tmp_path):
    """kill -9 of the process driving the cluster mid-embedding: the batches that came back
    before it are in the store, and the same command again sends only the rest to the cluster."""
    from deft_mine.engine import store as stores

    N = 300
    listing, store = _image_listing(tmp_path, N), tmp_path / "store"
    command = [str(Path(sys.executable).with_name("deft-mine")), "embed", "--backend", "ray", "--ray-address", cluster,
               "--store", str(store), f"input_parquet={listing}", f"output_parquet={tmp_path / 'ray.parquet'}",
               "model=thumbnail", "batch_size=2"]
    stored = lambda: sum(info.vectors for info in stores.describe(store)) if store.exists() else 0  # noqa: E731
    proc = subprocess.Popen(command, env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while stored() < 20:
        assert proc.poll() is None and time.monotonic() < deadline, "no vectors reached the store"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stored()
    assert 20 <= before < N and not (tmp_path / "ray.parquet").exists()

    again = subprocess.run([*command, "--json"], env=ray_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["reused"] >= before and result["reused"] + result["embedded"] == N
    assert result["embedded"] > 0  # the rest went to the cluster
    embed(listing, tmp_path / "local.parquet", overrides={**THUMB, "batch_size": 2}, no_store=True)
    _same_embeddings(tmp_path / "local.parquet", tmp_path / "ray.parquet")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _cancel_once_running(root: Path, tool: str, arguments: dict, running, stopped) -> list[str]:
    """Call `tool` on a real stdio server, cancel the call as soon as `running()` names a
    cluster worker doing its work, and see the server answer the next call; `stopped()` is
    asserted while the server still lives (its exit would end its Ray work anyway). The
    progress messages the call sent."""
    import anyio
    from mcp import Client

    from mcp_helpers import stdio_params

    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(stdio_params(root)) as client:
        async with anyio.create_task_group() as group:
            async def call() -> None:
                await client.call_tool(tool, arguments, progress_callback=on_progress)
                pytest.fail("the call finished although it was cancelled")

            group.start_soon(call)
            with anyio.fail_after(180):
                while not messages or running() is None:  # the call has begun, and its worker runs
                    await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        result = await client.call_tool("preflight", {})  # the session goes on
        assert not result.is_error
        assert await anyio.to_thread.run_sync(stopped)
    return messages


def _gone(find, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while find() is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.anyio
async def test_cancelling_an_mcp_embed_stops_the_encoder_actors(cluster, tmp_path):
    listing = _image_listing(tmp_path, 400)
    arguments = {"input_parquet": listing.name, "output_parquet": "out.parquet", "backend": "ray",
                 "ray_address": cluster, "no_store": True, "overrides": {**THUMB, "batch_size": 2}}
    # The worker meets the cancellation within a second, closes the Ray Data stream, and Ray
    # Data ends its actor pool: no encoder goes on working for nobody.
    messages = await _cancel_once_running(tmp_path, "embed", arguments, lambda: _worker_running("EncodeActor"),
                                          lambda: _gone(lambda: _worker_running("EncodeActor"), timeout=30))
    assert messages[0] == "embed: 0/400 (0 batch(es) done on the cluster)", messages[:3]
    assert not (tmp_path / "out.parquet").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.parquet")]


@pytest.mark.anyio
async def test_cancelling_an_mcp_mine_kills_the_running_shard_task(cluster, tmp_path):
    """One shard that would search for about a minute (100k targets × 80k rows on one CPU; 10k
    targets take ~5 s here): the cancellation is met while the driver waits on it, and the
    shard's worker is killed at once, not left to finish for nobody."""
    from conftest import write_embeddings

    rng = np.random.default_rng(3)
    write_embeddings(tmp_path / "pool.parquet", rng.normal(size=(80_000, 256)))
    write_embeddings(tmp_path / "t.parquet", rng.normal(size=(100_000, 256)))
    arguments = {"source_parquet": "pool.parquet", "target_parquet": "t.parquet", "output_parquet": "m/mined.parquet",
                 "backend": "ray", "ray_address": cluster, "overrides": {"topn": 3, "block_rows": 80_000}}
    seen: list[psutil.Process] = []

    def shard_running() -> psutil.Process | None:
        found = _worker_running("ray::search_shard")
        if found is not None:
            seen.append(found)
        return found

    messages = await _cancel_once_running(tmp_path, "mine", arguments, shard_running,
                                          lambda: _gone(lambda: psutil.pid_exists(seen[0].pid) or None, timeout=20))
    assert messages == ["mine: 0/80000 (0/1 shards done on the cluster)"]  # waits re-report nothing
    assert not (tmp_path / "m" / "mined.parquet").exists()


# ----------------------------------------------------------------------------- preflight

def test_preflight_asks_every_node(cluster, images, tmp_path):
    from deft_mine.tools.preflight import preflight

    ok = preflight(backend="ray", ray_address=cluster, targets=str(images / "targets.parquet"),
                   output_dir=str(tmp_path / "runs" / "new"))
    checks = {c.name: c for c in ok.checks}
    assert ok.ok, [c for c in ok.checks if not c.ok]
    assert "2 node(s)" in checks["ray"].detail and "2 node(s) run Ray" in checks["ray versions"].detail
    assert checks["node reads"].detail == "2 node(s) read all 5 sample image(s)"
    assert not list(tmp_path.rglob(".deft-mine-probe-*"))  # the probe file is gone again

    (tmp_path / "a_file").write_text("")
    bad = preflight(backend="ray", ray_address=cluster, targets=str(images / "targets.parquet"),
                    source=str(images / "pool.parquet"), output_dir=str(tmp_path / "a_file" / "runs"))
    checks = {c.name: c for c in bad.checks}
    assert not bad.ok
    assert checks["node reads"].status == "fail" and "missing.png" in checks["node reads"].detail
    assert checks["node writes"].status == "fail" and "a_file" in checks["node writes"].detail
    assert "same paths" in checks["node reads"].fix and "same paths" in checks["node writes"].fix


def test_preflight_of_an_unreachable_cluster_fails_naming_it(tmp_path):
    from deft_mine.tools.preflight import preflight

    address = f"127.0.0.1:{free_port()}"
    result = preflight(backend="ray", ray_address=address, output_dir=str(tmp_path))
    assert not result.ok and [c.name for c in result.checks if not c.ok] == ["ray"]
    assert address in result.checks[0].detail


# ----------------------------------------------------------------------------- a lost head

def test_a_lost_head_is_a_coded_error_and_the_run_folder_says_so(tmp_path):
    """Its own one-node cluster (the module's must live on): the head's GCS is killed while the
    run embeds the pool; the run stops with a coded error naming the address, nothing half-written."""
    for i in range(200):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i, size=(96, 80))
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(200)]}), tmp_path / "pool.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(3)]}), tmp_path / "targets.parquet")
    with own_head(cpus=2) as (head, address):  # an encoder actor and the reads beside it
        run_dir, env = tmp_path / "run", ray_env()
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("deft-mine")), "run", "--backend", "ray", "--ray-address", address,
             "--targets", str(tmp_path / "targets.parquet"), "--source", str(tmp_path / "pool.parquet"),
             "--run-dir", str(run_dir), "--no-store", "model=thumbnail", "batch_size=4"],
            env=env | {"DEFT_MINE_RAY_HEAD_SECONDS": "4"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _kill_when_running(lambda: _worker_running("EncodeActor", head.pid)
                               if (run_dir / "target_embeddings.parquet").exists() else None, timeout=120)
            # The head's control plane (GCS) dies. (Were the raylet this driver is attached to killed
            # too, Ray would end the driver process itself: see the README.)
            for child in psutil.Process(head.pid).children(recursive=True):
                if child.name() == "gcs_server":
                    child.kill()
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 2, stderr[-2000:]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "failed" and address in manifest["error"]["message"], manifest.get("error")
    assert manifest["error"]["code"] == "ray_head_lost" and manifest["error"]["field"] == "ray_address"
    assert not (run_dir / "source_embeddings.parquet").exists() and not (run_dir / "mined.parquet").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("scope", ["mined", "pool"])
def test_a_guarded_run_equals_local(cluster, guarded_set, scope):
    """The leakage guard (a protect listing, byte copies and leak_similarity) leaves the same pool rows
    out on a cluster as here, so the mined set is the same: judged in the search (leak_scope=mined: the
    shards keep their candidates' vectors, the driver judges them) or over the whole pool first."""
    from deft_mine.tools.run import run

    folder = guarded_set
    kinds = {}
    for backend in ("local", "ray"):
        result = run(folder / "targets.parquet", folder / "pool.parquet", run_dir=folder / backend, no_store=True,
                     protect=[str(folder / "val.parquet")], backend=backend,
                     **({"ray_address": cluster} if backend == "ray" else {}),
                     overrides={**THUMB, "topn": 3, "leak_similarity": 0.9, "leak_scope": scope})
        assert result.leaks is not None and result.leaks.scope == scope
        kinds[backend] = result.leaks.by_kind
    assert kinds["ray"] == kinds["local"] and kinds["local"]["identical_bytes"] >= 1
    if scope == "pool":
        assert kinds["local"] == {"identical_bytes": 2, "similar": 2}
    for name in ("protected_embeddings.parquet", "leaks.parquet", "mined.parquet", "mined_pairs.parquet"):
        assert pq.read_table(folder / "ray" / name).equals(pq.read_table(folder / "local" / name)), name
