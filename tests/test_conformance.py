"""The official MCP conformance suite (npm @modelcontextprotocol/conformance, pinned in the Makefile)
against `deft-mine serve --transport streamable-http`: every server scenario that applies to a
server with our capabilities must pass all its checks.

Most of the suite's server scenarios call fixtures of its reference server (tools named
`test_simple_text`, prompts named `test_simple_prompt`, resources under `test://`); those do not
apply to a server that has its own tools, prompts and resources, and NOT_APPLICABLE says why for
each (the README lists the same). A suite release that adds a scenario fails
test_every_scenario_is_judged until it is put in one list or the other.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import node_tools
from mcp_helpers import deft_mine_command, free_port, server_env, stop, wait_for_port

CONFORMANCE = node_tools.tool("conformance", "DEFT_MCP_CONFORMANCE")
pytestmark = [
    pytest.mark.e2e,  # runs node (the suite) against a spawned HTTP server
    pytest.mark.skipif(CONFORMANCE is None, reason=node_tools.missing("conformance")),
]

APPLIES = [
    "server-initialize",  # lifecycle: initialize → initialized
    "ping",
    "tools-list",  # our seven tools with their input and output schemas
    "logging-set-level",  # we send log notifications, so we declare logging and honour logging/setLevel
    "resources-list",  # references/*.md as resources
    "prompts-list",  # first_round, next_round
    "server-sse-multiple-streams",  # several POSTs of one session, each with its own SSE stream
    "dns-rebinding-protection",  # a loopback server refuses a foreign Host/Origin
]
_FIXTURE = "calls the suite's reference-server fixture {}; deft-mine has no such {}"
NOT_APPLICABLE = {
    "completion-complete": "we declare no completions capability (the scenario completes the fixture "
                           "prompt test_prompt_with_arguments)",
    "tools-call-simple-text": _FIXTURE.format("test_simple_text", "tool"),
    "tools-call-image": _FIXTURE.format("test_image_content", "tool"),
    "tools-call-audio": _FIXTURE.format("test_audio_content", "tool"),
    "tools-call-embedded-resource": _FIXTURE.format("test_embedded_resource", "tool"),
    "tools-call-mixed-content": _FIXTURE.format("test_multiple_content_types", "tool"),
    "tools-call-with-logging": _FIXTURE.format("test_tool_with_logging", "tool") + " (our tools' log "
                               "notifications are tested in test_mcp_server and test_mcp_prompts)",
    "tools-call-error": _FIXTURE.format("test_error_handling", "tool") + " (refusals: test_mcp_server)",
    "tools-call-with-progress": _FIXTURE.format("test_tool_with_progress", "tool") + " (our progress "
                                "notifications: test_mcp_server)",
    "tools-call-sampling": "we never ask the client to sample (the fixture tool test_sampling)",
    "tools-call-elicitation": "we never elicit input from the user (the fixture tool test_elicitation)",
    "elicitation-sep1034-defaults": "we never elicit input (the fixture tool test_elicitation_sep1034_defaults)",
    "elicitation-sep1330-enums": "we never elicit input (the fixture tool test_elicitation_sep1330_enums)",
    "json-schema-2020-12": _FIXTURE.format("json_schema_2020_12_tool", "tool") + " (pending in the suite)",
    "server-sse-polling": _FIXTURE.format("test_reconnection", "tool") + " (pending in the suite)",
    "resources-read-text": _FIXTURE.format("resource test://static-text", "resource") + " (ours are read "
                           "in test_mcp_server)",
    "resources-read-binary": _FIXTURE.format("resource test://static-binary", "resource"),
    "resources-templates-read": "we have no resource templates (the fixture test://template/{id}/data)",
    "resources-subscribe": "we declare no resource subscriptions (our references do not change)",
    "resources-unsubscribe": "we declare no resource subscriptions (our references do not change)",
    "prompts-get-simple": _FIXTURE.format("test_simple_prompt", "prompt") + " (ours: test_mcp_prompts)",
    "prompts-get-with-args": _FIXTURE.format("test_prompt_with_arguments", "prompt") + " (ours: test_mcp_prompts)",
    "prompts-get-embedded-resource": _FIXTURE.format("test_prompt_with_embedded_resource", "prompt"),
    "prompts-get-with-image": _FIXTURE.format("test_prompt_with_image", "prompt"),
}


def conformance(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONFORMANCE), *args], capture_output=True, text=True, timeout=timeout,
                          env=node_tools.env())


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("conformance")
    port = free_port()
    log = (root.parent / "conformance_server.log").open("w")
    process = subprocess.Popen(
        [deft_mine_command(), "serve", "--transport", "streamable-http", "--port", str(port), "--root", str(root)],
        cwd=root, env=server_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(process)
        log.close()


def test_every_scenario_is_judged() -> None:
    listed = conformance("list", "--server")
    assert listed.returncode == 0, listed.stderr
    scenarios = set(re.findall(r"^\s*-\s+(\S+)", listed.stdout, flags=re.MULTILINE))
    assert scenarios, listed.stdout
    assert not set(APPLIES) & NOT_APPLICABLE.keys()
    assert scenarios == set(APPLIES) | NOT_APPLICABLE.keys(), (
        f"new in the suite: {sorted(scenarios - set(APPLIES) - NOT_APPLICABLE.keys())}; "
        f"gone from it: {sorted(set(APPLIES) | NOT_APPLICABLE.keys() - scenarios)}")


@pytest.mark.parametrize("scenario", APPLIES)
def test_scenario_passes(url: str, scenario: str, tmp_path: Path) -> None:
    done = conformance("server", "--url", url, "--scenario", scenario, "--output-dir", str(tmp_path))
    checks = [check for found in tmp_path.glob("*/checks.json") for check in json.loads(found.read_text())]
    failed = [c for c in checks if c["status"] != "SUCCESS"]
    assert done.returncode == 0 and checks and not failed, (
        f"{scenario}: exit {done.returncode}\n{json.dumps(failed or checks, indent=1)}\n{done.stdout[-2000:]}"
        f"\n{done.stderr[-2000:]}")
