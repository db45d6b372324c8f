"""The node tools `make test` installs under .tools/ (npm): Node 22, the MCP Inspector and the MCP
conformance suite. Both need Node >= 22, which the runner's own node may not be, so every call
runs with .tools/node_modules/.bin first on PATH (the npm package `node-linux-*` puts a Node 22
there), and a tool counts as present only when the node it would run is new enough."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from mcp_helpers import REPO

BIN = REPO / ".tools" / "node_modules" / ".bin"
NODE_MAJOR = 22


def env() -> dict[str, str]:
    """The tests' environment with .tools' binaries (its Node 22 first) on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}


@functools.cache
def node_major() -> int | None:
    """The major version of the node a tool's `#!/usr/bin/env node` finds, or None."""
    node = shutil.which("node", path=env()["PATH"])
    if node is None:
        return None
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    match = re.match(r"v(\d+)\.", done.stdout.strip())
    return int(match.group(1)) if match else None


def tool(name: str, override_env: str | None = None) -> Path | None:
    """A tool's binary ($override_env if set, else .tools'), or None when it or a new enough node is missing."""
    configured = os.environ.get(override_env) if override_env else None
    candidate = Path(configured) if configured else BIN / name
    if not candidate.is_file() or (node_major() or 0) < NODE_MAJOR:
        return None
    return candidate


def missing(name: str) -> str:
    return (f"{name} not usable: it needs {BIN / name} (npm; `make test` installs it) and node >= {NODE_MAJOR} "
            f"on PATH (found: {node_major() or 'none'}; make test installs one under .tools)")
