"""Helpers for the MCP tests: the real server as a subprocess, driven by the official SDK client.

The mcp 2.3 client (`mcp.Client`) is async; `SyncClient` runs one inside an anyio blocking
portal (an event loop on a helper thread), so tests and module-scoped fixtures stay plain
synchronous code while every byte still goes over the real transport.
"""

from __future__ import annotations

import difflib
import functools
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable

from anyio.from_thread import start_blocking_portal
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult, LoggingMessageNotificationParams
from PIL import Image

from deft_mine.server import ERROR_META_KEY

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).parent / "snapshots" / "tools.json"
REFERENCES = REPO / "src" / "deft_mine" / "references"
TOOL_NAMES = ["choose", "embed", "match", "mine", "preflight", "report", "run", "select", "store_info"]
#: The SDK default (`mode="auto"`) negotiates the newest protocol; "legacy" forces the
#: initialize handshake (2025-11-25), the era in which a connection is a session.
MODERN = "2026-07-28"
LEGACY = "2025-11-25"


def deft_mine_command() -> str:
    """The `deft-mine` console script of the interpreter running the tests (the venv's)."""
    beside = Path(sys.executable).with_name("deft-mine")
    if beside.is_file():
        return str(beside)
    found = shutil.which("deft-mine")
    if found is None:
        raise RuntimeError("cannot find the deft-mine command; install the package into the venv")
    return found


def server_env() -> dict[str, str]:
    """The environment of a spawned server: the tests' own (the SDK would pass only a small
    safe set), offline for model hubs."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def stdio_params(root: Path, cwd: Path | None = None) -> StdioServerParameters:
    """`deft-mine serve --root ROOT` over stdio, started in `cwd` (default: the root)."""
    return StdioServerParameters(command=deft_mine_command(), args=["serve", "--root", str(root)],
                                 cwd=str(cwd or root), env=server_env())


class SyncClient:
    """An `mcp.Client` (any transport) usable from synchronous code.

    Records every log notification (`logging/message`) the server sends in `self.logs`,
    each with the monotonic time it arrived. `mode` as for `mcp.Client`: "auto" (SDK
    default) or "legacy". `log_level` is the 2026-07-28 per-request opt-in for log
    notifications (without it a modern server sends none); handshake-era connections
    ignore it and get every level.
    """

    def __init__(self, server: Any, *, mode: str = "auto", log_level: str | None = "debug",
                 read_timeout_seconds: float = 120) -> None:
        self._server = server
        self._mode = mode
        self._log_level = log_level
        self._timeout = read_timeout_seconds
        self.logs: list[tuple[float, LoggingMessageNotificationParams]] = []
        #: called (synchronously, on the client's loop) with each log notification as it arrives
        self.on_log: Callable[[LoggingMessageNotificationParams], None] | None = None

    async def _on_log(self, params: LoggingMessageNotificationParams) -> None:
        self.logs.append((time.monotonic(), params))
        if self.on_log is not None:
            self.on_log(params)

    def __enter__(self) -> "SyncClient":
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self.portal = self._portal_cm.__enter__()
        try:
            client = Client(self._server, mode=self._mode, log_level=self._log_level,
                            logging_callback=self._on_log, read_timeout_seconds=self._timeout)
            self._client_cm = self.portal.wrap_async_context_manager(client)
            self.client: Client = self._client_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        # A failing test's exception is not thrown into the client: it would come back wrapped
        # in the transport's ExceptionGroup. The client closes normally and the error goes on.
        try:
            self._client_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Await `fn(*args, **kwargs)` on the client's event loop and return its result."""
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    def call(self, name: str, arguments: dict[str, Any] | None = None,
             progress: Callable[[float, float | None, str | None], Awaitable[None]] | None = None,
             ) -> CallToolResult:
        """tools/call; `progress` is an async (progress, total, message) callback, which makes
        the client send a progressToken with the request."""
        return self.run(self.client.call_tool, name, arguments or {}, progress_callback=progress)

    @property
    def protocol_version(self) -> str:
        return self.client.protocol_version


def ok(result: CallToolResult) -> dict[str, Any]:
    """The structured content of a successful call (fails the test with the server's text)."""
    text = "\n".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, f"the tool refused: {text}"
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


def refused(result: CallToolResult, code: str) -> dict[str, Any]:
    """The structured error of a refused call (in `_meta`), checked for its code and text form."""
    text = "\n".join(getattr(c, "text", "") for c in result.content)
    assert result.is_error, f"expected refusal {code}, got success: {text}"
    assert result.structured_content is None  # it would not match the tool's outputSchema
    error = (result.meta or {}).get(ERROR_META_KEY)
    assert isinstance(error, dict) and error.get("code") == code, f"expected {code}, got {error!r}"
    assert error["message"] and error["fix"], error
    assert text == f"{code}: {error['message']}\nfix: {error['fix']}"
    return error


def warning(structured: dict[str, Any], code: str) -> dict[str, Any]:
    found = [w for w in structured["warnings"] if w["code"] == code]
    assert len(found) == 1, f"expected one {code} warning, got {structured['warnings']!r}"
    return found[0]


def tool_snapshot(tools: list[Any]) -> list[dict[str, Any]]:
    """The wire form of each tool's contract: name, input/output schema, annotations."""
    rows = []
    for tool in sorted(tools, key=lambda t: t.name):
        wire = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
        rows.append({key: wire.get(key) for key in ("name", "inputSchema", "outputSchema", "annotations")})
    return rows


