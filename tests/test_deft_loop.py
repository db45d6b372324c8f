"""The DEFT loop end to end on a ChangeNet workspace built on disk: a ChangeNet pool with two
lights and golden folders, ChangeNet targets, a validation CSV, and a mining ledger the skill's
own `filter_mined_history.py` wrote for iteration 1. Round 2 runs through the command line,
round 3 through MCP; each hands back `mined_training_rows.csv`, which the loop's own validator
(`validate_training_csv.py`, run as it is) accepts, and the loop's files with the loop's counts.
The skill's scripts are read from the stored tao-skill-bank snapshot (skipped when it is absent)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mcp_helpers import SyncClient, ok, stdio_params

# every test here spawns processes: the deft-mine command, its MCP server, the skill's scripts
pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
SKILL_BANK = Path("/work/.mirror/NVIDIA-TAO+tao-skill-bank/repo")
SCRIPTS = {"history": "skills/data/tao-mine-aoi-images/scripts/filter_mined_history.py",
           "validate": "skills/applications/tao-run-deft-aoi/scripts/validate_training_csv.py"}
LIGHTS = ("SolderLight", "LowAngleLight")
BOARD = "images/BOARD1/PerComponent"
GOLDEN = "images/golden/BOARD1/PerComponent"
# Pool components: (object_name, label as the pool spells it). Target components resemble some.
POOL = [(f"C{i}", label) for i, label in enumerate(
    ["PASS", "missing", "Missing ", "short", "PASS", "short", "missing", "PASS", "solder_bridge", "PASS"])]
# Each target resembles two pool components (its pattern): a near copy, which round 2 (topn=1) mines
# in both lights, and a noisier one, which only round 3 (topn=3) reaches.
LOOKS = {0: (0, 6), 1: (1, 6), 3: (3, 6), 4: (0, 40), 2: (1, 40), 5: (3, 40)}  # pool row -> pattern, noise
TARGETS = [("T0", "missing", 1), ("T1", "short", 3), ("T2", "PASS", 0)]  # (name, label, pattern)


def _skill_script(tmp: Path, name: str) -> Path:
    """The skill's script, as committed, written into `tmp` (the test skips without the snapshot)."""
    if not SKILL_BANK.exists():
        pytest.skip("the tao-skill-bank snapshot is not on this machine")
    text = subprocess.run(["git", "-C", str(SKILL_BANK), "show", f"HEAD:{SCRIPTS[name]}"], capture_output=True,
                          text=True, check=True).stdout
    path = tmp / Path(SCRIPTS[name]).name
    path.write_text(text)
    return path


