"""The MCP prompts (a first round; the next round with history) and the logging capability, over a
real client session with the spawned stdio server."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcp_helpers import LEGACY, SyncClient, ok, stdio_params

pytestmark = pytest.mark.e2e  # every test spawns `deft-mine serve`


def text_of(result) -> str:
    assert len(result.messages) == 1 and result.messages[0].role == "user", result
    return result.messages[0].content.text


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_prompts_are_listed_with_their_arguments(tmp_path: Path, mode: str) -> None:
    with SyncClient(stdio_params(tmp_path), mode=mode) as client:
        listed = client.run(client.client.list_prompts).prompts
    arguments = {p.name: {a.name: a.required for a in p.arguments or []} for p in listed}
    assert arguments == {
        "first_round": {"targets": True, "source": True, "output_dir": False, "model": False, "ledger": False},
        "next_round": {"targets": True, "source": True, "ledger": True, "output_dir": False, "model": False},
    }
    assert all(p.title and p.description for p in listed)
    assert all(a.description for p in listed for a in p.arguments or [])


def test_first_round_prompt_fills_in_the_arguments(tmp_path: Path) -> None:
    with SyncClient(stdio_params(tmp_path)) as client:
        plain = text_of(client.run(client.client.get_prompt, "first_round",
                                   {"targets": "weak.parquet", "source": "pool.csv"}))
        chosen = text_of(client.run(client.client.get_prompt, "first_round",
                                    {"targets": "weak.parquet", "source": "pool.csv", "output_dir": "rounds",
                                     "model": "DINOv2", "ledger": "rounds/ledger.json"}))
    assert 'targets="weak.parquet", source="pool.csv", output_dir="runs"' in plain
    assert "Without `history` this round is not recorded" in plain
    assert "`preflight`" in plain and "`run`" in plain and "`encoder_mismatch`" in plain
    assert 'output_dir="rounds", overrides={"model": "DINOv2"}, history="rounds/ledger.json"' in chosen
    assert "iteration 1" in chosen and "not recorded" not in chosen


def test_next_round_prompt_passes_the_ledger_as_history(tmp_path: Path) -> None:
    with SyncClient(stdio_params(tmp_path)) as client:
        text = text_of(client.run(client.client.get_prompt, "next_round",
                                  {"targets": "round3.parquet", "source": "pool.parquet", "ledger": "runs/ledger.json"}))
    assert 'targets="round3.parquet", source="pool.parquet", output_dir="runs", history="runs/ledger.json"' in text
    assert "`selection_empty`" in text and "`ledger_iteration_invalid`" in text


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_unknown_prompt_and_missing_argument_are_invalid_params(tmp_path: Path, mode: str) -> None:
    with SyncClient(stdio_params(tmp_path), mode=mode) as client:
        with pytest.raises(MCPError) as unknown:
            client.run(client.client.get_prompt, "no_such_prompt", {})
        with pytest.raises(MCPError) as missing:
            client.run(client.client.get_prompt, "next_round", {"targets": "t.parquet", "source": "s.parquet"})
        assert client.run(client.client.list_prompts).prompts  # the session goes on
    assert (unknown.value.error.code, unknown.value.error.message) == (INVALID_PARAMS, "Unknown prompt: no_such_prompt")
    assert missing.value.error.code == INVALID_PARAMS and "ledger" in missing.value.error.message


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # logging: deprecated in 2026-07-28
def test_logging_capability_and_set_level_are_honoured(image_set: Path) -> None:
    """A handshake-era client: the server declares logging; after logging/setLevel warning no info
    line arrives, after debug they do again. (2026-07-28 clients ask per request; the SDK filters.)"""
    arguments = {"targets": "targets.parquet", "source": "pool.parquet", "output_dir": "out",
                 "overrides": {"model": "thumbnail", "topn": 1}}
    with SyncClient(stdio_params(image_set), mode="legacy") as client:
        assert client.protocol_version == LEGACY
        assert client.client.server_capabilities.logging is not None
        client.run(client.client.set_logging_level, "warning")
        ok(client.call("run", arguments))
        quiet = [params for _, params in client.logs]
        client.run(client.client.set_logging_level, "debug")
        ok(client.call("run", arguments))
        loud = [params for _, params in client.logs[len(quiet):]]
    assert all(p.level not in ("debug", "info", "notice") for p in quiet), quiet
    assert any(p.level == "info" and str(p.data).startswith("run folder ") for p in loud), loud