def compare_snapshot(actual: Any, path: Path = SNAPSHOT) -> None:
    """Compare with the committed snapshot, or rewrite it when DEFT_UPDATE_SNAPSHOTS=1."""
    text = json.dumps(actual, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if os.environ.get("DEFT_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing; create it with DEFT_UPDATE_SNAPSHOTS=1"
    committed = path.read_text(encoding="utf-8")
    if json.loads(committed) != actual:
        diff = "".join(difflib.unified_diff(committed.splitlines(keepends=True), text.splitlines(keepends=True),
                                            f"{path.name} (committed)", f"{path.name} (server)"))
        raise AssertionError(f"the tools' wire contract differs from {path.name}; if the change is "
                             f"deliberate, rerun with DEFT_UPDATE_SNAPSHOTS=1 and commit the diff:\n{diff}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port, or fail (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout:.0f}s")


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate a server this test started; kill it if it does not go."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)


SLOW_SIDE = 6000  # 36 MP: well under PIL's decompression-bomb limit (89.5 MP)


@functools.cache
def _grey_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def write_slow_image(path: Path) -> Path:
    """A regular PNG that is slow to decode: one grey level over SLOW_SIDE² pixels compresses to
    ~50 kB, but inflating it and converting it to RGB takes ~0.2 s and ~200 MB (freed after;
    the server decodes a batch's images on up to min(4, cores) threads at once).
    A random text chunk after the header makes its bytes unique, so the session's embedding
    store (keyed by the bytes' digest) never supplies its vector instead of a decode."""
    png = _grey_png(SLOW_SIDE)
    text = b"nonce\0" + os.urandom(8).hex().encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    header = 8 + 25  # the PNG signature, then the IHDR chunk
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png[:header] + chunk + png[header:])
    return path


# --------------------------------------------------------------------------- raw wire clients
# For the doors tests: bytes a real client library would never send, and every answer as the
# JSON the wire carried. Both speak the 2025-11-25 handshake era.

HANDSHAKE = {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
    "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def wire(message: Any) -> bytes:
    """A JSON-RPC message as one stdio line (or an HTTP body, newline and all)."""
    return (json.dumps(message) + "\n").encode()


class RawStdio:
    """`deft-mine serve --root ROOT` over stdio, written to and read from as bytes. A reader
    thread queues every line the server writes; `answers` waits for the ones with given ids."""

    def __init__(self, root: Path) -> None:
        import queue
        import threading

        self.process = subprocess.Popen([deft_mine_command(), "serve", "--root", str(root)], cwd=root,
                                        env=server_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=(root.parent / f"{root.name}_stdio.log").open("w"))
        self._lines: "queue.Queue[bytes]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send(wire(HANDSHAKE))
        assert self.answers(["init"])["init"]["result"]["protocolVersion"] == LEGACY
        self.send(wire(INITIALIZED))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message the server writes (notifications included)."""
        return json.loads(self._lines.get(timeout=timeout))

    def answers(self, ids: list[Any], timeout: float = 60.0) -> dict[Any, dict[str, Any]]:
        """The responses to the requests with these ids (notifications skipped), each once."""
        wanted, found = set(ids), {}
        deadline = time.monotonic() + timeout
        while wanted - found.keys():
            message = self.next(max(0.1, deadline - time.monotonic()))
            if "method" in message:
                continue
            assert message.get("id") in wanted and message["id"] not in found, f"unexpected answer {message}"
            found[message["id"]] = message
        return found

    def exchange(self, data: bytes, timeout: float = 60.0) -> dict[str, Any]:
        """Send raw bytes and return the one response that follows (notifications skipped)."""
        self.send(data)
        while True:
            message = self.next(timeout)
            if "method" not in message:
                return message

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        stop(self.process)


class RawHttp:
    """`deft-mine serve --transport streamable-http` on a free loopback port, POSTed to as bytes
    within one Mcp-Session-Id; each answer is (HTTP status, the JSON-RPC message)."""

    def __init__(self, root: Path) -> None:
        import httpx2

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._log = (root.parent / f"{root.name}_http.log").open("w")
        self.process = subprocess.Popen(
            [deft_mine_command(), "serve", "--transport", "streamable-http", "--port", str(self.port),
             "--root", str(root)], cwd=root, env=server_env(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)
        self.http = httpx2.Client(timeout=120)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        response = self.http.post(self.url, content=wire(HANDSHAKE), headers=self.headers)
        assert response.status_code == 200, response.text
        self.headers |= {"Mcp-Session-Id": response.headers["mcp-session-id"], "MCP-Protocol-Version": LEGACY}
        assert self.http.post(self.url, content=wire(INITIALIZED), headers=self.headers).status_code == 202

    @staticmethod
    def answer(response: Any) -> dict[str, Any]:
        """The JSON-RPC response in a plain JSON body or in an SSE stream (notifications skipped)."""
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response.json()
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        found = [e for e in events if "method" not in e]
        assert len(found) == 1, events
        return found[0]

    def exchange(self, data: bytes) -> tuple[int, dict[str, Any]]:
        response = self.http.post(self.url, content=data, headers=self.headers)
        return response.status_code, self.answer(response)

    def close(self) -> None:
        self.http.close()
        stop(self.process)
        self._log.close()