def _image(path: Path, base: int, seed: int, noise: int = 6) -> None:
    """A component image: a pattern shared by its base (so near copies are neighbours) plus noise."""
    pattern = np.random.default_rng(base).integers(0, 255, (24, 32, 3)).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-noise, noise + 1, pattern.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pattern + noise, 0, 255).astype(np.uint8)).save(path, quality=95)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The loop's layout: images and golden folders under the workspace, the pool CSV under
    augmentation/mining_pool, targets and a validation CSV; ledger iteration 1 by the skill."""
    ws = tmp_path / "ws"
    for i, _ in enumerate(POOL):
        for j, light in enumerate(LIGHTS):
            pattern, noise = LOOKS.get(i, (i, 6))
            _image(ws / BOARD / f"C{i}_{light}.jpg", base=100 * pattern + j, seed=1000 + 10 * i + j, noise=noise)
            _image(ws / GOLDEN / f"C{i}_{light}.jpg", base=100 * i + j, seed=5000 + 10 * i + j)
    for name, _, copies in TARGETS:
        for j, light in enumerate(LIGHTS):
            _image(ws / "images/targets" / f"{name}_{light}.jpg", base=100 * copies + j, seed=9000 + copies + j)
    pool = [{"input_path": BOARD, "golden_path": GOLDEN, "label": label, "object_name": name,
             "boardname": "BOARD1"} for name, label in POOL]
    _write_csv(ws / "augmentation/mining_pool/mining_pool.csv", pool)
    _write_csv(ws / "targets.csv", [{"input_path": "images/targets", "golden_path": "", "label": label,
                                     "object_name": name, "boardname": "T"} for name, label, _ in TARGETS])
    # The validation set holds pool component C3 (as a training row would spell it): a leak to leave out.
    _write_csv(ws / "validation_set.csv", [{"input_path": BOARD, "golden_path": GOLDEN, "label": "short",
                                            "object_name": "C3", "boardname": "BOARD1"}])
    # Iteration 1 of the skill's ledger: C5's SolderLight image, selected by the skill's own script.
    first = ws / "results/iter1"
    first.mkdir(parents=True)
    pq.write_table(pa.table({"filepath": [f"{BOARD}/C5_SolderLight.jpg"]}), first / "mined_candidates.parquet")
    proc = subprocess.run([sys.executable, str(_skill_script(tmp_path, "history")),
                           "--candidate-parquet", str(first / "mined_candidates.parquet"),
                           "--output-parquet", str(first / "mined.parquet"),
                           "--history-file", str(ws / "results/mining_history.json"),
                           "--summary", str(first / "mining_history_summary.json"),
                           "--iteration", "1", "--topn", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ws


def _validator_accepts(tmp: Path, ws: Path, rows: Path) -> None:
    """The loop's validator, as committed, for every light: exit 0, i.e. every image and golden
    resolves, labels in ChangeNet's case, and no validation row in training."""
    script = _skill_script(tmp, "validate")
    for light in LIGHTS:
        proc = subprocess.run([sys.executable, str(script), "--csv", str(rows), "--workspace-root", str(ws),
                               "--validation-csv", str(ws / "validation_set.csv"), "--light", light],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _loop_counts_hold(run_dir: Path, iteration: int) -> dict:
    """The loop's checks on the stage files: knn_summary.csv's one row adds up and matches the
    candidates parquet; the history summary matches mined.parquet; returns the history summary."""
    (knn,) = _read_csv(run_dir / "knn_summary.csv")
    candidates = pq.read_table(run_dir / "mined_candidates.parquet")
    raw = pq.read_table(run_dir / "mined_raw.parquet")
    assert int(knn["candidate_count"]) == int(knn["kept_count"]) + int(knn["rejected_count"])
    assert int(knn["kept_count"]) == candidates.num_rows
    assert int(knn["candidate_count"]) == len(set(raw.column("filepath").to_pylist()))
    assert float(knn["similarity_threshold"]) == pytest.approx(0.5)
    history = json.loads((run_dir / "mining_history_summary.json").read_text())
    mined = pq.read_table(run_dir / "mined.parquet")
    assert history["iteration"] == iteration
    assert history["selected_count"] == mined.num_rows
    assert history["candidate_unique_count"] == candidates.num_rows
    assert history["candidate_unique_count"] == history["already_mined_count"] + history["selected_count"]
    return history


def _training_rows_hold(run_dir: Path, ws: Path, tmp: Path, earlier: frozenset[str] = frozenset()) -> list[dict]:
    """`earlier`: components an earlier iteration selected an image of (training rows then, not now)."""
    rows = _read_csv(run_dir / "mined_training_rows.csv")
    with (run_dir / "mined_training_rows.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == ["input_path", "golden_path", "label", "object_name", "boardname"]
    assert all(r["input_path"] == BOARD and r["golden_path"] == GOLDEN for r in rows)
    # one row per component, labels in ChangeNet's case
    assert len({r["object_name"] for r in rows}) == len(rows)
    assert {r["label"] for r in rows} <= {"PASS", "missing", "short", "solder_bridge"}
    assert "C3" not in {r["object_name"] for r in rows}  # the validation set's component: left out
    mined = {Path(p).name.split("_")[0] for p in pq.read_table(run_dir / "mined.parquet").column("filepath").to_pylist()}
    assert {r["object_name"] for r in rows} == mined - {"C3"} - earlier
    if rows:  # the loop's validator refuses a CSV of no rows (nothing to append)
        _validator_accepts(tmp, ws, run_dir / "mined_training_rows.csv")
    return rows


def _skill_ledger(ws: Path, tmp: Path) -> dict:
    """The ledger as the skill's own validation reads it (hashes and all)."""
    spec = importlib.util.spec_from_file_location("filter_mined_history", _skill_script(tmp, "history"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ledger = ws / "results/mining_history.json"
    return module._validated_history(ledger, len(json.loads(ledger.read_text())["iterations"]) + 1)


def test_two_rounds_of_the_deft_loop_on_a_changenet_workspace(workspace: Path, tmp_path: Path) -> None:
    ws = workspace
    common = {"images_dir": str(ws), "lights": list(LIGHTS), "validation_csv": str(ws / "validation_set.csv"),
              "history": str(ws / "results/mining_history.json")}
    overrides = ["model=thumbnail", "topn=1", "min_similarity=0.5", "filter_by_label=true"]
    # Round 2: the command line.
    proc = subprocess.run([str(BIN / "deft-mine"), "run", "--targets", str(ws / "targets.csv"),
                           "--source", str(ws / "augmentation/mining_pool/mining_pool.csv"),
                           "--output-dir", str(ws / "results/iter2"), "--images-dir", common["images_dir"],
                           *(arg for light in LIGHTS for arg in ("--light", light)),
                           "--validation-csv", common["validation_csv"], "--history", common["history"],
                           *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    second = Path(proc.stdout.strip().splitlines()[-1])
    history = _loop_counts_hold(second, iteration=2)
    assert history["history_count_before"] == 1
    rows = _training_rows_hold(second, ws, tmp_path)
    # C5's SolderLight image was mined in iteration 1: no mined image of round 2 is it
    assert f"{BOARD}/C5_SolderLight.jpg" not in pq.read_table(second / "mined.parquet").column("filepath").to_pylist()
    manifest = json.loads((second / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["training_rows"]["rows"] == len(rows)
    assert manifest["training_rows"]["leaks"] == 1  # C3, held by the validation set
    # Round 3: MCP, continuing the same skill ledger.
    earlier = frozenset(Path(p).name.split("_")[0] for it in json.loads(Path(common["history"]).read_text())[
        "iterations"] for p in it["selected_filepaths"])
    with SyncClient(stdio_params(ws)) as client:
        result = ok(client.call("run", {
            "targets": str(ws / "targets.csv"), "source": str(ws / "augmentation/mining_pool/mining_pool.csv"),
            "output_dir": str(ws / "results/iter3"), **common,
            "overrides": {"model": "thumbnail", "topn": 3, "min_similarity": 0.5, "filter_by_label": "true"}}))
    third = Path(result["run_dir"])
    history = _loop_counts_hold(third, iteration=3)
    assert history["history_count_before"] == 1 + json.loads((second / "mining_history_summary.json").read_text())[
        "selected_count"]
    rows3 = _training_rows_hold(third, ws, tmp_path, earlier)
    assert {r["object_name"] for r in rows3} == {"C2", "C4"}  # the noisier copies; C5 was iteration 1's
    # a component is a training row once across rounds: none of round 3's is one of round 2's
    assert not {r["object_name"] for r in rows3} & {r["object_name"] for r in rows}
    mined3 = {Path(p).name.split("_")[0] for p in pq.read_table(third / "mined.parquet").column("filepath").to_pylist()}
    assert result["training_rows"]["left_out_by_reason"].get("trained_before", 0) == len(mined3 & earlier) > 0
    ledger = _skill_ledger(ws, tmp_path)
    assert [it["iteration"] for it in ledger["iterations"]] == [1, 2, 3]
    selected = [p for it in ledger["iterations"] for p in it["selected_filepaths"]]
    assert len(selected) == len(set(selected)) == ledger["cumulative_unique_count"]
