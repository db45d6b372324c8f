"""The install paths the README gives: `pipx install .`, `uv tool install .` and `uvx --from .`, each
into a temporary home, with the CPU build of torch (never CUDA's gigabytes), giving working
`deft-mine` and `deft-mine-task` commands whose server answers tools/list; and server.json, the
MCP registry's description of the server, valid against the registry's schema.

pipx and uv come from <repo>/.tools/python (`make test` installs them there, out of the venv);
the schema from the skillsaw wheel in .tools/wheels, which ships the registry's released schemas.
Where this machine's pip finds a local CPU torch wheel (its find-links), uv is pointed there too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from deft_mine import __version__
from mcp.client.stdio import StdioServerParameters

from mcp_helpers import REPO, TOOL_NAMES, SyncClient, server_env

TOOLS = REPO / ".tools" / "python"
SCHEMA_WHEEL = REPO / ".tools" / "wheels" / "skillsaw-0.22.0-py3-none-any.whl"
SCHEMA_IN_WHEEL = "skillsaw/schemas/mcp_registry/v2025_12_11/server.schema.json"
UV = TOOLS / "bin" / "uv"
INSTALL_TIMEOUT = 600


def _needs(path: Path, what: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{what} not found at {path} (make test installs it)")


def pip_find_links() -> str:
    """Where this machine's pip finds wheels besides the index (PIP_FIND_LINKS or pip's config)."""
    found = os.environ.get("PIP_FIND_LINKS")
    if not found:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                              capture_output=True, text=True)
        found = done.stdout.strip() if done.returncode == 0 else ""
    return found


def cpu_torch_constraint(tmp: Path) -> Path:
    """constraints.txt plus the exact CPU torch the test venv has (installed through it), so that
    uv, which reads no pip configuration, takes the same CPU build and not CUDA's."""
    text = (REPO / "constraints.txt").read_text()
    if "+cpu" in torch.__version__:
        text += f"\ntorch=={torch.__version__}\n"
    path = tmp / "constraints.txt"
    path.write_text(text)
    return path


def tool_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(TOOLS), "PIPX_HOME": str(tmp / "pipx"), "PIPX_BIN_DIR": str(tmp / "bin"),
           "PIPX_MAN_DIR": str(tmp / "man"), "UV_TOOL_DIR": str(tmp / "uv-tools"), "UV_TOOL_BIN_DIR": str(tmp / "bin")}
    if pip_find_links():
        env["UV_FIND_LINKS"] = pip_find_links()
    env.pop("VIRTUAL_ENV", None)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def check_commands(bin_dir: Path, root: Path) -> None:
    """deft-mine --version, deft-mine-task --cfg=job and an MCP server that answers tools/list."""
    version = run([str(bin_dir / "deft-mine"), "--version"], server_env())
    assert version.stdout.strip() == f"deft-mine {__version__}"
    spec = root / "mining_spec.yaml"
    spec.write_text("topn: 7\n")
    job = run([str(bin_dir / "deft-mine-task"), "tmm", "nearest_neighbors", "-e", str(spec), "--cfg=job"], server_env())
    assert "topn: 7" in job.stdout
    answers_tools_list(StdioServerParameters(command=str(bin_dir / "deft-mine"), args=["serve", "--root", str(root)],
                                             cwd=str(root), env=server_env()))


def answers_tools_list(params: StdioServerParameters) -> None:
    with SyncClient(params, read_timeout_seconds=300) as client:
        assert sorted(t.name for t in client.run(client.client.list_tools).tools) == TOOL_NAMES


def installed_torch(python: Path) -> str:
    done = run([str(python), "-c", "import torch; print(torch.__version__)"], server_env())
    return done.stdout.strip()


@pytest.mark.e2e
@_needs(TOOLS / "pipx", "pipx")
def test_pipx_install(tmp_path: Path) -> None:
    env = tool_env(tmp_path)
    # --backend pip: pipx's classic installer, which honours pip's configuration as a user's pip does
    run([sys.executable, "-m", "pipx", "install", "--backend", "pip", "--python", sys.executable,
         "--pip-args", f"-c {REPO / 'constraints.txt'}", str(REPO)], env)
    assert "+cu" not in installed_torch(tmp_path / "pipx" / "venvs" / "deft-mine" / "bin" / "python")
    check_commands(tmp_path / "bin", tmp_path)


@pytest.mark.e2e
@_needs(UV, "uv")
def test_uv_tool_install(tmp_path: Path) -> None:
    env = tool_env(tmp_path)
    run([str(UV), "tool", "install", "--python", sys.executable, "-c", str(cpu_torch_constraint(tmp_path)),
         str(REPO)], env)
    assert "+cu" not in installed_torch(tmp_path / "uv-tools" / "deft-mine" / "bin" / "python")
    check_commands(tmp_path / "bin", tmp_path)


@pytest.mark.e2e
@_needs(UV, "uv")
def test_uvx_from_the_checkout_serves(tmp_path: Path) -> None:
    env = tool_env(tmp_path)
    constraint = cpu_torch_constraint(tmp_path)
    uvx = [str(UV), "tool", "run", "--python", sys.executable, "-c", str(constraint), "--from", str(REPO)]
    assert run([*uvx, "deft-mine", "--version"], env).stdout.strip() == f"deft-mine {__version__}"
    answers_tools_list(StdioServerParameters(command=uvx[0], args=[*uvx[1:], "deft-mine", "serve", "--root", str(tmp_path)],
                                             cwd=str(tmp_path), env={**server_env(), **env}))


# --------------------------------------------------------------------------- server.json

def test_server_json_describes_the_server() -> None:
    doc = json.loads((REPO / "server.json").read_text())
    assert doc["version"] == __version__
    assert {p["identifier"] for p in doc["packages"]} == {"deft-mine"}
    assert {p["transport"]["type"] for p in doc["packages"]} == {"stdio", "streamable-http"}
    for package in doc["packages"]:
        assert package["version"] == __version__ and package["registryType"] == "pypi"
        arguments = package["packageArguments"]
        assert arguments[0] == {"type": "positional", "value": "serve"}
        named = {a["name"] for a in arguments if a["type"] == "named"}
        assert "--root" in named
    # every named argument is one `deft-mine serve` takes
    from deft_mine.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    options = {flag for action in serve._actions for flag in action.option_strings}
    assert {a["name"] for p in doc["packages"] for a in p["packageArguments"] if a["type"] == "named"} <= options
    readme = (REPO / "README.md").read_text()
    assert f"mcp-name: {doc['name']}" in readme  # the registry's PyPI ownership check


@_needs(SCHEMA_WHEEL, "the MCP registry schema (skillsaw wheel)")
def test_server_json_is_valid_against_the_registry_schema() -> None:
    import jsonschema

    with zipfile.ZipFile(SCHEMA_WHEEL) as wheel:
        schema = json.loads(wheel.read(SCHEMA_IN_WHEEL))
    doc = json.loads((REPO / "server.json").read_text())
    assert doc["$schema"] == schema["$id"]
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    assert [e.message for e in validator.iter_errors(doc)] == []

