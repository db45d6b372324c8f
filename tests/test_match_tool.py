"""The match tool (`tmm unique_neighbor_matching` everywhere): the Python call equals the engine,
bad input is coded, the backends that cannot run it say so before any work, and the command
line, the MCP server and deft-mine-task reach the same tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.backends import container
from deft_mine.backends.docker import has_unique_action
from deft_mine.engine.unique_matching import unique_match
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import UniqueMatchingSpec, load_spec
from deft_mine.task import main as task_main
from deft_mine.tools import match

BIN = Path(sys.executable).parent


def _write(path: Path, paths: list[str], vectors: np.ndarray, labels: list[str] | None = None) -> Path:
    columns = {"filepath": paths, "embedding": pa.array(np.asarray(vectors, np.float32).tolist(),
                                                        pa.list_(pa.float32()))}
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def sides(tmp_path: Path) -> Path:
    """A 12-row pool and 3 targets, labelled (dent is rare), and a spec file naming them."""
    rng = np.random.default_rng(4)
    _write(tmp_path / "pool.parquet", [f"p{i:02d}.png" for i in range(12)], rng.normal(size=(12, 4)),
           ["dent", "ok", "ok", "dent", "ok", "ok", "ok", "dent", "ok", "ok", "ok", "ok"])
    _write(tmp_path / "targets.parquet", ["t0.png", "t1.png", "t2.png"], rng.normal(size=(3, 4)), ["dent", "ok", "ok"])
    (tmp_path / "unique_spec.yaml").write_text(
        f"source_path: {tmp_path}/pool.parquet\ntarget_path: {tmp_path}/targets.parquet\n"
        f"output_dir: {tmp_path}/matched\ndesired_unique_count: ???\nallocation_policy: global\n")
    return tmp_path


def _engine(folder: Path, **keys: object):
    return unique_match(load_spec(UniqueMatchingSpec, folder / "unique_spec.yaml",
                                  {k: str(v) for k, v in keys.items()}))


@pytest.mark.parametrize("keys", [
    {"desired_unique_count": 5},
    {"desired_unique_count": 6, "allocation_policy": "class_stratified", "rare_class_list": "dent",
     "distance_metric": "cosine"},
])
def test_the_tool_equals_the_engine_and_writes_the_container_files(sides, keys):
    result = match(spec_path=sides / "unique_spec.yaml", overrides={k: str(v) for k, v in keys.items()})
    outcome = _engine(sides, **keys)
    out = sides / "matched"
    assert pq.read_table(result.final_parquet).equals(outcome.selected)
    assert json.loads(Path(result.summary_path).read_text()) == json.loads(json.dumps(outcome.summary, default=str))
    assert result.output_dir == str(out) and result.final_parquet == str(out / "final_unique_files.parquet")
    assert result.retrieved_unique_count == outcome.selected.num_rows == keys["desired_unique_count"]
    assert result.desired_unique_count == keys["desired_unique_count"] and result.coverage_pct == 100.0
    assert [(p.subset, p.number, p.added) for p in result.passes] == \
        [(p.subset, p.number, p.added) for p in outcome.passes]
    for p in result.passes:
        assert (out / p.file).is_file()
    assert result.shortfalls == [] and result.warnings == [] and result.backend == "local"
    if keys.get("allocation_policy") == "class_stratified":
        classes = outcome.selected.column("class").to_pylist()
        assert result.per_class == {name: classes.count(name) for name in sorted(set(classes))}
        assert sum(result.per_class.values()) == keys["desired_unique_count"]
    else:
        assert result.per_class is None
    assert result.text().startswith(f"matched {keys['desired_unique_count']}/{keys['desired_unique_count']} unique")


def test_a_budget_over_the_pool_is_short_and_warned(sides):
    result = match(spec_path=sides / "unique_spec.yaml", overrides=["desired_unique_count=20"])
    assert result.retrieved_unique_count == 12 and result.coverage_pct == 60.0
    assert [(s.group, s.wanted, s.got, s.missing, s.reason) for s in result.shortfalls] == \
        [("global", 20, 12, 8, "pool_spent")]
    (short,) = result.warnings
    assert short.code == "unique_count_short" and short.details["missing"] == 8
    assert "short: global got 12 of 20 (pool_spent)" in result.text()


@pytest.mark.parametrize("overrides, code, field", [
    ({"desired_unique_count": "0"}, "spec_invalid", "desired_unique_count"),
    ({"desired_unique_count": "3", "allocation_policy": "class_stratified"}, "spec_invalid", "rare_class_list"),
    ({"desired_unique_count": "3", "colour": "red"}, "spec_unknown_key", None),
    ({"desired_unique_count": "3", "source_path": "nowhere.parquet"}, "file_not_found", "source_path"),
    ({"desired_unique_count": "3", "output_dir": "{tmp}/pool.parquet"}, "output_not_writable", "output_dir"),
])
def test_bad_input_is_coded_and_writes_nothing(sides, overrides, code, field):
    overrides = {k: v.replace("{tmp}", str(sides)) for k, v in overrides.items()}
    with pytest.raises(DeftError) as info:
        match(spec_path=sides / "unique_spec.yaml", overrides=overrides)
    assert info.value.code == code
    if field is not None:
        assert info.value.details["field"] == field
    assert not (sides / "matched").exists()


def test_a_missing_required_key_and_a_bad_argument_are_coded(sides):
    with pytest.raises(DeftError) as info:
        match(spec_path=sides / "unique_spec.yaml")  # desired_unique_count: ???
    assert info.value.code == "spec_missing_value" and info.value.details["field"] == "desired_unique_count"
    with pytest.raises(DeftError) as info:
        match(spec_path=sides / "unique_spec.yaml", backend="slurm")
    assert info.value.code == "invalid_arguments" and info.value.details["field"] == "backend"


def test_ray_declares_the_action_and_is_dialled_only_after_the_spec_is_checked(sides):
    """Ray runs the passes (tests/test_ray_backend.py compares it with local); a bad spec is refused
    before the cluster is dialled."""
    import ray

    from deft_mine.backends.ray import RayBackend

    assert RayBackend.capabilities.runs_unique_matching
    with pytest.raises(DeftError) as info:
        match(spec_path=sides / "unique_spec.yaml", backend="ray", ray_address="10.255.255.1:6379")
    assert info.value.code == "spec_missing_value" and not ray.is_initialized()


def test_the_task_is_the_tool(sides, capsys):
    code = task_main(["tmm", "unique_neighbor_matching", "-e", str(sides / "unique_spec.yaml"),
                      "desired_unique_count=20"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip().endswith("Execution status: PASS")
    assert "matched 12/20 unique files" in captured.out and "WARNING [unique_count_short]" in captured.err
    recorded = json.loads((sides / "matched" / ".final_unique_files.parquet.result.json").read_text())
    assert recorded["retrieved_unique_count"] == 12 and recorded["warnings"][0]["code"] == "unique_count_short"


def test_an_image_is_asked_for_the_action_by_its_cfg_job_keys(capsys, tmp_path):
    """What the docker backend reads from `tmm unique_neighbor_matching -e {} --cfg=job` (our
    image answers with the keys, required ones as ???); an image without the action is refused
    naming it. (The container itself cannot run here.)"""
    (tmp_path / "blank.yaml").write_text("{}\n")
    assert task_main(["tmm", "unique_neighbor_matching", "-e", str(tmp_path / "blank.yaml"), "--cfg=job"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = frozenset(m.group(1) for line in lines if (m := container._KEY.match(line)))
    assert keys == set(UniqueMatchingSpec.model_fields) and "desired_unique_count: ???" in lines
    has_unique_action("deft-mine:latest", keys)
    with pytest.raises(DeftError) as info:
        has_unique_action("nvcr.io/old:tag", frozenset({"topn", "knn_metric"}))
    assert info.value.code == "backend_unsupported" and info.value.details["image"] == "nvcr.io/old:tag"
    assert "tmm unique_neighbor_matching" in info.value.message
    # a bad value is still refused, not answered with the blank schema
    assert task_main(["tmm", "unique_neighbor_matching", f"source_path={tmp_path}/p", f"target_path={tmp_path}/t",
                      f"output_dir={tmp_path}/o", "desired_unique_count=0", "--cfg=job"]) == 2


@pytest.mark.e2e
def test_the_command_line(sides):
    done = subprocess.run([str(BIN / "deft-mine"), "match", "-e", str(sides / "unique_spec.yaml"),
                           "desired_unique_count=4", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["retrieved_unique_count"] == 4 and result["final_parquet"].endswith("final_unique_files.parquet")
    assert pq.read_table(result["final_parquet"]).equals(_engine(sides, desired_unique_count=4).selected)
    done = subprocess.run([str(BIN / "deft-mine"), "match", "-e", str(sides / "unique_spec.yaml"),
                           "desired_unique_count=4", "allocation_policy=class_stratified"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "spec_invalid" in done.stderr and "rare_class_list" in done.stderr


@pytest.mark.e2e
def test_one_call_through_the_mcp_server(sides):
    from mcp_helpers import SyncClient, ok, refused, stdio_params, warning

    with SyncClient(stdio_params(sides)) as client:
        got = ok(client.call("match", {"spec_path": "unique_spec.yaml", "overrides": {"desired_unique_count": 14}}))
        assert got["retrieved_unique_count"] == 12 and warning(got, "unique_count_short")["details"]["missing"] == 2
        assert Path(got["final_parquet"]).is_file()
        refused(client.call("match", {"spec_path": "unique_spec.yaml", "overrides": {
            "desired_unique_count": 3, "allocation_policy": "class_stratified"}}), "spec_invalid")
