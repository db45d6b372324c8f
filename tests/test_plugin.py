"""The Claude Code plugin shipped at the repository root: its manifest, marketplace entry, `.mcp.json`
(which must start a server that answers), and the skill, whose every backticked name must be real:
a tool, a tool argument, a warning or error code, a result field, a spec key or a run-folder file.
The MCP prompts' text is held to the same vocabulary."""

from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mcp.client.stdio import StdioServerParameters

from deft_mine import __version__, prompts
from deft_mine.report.render import SUMMARY_MEANING
from deft_mine.schemas import artifacts
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec
from deft_mine.schemas.warnings import WarningCode
from deft_mine.tools import TOOLS
from mcp_helpers import REPO, SyncClient, TOOL_NAMES, deft_mine_command, ok, refused, server_env

SKILL = REPO / "skills" / "deft-mine"
MCP_TOOLS = {name: tool for name, tool in TOOLS.items() if tool.mcp}


# --------------------------------------------------------------------------- the vocabulary

def error_codes() -> set[str]:
    """Every code a refusal may carry: the first argument of each DeftError(...) in src, and the
    adapters' own ErrorInfo(code=...)."""
    codes: set[str] = set()
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        codes |= set(re.findall(r'DeftError\(\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'ErrorInfo\(\s*code="([a-z_]+)"', text))
    return codes


def _schema_properties(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        yield from schema.get("properties", {}) if isinstance(schema.get("properties"), dict) else ()
        for value in schema.values():
            yield from _schema_properties(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _schema_properties(value)


ARGUMENTS = {name: set(tool.input.model_fields) for name, tool in MCP_TOOLS.items()}
WARNING_CODES = set(typing.get_args(WarningCode))
ERROR_CODES = error_codes()
RESULT_FIELDS = {field for tool in MCP_TOOLS.values() for field in _schema_properties(tool.result.model_json_schema())}
SPEC_KEYS = set(EmbeddingSpec.model_fields) | set(MiningSpec.model_fields)
FILES = {value for name, value in vars(artifacts).items() if name.isupper() and isinstance(value, str)}
SUMMARY_KEYS = set(SUMMARY_MEANING)  # the keys of mining_summary.txt, as the report explains them
#: Names the texts may use that are none of the above: column names, values of fields, the
#: run folder's parent, the report's pictures, the MCP wire's own words.
OTHER = {"filepath", "label", "embedding", "score", "best_target", "hits", "mining_results", "ok", "attention",
         "failed", "off", "applied", "noop", "closest", "contact_sheet.png", "isError", "code", "message", "fix",
         "count", "by_reason", "examples", ".pth", ".ckpt"}
KNOWN = set(MCP_TOOLS) | set().union(*ARGUMENTS.values()) | WARNING_CODES | ERROR_CODES | RESULT_FIELDS | SPEC_KEYS \
    | FILES | SUMMARY_KEYS | OTHER


def unknown_names(text: str) -> list[str]:
    """What a text names in backticks that does not exist: `tool(arg, arg=value)` must be a tool
    with those arguments, `{json}` must hold spec keys, `a/b/c` path segments and `a=b` settings
    their names, and any other token must be known."""
    problems: list[str] = []
    for token in re.findall(r"`([^`]+)`", text):
        call = re.fullmatch(r"([a-z_]+)\((.*)\)", token)
        if call:
            name, args = call.groups()
            if name not in MCP_TOOLS:
                problems.append(f"{token}: no tool {name}")
                continue
            for arg in filter(None, (a.split("=")[0].strip() for a in args.split(","))):
                if arg not in ARGUMENTS[name]:
                    problems.append(f"{token}: {name} has no argument {arg}")
        elif token.startswith("{"):
            problems += [f"{token}: no spec key {key}" for key in json.loads(token) if key not in SPEC_KEYS]
        elif "/" in token:
            problems += [f"{token}: {part}?" for part in token.strip("/").split("/")
                         if not part.startswith("<") and part not in KNOWN]
        elif "=" in token:
            key = token.split("=")[0]
            problems += [] if key in KNOWN else [f"{token}: {key}?"]
        elif token not in KNOWN and not token.startswith("deft-mine://"):
            problems.append(token)
    return problems


def skill_texts() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in sorted(SKILL.rglob("*.md"))}


# --------------------------------------------------------------------------- the skill

def frontmatter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "SKILL.md must open with YAML frontmatter between --- lines"
    return yaml.safe_load(match.group(1))


def test_skill_frontmatter_and_references() -> None:
    text = (SKILL / "SKILL.md").read_text(encoding="utf-8")
    meta = frontmatter(text)
    assert meta["name"] == SKILL.name == "deft-mine"
    assert 50 < len(meta["description"]) <= 1024  # what Claude reads to decide when to load the skill
    referenced = set(re.findall(r"(?<![/\w])references/[a-z-]+\.md", text))
    assert referenced == {f"references/{p.name}" for p in (SKILL / "references").glob("*.md")}
    assert len(text.split()) < 1200, "the skill should stay short: details belong in references/"


@pytest.mark.parametrize("name", sorted(skill_texts()))
def test_skill_names_only_real_tools_arguments_and_codes(name: str) -> None:
    assert unknown_names(skill_texts()[name]) == []


def test_skill_covers_the_workflow() -> None:
    text = "\n".join(skill_texts().values())
    for tool in ("preflight", "run", "embed", "mine", "report", "select"):
        assert f"`{tool}" in text, tool
    for code in ("filter_by_label_noop", "provenance_unknown", "pool_exhausted", "images_skipped",
                 "target_in_pool", "encoder_mismatch", "selection_empty"):
        assert f"`{code}`" in text, code
    assert "`history`" in text and "`session_encoder`" in text


def test_the_checker_catches_invented_names() -> None:
    assert unknown_names("`run(targets, sauce)` `mine_everything` `{\"modle\": 1}` `preflight(backend)`") == [
        "run(targets, sauce): run has no argument sauce", "mine_everything", '{"modle": 1}: no spec key modle']


@pytest.mark.parametrize("prompt", prompts.PROMPTS, ids=lambda p: p.__name__)
def test_prompts_name_only_real_tools_arguments_and_codes(prompt: Any) -> None:
    text = prompt(targets="t.parquet", source="s.parquet", ledger="l.json", model="DINOv2")
    assert unknown_names(text) == []


# --------------------------------------------------------------------------- manifest and server

def test_plugin_manifest_and_marketplace() -> None:
    manifest = json.loads((REPO / ".claude-plugin" / "plugin.json").read_text())
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", manifest["name"]) and manifest["name"] == "deft-mine"
    assert manifest["version"] == __version__ and manifest["description"]
    marketplace = json.loads((REPO / ".claude-plugin" / "marketplace.json").read_text())
    assert marketplace["name"] and marketplace["owner"]["name"]
    assert [(p["name"], p["source"]) for p in marketplace["plugins"]] == [("deft-mine", "./")]


def expand(value: str, environ: dict[str, str]) -> str:
    """`${VAR}` and `${VAR:-default}` as Claude Code expands them in .mcp.json."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}",
                  lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def mcp_json_server(environ: dict[str, str], cwd: Path) -> StdioServerParameters:
    """The server as Claude Code starts it from .mcp.json: `deft-mine` from the user's install
    (pipx, uv tool) on PATH, here the venv's; the variables expanded; in the working directory
    Claude Code happens to give it (the plugin's folder, for a user-scope install)."""
    config = json.loads((REPO / ".mcp.json").read_text())["mcpServers"]["deft-mine"]
    path = f"{Path(deft_mine_command()).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**server_env(), **{k: expand(v, environ) for k, v in config.get("env", {}).items()}, "PATH": path}
    env.pop("CLAUDE_PROJECT_DIR", None)
    return StdioServerParameters(command=config["command"], args=[expand(a, environ) for a in config["args"]],
                                 env={**env, **environ}, cwd=str(cwd))


@pytest.mark.e2e
@pytest.mark.parametrize("project_dir_set", [True, False], ids=["CLAUDE_PROJECT_DIR", "working-directory"])
def test_mcp_json_serves_the_project_folder(image_set: Path, tmp_path_factory: pytest.TempPathFactory,
                                            project_dir_set: bool) -> None:
    """Claude Code passes the project in $CLAUDE_PROJECT_DIR; without it the server's working
    directory (the project, for a project-scope install) is the root."""
    environ = {"CLAUDE_PROJECT_DIR": str(image_set)} if project_dir_set else {}
    cwd = tmp_path_factory.mktemp("plugin_cache") if project_dir_set else image_set
    with SyncClient(mcp_json_server(environ, cwd)) as client:
        assert sorted(t.name for t in client.run(client.client.list_tools).tools) == TOOL_NAMES
        checked = ok(client.call("preflight", {"targets": "targets.parquet", "source": "pool.parquet"}))
        refused(client.call("preflight", {"targets": str(image_set.parent / "elsewhere.parquet")}),
                "path_outside_roots")
    assert checked["ok"] is True
