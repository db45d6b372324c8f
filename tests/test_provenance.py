"""A run folder's provenance: mining_config/ (the specs as resolved, versions and device, the
call that made the run) and session.jsonl (the MCP session's calls, or the command line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deft_mine.tools import report, run

BIN = Path(sys.executable).parent
THUMB = {"model": "thumbnail", "topn": 2}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_packs_its_specs_versions_device_and_call(image_set: Path) -> None:
    result = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r", overrides=THUMB)
    config = Path(result.run_dir) / "mining_config"
    assert (config / "mining_spec.yaml").read_text() == (image_set / "r" / "mining_spec.yaml").read_text()
    assert "model: thumbnail" in (config / "embedding_spec.yaml").read_text()
    environment = _json(config / "environment.json")
    assert environment["recorded_by"] == "the run" and environment["python"].count(".") == 2
    assert {"pyarrow", "numpy"} <= set(environment["packages"]) and environment["device"]["cpu"]
    produced = _json(config / "invocation.json")["produced_by"]
    assert produced["via"] == "python" and produced["tool"] == "run"
    assert produced["arguments"]["overrides"] == THUMB and produced["arguments"]["targets"].endswith("targets.parquet")
    assert result.report.provenance_unavailable == []
    # Nothing secret: named facts only, no environment dump.
    assert set(environment) == {"recorded_by", "deft_mine", "python", "packages", "device", "host", "backend"}
    assert environment["backend"] == {"name": "local", "embed_target": {"device": "cpu"},
                                      "embed_source": {"device": "cpu"}}


def test_a_later_report_keeps_the_call_that_made_the_run(image_set: Path) -> None:
    folder = Path(run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                      overrides=THUMB).run_dir)
    before = (folder / "mining_config" / "invocation.json").read_text()
    again = report(folder)
    assert (folder / "mining_config" / "invocation.json").read_text() == before
    assert again.provenance_unavailable == []


def test_an_older_run_folder_gets_what_can_be_known_and_says_what_cannot(image_set: Path) -> None:
    folder = Path(run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                      overrides=THUMB).run_dir)
    for name in ("environment.json", "invocation.json"):  # as a folder written before provenance was
        (folder / "mining_config" / name).unlink()
    (folder / "embedding_spec.yaml").unlink()
    result = report(folder)
    said = " ".join(result.provenance_unavailable)
    assert "embedding_spec.yaml" in said and "the call that made the run" in said and "at run time" in said
    called = _json(folder / "mining_config" / "invocation.json")
    assert called["produced_by"] is None and called["report_by"]["tool"] == "report"
    assert _json(folder / "mining_config" / "environment.json")["recorded_by"].startswith("a later report")
    assert "provenance unavailable" in result.text()


@pytest.mark.e2e
def test_from_the_command_line_the_session_is_the_command(image_set: Path) -> None:
    argv = [str(BIN / "deft-mine"), "run", "--targets", str(image_set / "targets.parquet"), "--source",
            str(image_set / "pool.parquet"), "--run-dir", str(image_set / "r"), "model=thumbnail", "topn=2"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (line,) = _lines(image_set / "r" / "session.jsonl")
    assert line["via"] == "cli" and line["command"] == ["deft-mine", *argv[1:]]
    assert _json(image_set / "r" / "mining_config" / "invocation.json")["produced_by"]["command"] == line["command"]


@pytest.mark.e2e
def test_over_mcp_session_jsonl_replays_the_calls_that_led_to_the_run(image_set: Path) -> None:
    from mcp_helpers import SyncClient, ok, refused, stdio_params

    with SyncClient(stdio_params(image_set)) as client:
        ok(client.call("preflight", {"targets": str(image_set / "targets.parquet"),
                                     "source": str(image_set / "pool.parquet")}))
        refused(client.call("run", {"targets": str(image_set / "targets.parquet"), "source": str(image_set / "pool.parquet"),
                                    "run_dir": str(image_set / "r"), "overrides": {"top_n": 2}}), "spec_unknown_key")
        done = ok(client.call("run", {"targets": str(image_set / "targets.parquet"),
                                      "source": str(image_set / "pool.parquet"),
                                      "run_dir": str(image_set / "r"), "overrides": THUMB}))
        ok(client.call("report", {"run_dir": done["run_dir"]}))  # after the run: appended as it ends
    lines = _lines(Path(done["run_dir"]) / "session.jsonl")
    assert [(x["tool"], x["outcome"], x["code"]) for x in lines] == [
        ("preflight", "ok", None), ("run", "refused", "spec_unknown_key"), ("run", "ok", None), ("report", "ok", None)]
    assert lines[2]["run_dir"] == done["run_dir"] and lines[2]["arguments"]["overrides"] == THUMB
    assert all(x["via"] == "mcp" and x["time"] for x in lines)
    produced = _json(Path(done["run_dir"]) / "mining_config" / "invocation.json")["produced_by"]
    assert produced == {"via": "mcp", "tool": "run", "arguments": lines[2]["arguments"]}


@pytest.mark.parametrize("name", ["mining_config", "session.jsonl"])
def test_attack_symlink_in_the_run_folder_pointing_outside_is_refused(image_set: Path, tmp_path_factory, name: str):
    """A run folder whose mining_config/ or session.jsonl is a link out would have the report
    write through it, outside the roots: refused by name, nothing written there."""
    from deft_mine.errors import DeftError

    folder = Path(run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "r",
                      overrides=THUMB).run_dir)
    outside = tmp_path_factory.mktemp("outside")
    target = outside / ("config" if name == "mining_config" else "victim.txt")
    if name == "mining_config":
        target.mkdir()
        import shutil
        shutil.rmtree(folder / name)
    else:
        target.write_text("")
        (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)
    with pytest.raises(DeftError) as exc:
        report(folder)
    assert exc.value.code == "run_dir_invalid" and exc.value.details["path"] == str(folder / name)
    assert (list(target.iterdir()) == [] if target.is_dir() else target.read_text() == "")
