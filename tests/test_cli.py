"""The command lines end to end, as a person or a script runs them: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

# every test here runs the deft-mine / deft-mine-task console scripts as subprocesses
pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "deft-mine"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def task(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "deft-mine-task"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


RUN_FILES = {"Mining_Report.md", "contact_sheet.png", "score_histogram.png", "labels.png", "embedding_spec.yaml", "mining_spec.yaml", "target_embeddings.parquet",
             "source_embeddings.parquet", "mined.parquet", "mining_summary.txt", "run.json",
             "mined_pairs.parquet", "mining_config", "session.jsonl", "target_listing.parquet",
             "source_listing.parquet", "protected.parquet"}


def test_run_writes_a_timestamped_run_folder_and_prints_it_last(image_set):
    spec = image_set / "m.yaml"
    spec.write_text("topn: 2\nfilter_by_label: 'true'\n")
    proc = cli("run", "--targets", str(image_set / "targets.parquet"), "--source", str(image_set / "pool.parquet"),
               "--output-dir", str(image_set / "out"), "-m", str(spec), "model=thumbnail", "batch_size=2")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.is_absolute() and run_dir.parent == image_set / "out" / "mining_results"
    assert len(run_dir.name) == len("2026-11-24_101500") and run_dir.name[10] == "_"
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["inputs"]["targets"]["rows"] == 2 and manifest["inputs"]["source"]["has_label"]
    assert manifest["encoder"]["match"] and manifest["encoder"]["target"]["model"] == "thumbnail"
    assert manifest["mining"]["topn"] == 2 and manifest["mining"]["label_filter"] == "applied"
    # the container's block first ("Summary:", then indented lines), then ours, one `key: value` each
    summary = dict(line.strip().split(": ", 1) for line in (run_dir / "mining_summary.txt").read_text().splitlines()
                   if ": " in line)
    assert summary["Target queries"] == "2" and summary["Similar items per query"] == "2"
    assert summary["queries"] == "2" and summary["neighbours_requested"] == "4"
    assert int(summary["kept_pairs"]) + int(summary["dropped_pairs"]) == int(summary["pairs"])
    assert manifest["mining"]["summary"]["mined"] == pq.read_table(run_dir / "mined.parquet").num_rows
    assert manifest["mining"]["labels"]["targets"] == {"a": 1, "b": 1}
    assert set(manifest["timings"]) >= {"embed_targets", "embed_source", "mine", "total"}
    assert "model: thumbnail" in (run_dir / "embedding_spec.yaml").read_text()
    assert "topn: 2" in (run_dir / "mining_spec.yaml").read_text()
    # a second run never reuses the folder
    again = cli("run", "--targets", str(image_set / "targets.parquet"), "--source", str(image_set / "pool.parquet"),
                "--output-dir", str(image_set / "out"), "model=thumbnail", "-q")
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) != run_dir


def test_run_json_mode_prints_only_the_structured_result(image_set):
    proc = cli("run", "--json", "--targets", str(image_set / "targets.parquet"), "--source",
               str(image_set / "pool.parquet"), "--run-dir", str(image_set / "exact"), "model=thumbnail",
               "topn=1", "filter_by_label=true")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["run_dir"] == str(image_set / "exact")
    assert result["mine"]["summary"]["queries"] == 2
    # labelled targets and pool, 2 queries x topn 1 from a pool of 4, no target in the pool: nothing to warn of
    assert [w["code"] for w in result["warnings"]] == []
    # a non-empty run dir is refused, with the structured error on stdout and exit 2
    proc = cli("run", "--json", "--targets", str(image_set / "targets.parquet"), "--source",
               str(image_set / "pool.parquet"), "--run-dir", str(image_set / "exact"), "model=thumbnail")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["code"] == "run_dir_exists"


def test_user_errors_exit_2_with_the_field_and_fix(image_set):
    proc = cli("run", "--targets", str(image_set / "targets.parquet"), "--source", str(image_set / "pool.parquet"),
               "--output-dir", str(image_set / "out"), "model=thumbnail", "topm=3")
    assert proc.returncode == 2
    assert "spec_unknown_key" in proc.stderr and "'topn'" in proc.stderr and "fix:" in proc.stderr
    assert not (image_set / "out").exists()  # refused before any folder or work


def test_embed_then_mine_step_by_step_with_warnings_on_stderr(image_set):
    t, s, m = (str(image_set / n) for n in ("t.parquet", "s.parquet", "mined.parquet"))
    for src, dst in (("targets.parquet", t), ("pool.parquet", s)):
        proc = cli("embed", f"input_parquet={image_set / src}", f"output_parquet={dst}", "model=thumbnail")
        assert proc.returncode == 0, proc.stderr
        assert "columns: filepath, label" in proc.stdout
    proc = cli("mine", f"source_parquet={s}", f"target_parquet={t}", f"output_parquet={m}", "topn=3")
    assert proc.returncode == 0, proc.stderr
    assert "pool_exhausted" in proc.stderr and "pool_exhausted" not in proc.stdout
    proc = cli("mine", "--json", f"source_parquet={s}", f"target_parquet={t}", f"output_parquet={m}", "topn=1")
    result = json.loads(proc.stdout)
    assert result["mined"] == pq.read_table(m).num_rows and result["summary"]["pairs"] == 2


def test_tao_entrypoint_contract(image_set):
    spec = image_set / "embedding_spec.yaml"
    spec.write_text("model: thumbnail\nbatch_size: 4\ninput_parquet: ???\noutput_parquet: ???\n")
    proc = task("embedding", "image_embeddings", "-e", str(spec))
    assert proc.returncode == 2 and "input_parquet" in proc.stderr and "spec_missing_value" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "Execution status: FAIL"  # the line the TAO loop trusts
    proc = task("embedding", "image_embeddings", "-e", str(spec), "--cfg=job",
                f"input_parquet={image_set / 'targets.parquet'}", "output_parquet=x.parquet", "batch_size=2")
    assert proc.returncode == 0 and "batch_size: 2\n" in proc.stdout and "model: thumbnail" in proc.stdout
    assert "Execution status" not in proc.stdout  # --cfg=job answers a question; it runs nothing
    for src, dst in (("targets.parquet", "t.parquet"), ("pool.parquet", "s.parquet")):
        proc = task("embedding", "image_embeddings", "-e", str(spec),
                    f"input_parquet={image_set / src}", f"output_parquet={image_set / dst}")
        assert proc.returncode == 0, proc.stderr
    mining = image_set / "mining_spec.yaml"
    mining.write_text("topn: 1\nknn_metric: euclidean\nfilter_by_label: \"true\"\n")
    out = image_set / "results" / "mined.parquet"
    proc = task("tmm", "nearest_neighbors", "-e", str(mining), f"source_parquet={image_set / 's.parquet'}",
                f"target_parquet={image_set / 't.parquet'}", f"output_parquet={out}")
    assert proc.returncode == 0, proc.stderr
    assert "queries: 2" in proc.stdout and (out.parent / "mining_summary.txt").exists()
    assert proc.stdout.splitlines()[-1] == "Execution status: PASS"
    assert pq.read_table(out).schema.names[0] == "filepath"


@pytest.mark.parametrize("argv", [["embedding", "nearest_neighbors"], ["tmm", "image_embeddings"]])
def test_tao_entrypoint_refuses_unknown_tasks(argv):
    proc = task(*argv, "-e", "x.yaml")
    assert proc.returncode == 2 and "unknown task" in proc.stderr


def test_demo_runs_offline_and_reports_label_agreement(tmp_path):
    proc = cli("demo", "--output-dir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    line = next(l for l in proc.stdout.splitlines() if l.startswith("label agreement"))
    assert int(line.split(":")[1].split("%")[0]) >= 80  # thumbnails find the same defect class
