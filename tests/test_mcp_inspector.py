"""The MCP Inspector CLI (npm @modelcontextprotocol/inspector, a TypeScript-SDK client) drives the
stdio server: a second, independent client implementation on the wire.

The binary comes from $DEFT_MCP_INSPECTOR, else <repo>/.tools/node_modules/.bin/mcp-inspector
(`make test` installs it there, with the Node 22 it needs); without either the tests are skipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import node_tools
from mcp_helpers import TOOL_NAMES, deft_mine_command

INSPECTOR = node_tools.tool("mcp-inspector", "DEFT_MCP_INSPECTOR")
#: Inspector 2.x exits with this code when the called tool answered isError (the result still on stdout).
TOOL_IS_ERROR = 5
pytestmark = [
    pytest.mark.e2e,  # runs node (the Inspector), which spawns `deft-mine serve`
    pytest.mark.skipif(INSPECTOR is None, reason=node_tools.missing("mcp-inspector")),
]


def inspect(root: Path, *method_args: str) -> subprocess.CompletedProcess:
    """`mcp-inspector --cli deft-mine serve --root ROOT --method ...`, run in ROOT."""
    command = [str(INSPECTOR), "--cli", "-e", "HF_HUB_OFFLINE=1", deft_mine_command(), "serve", "--root", str(root),
               *method_args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, env=node_tools.env())


def result_of(done: subprocess.CompletedProcess, expected_exit: int = 0) -> dict:
    assert done.returncode == expected_exit, (
        f"mcp-inspector exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def test_inspector_lists_the_tools(image_set: Path) -> None:
    # --strict: the Inspector also judges each tool schema's portability across clients (exit 6 on an error)
    listed = result_of(inspect(image_set, "--method", "tools/list", "--strict"))
    assert sorted(t["name"] for t in listed["tools"]) == TOOL_NAMES
    assert all(t["outputSchema"]["type"] == "object" for t in listed["tools"])


def test_inspector_gets_a_prompt_with_arguments(image_set: Path) -> None:
    got = result_of(inspect(image_set, "--method", "prompts/get", "--prompt-name", "next_round",
                            "--prompt-args", "targets=weak.parquet", "source=pool.parquet", "ledger=runs/ledger.json"))
    text = got["messages"][0]["content"]["text"]
    assert 'history="runs/ledger.json"' in text and "weak.parquet" in text


def test_inspector_calls_preflight(image_set: Path) -> None:
    result = result_of(inspect(image_set, "--method", "tools/call", "--tool-name", "preflight"))
    assert result.get("isError") is False
    assert result["structuredContent"]["ok"] is True
    assert result["structuredContent"]["backend"] == "local"
    assert result["content"][0]["text"].startswith("ready (local)")


def test_inspector_runs_the_workflow(image_set: Path) -> None:
    result = result_of(inspect(
        image_set, "--method", "tools/call", "--tool-name", "run",
        "--tool-arg", "targets=targets.parquet", "--tool-arg", "source=pool.parquet",
        "--tool-arg", "output_dir=out", "--tool-arg", 'overrides={"model":"thumbnail","topn":2}'))
    assert result.get("isError") is False
    run_dir = Path(result["structuredContent"]["run_dir"])
    assert run_dir.parent == image_set / "out" / "mining_results"
    assert result["structuredContent"]["mined"] == 4
    assert pq.read_table(run_dir / "mined.parquet").num_rows == 4
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_inspector_sees_a_refusal_with_its_code(image_set: Path) -> None:
    result = result_of(inspect(
        image_set, "--method", "tools/call", "--tool-name", "embed",
        "--tool-arg", "input_parquet=pool.parquet", "--tool-arg", "output_parquet=../escaped.parquet"),
        expected_exit=TOOL_IS_ERROR)
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("path_outside_roots: ")
    assert not (image_set.parent / "escaped.parquet").exists()
