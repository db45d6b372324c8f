"""What the SDK's transports leave to us: bounded stdio lines, spec answers to unreadable messages, bearer tokens."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.message import SessionMessage
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

#: The largest JSON-RPC message either transport takes: the SDK's HTTP body limit (answered 413
#: there), applied to each stdio line as well, where the SDK has none.
MAX_MESSAGE_BYTES = DEFAULT_MAX_REQUEST_BODY_SIZE
TOO_LARGE = f"Request too large: a message may be at most {MAX_MESSAGE_BYTES} bytes"
NOT_JSON_RPC = "Invalid Request: not a JSON-RPC 2.0 request, notification or response"

class BoundedLines:
    """The stdio wire as lines of at most MAX_MESSAGE_BYTES: a longer line is read through in
    chunks and dropped (memory stays bounded), standing as the TOO_LARGE line instead."""

    TOO_LARGE = "\0too-large\n"  # not JSON: the SDK's reader hands on its parse error, we answer

    def __init__(self, fd: int) -> None:
        self._wire = os.fdopen(fd, "rb")

    def readline(self) -> str:
        line = self._wire.readline(MAX_MESSAGE_BYTES + 1)
        if len(line) <= MAX_MESSAGE_BYTES or line.endswith(b"\n"):
            return line.decode("utf-8", errors="replace")
        while line and not line.endswith(b"\n"):
            line = self._wire.readline(1 << 20)
        return self.TOO_LARGE


def _wire_error(exc: Exception) -> JSONRPCError:
    """The JSON-RPC answer to a stdio line the SDK could not read as a message (its reader hands
    on the exception and the SDK then drops it, leaving the client waiting): a parse error, a
    message too large, or an object that is no JSON-RPC 2.0 message (with its id when it has one)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    first = errors[0] if errors else {"type": "", "input": None}
    if first["type"] == "json_invalid":
        too_large = first["input"] == BoundedLines.TOO_LARGE
        return JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(
            code=INVALID_REQUEST if too_large else PARSE_ERROR, message=TOO_LARGE if too_large else "Parse error"))
    # A field missing from one of the union's message types carries the whole object as its input.
    request = next((e["input"] for e in errors if e["type"] == "missing" and len(e["loc"]) == 2
                    and isinstance(e["input"], dict)), {})
    request_id = request.get("id")
    return JSONRPCError(jsonrpc="2.0", id=request_id if type(request_id) in (int, str) else None,
                        error=ErrorData(code=INVALID_REQUEST, message=NOT_JSON_RPC))


async def serve_stdio(server: MCPServer) -> None:
    """The SDK's stdio transport, with a bounded reader and an answer to every unreadable line."""
    # The wire moves to a private descriptor and fd 0 to the null device (as the SDK does when it
    # owns stdin), so no tool or child process can read the client's bytes.
    wire = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    stdin = anyio.wrap_file(BoundedLines(wire), limiter=anyio.CapacityLimiter(1))
    async with stdio_server(stdin=stdin) as (read_stream, write_stream):  # type: ignore[arg-type]
        messages_in, messages = anyio.create_memory_object_stream[SessionMessage](0)

        async def sort() -> None:
            async with messages_in:
                async for item in read_stream:
                    if isinstance(item, Exception):
                        await write_stream.send(SessionMessage(_wire_error(item)))
                    else:
                        await messages_in.send(item)

        lowlevel = server._lowlevel_server  # what MCPServer.run_stdio_async drives
        async with anyio.create_task_group() as group:
            group.start_soon(sort)
            await lowlevel.run(messages, write_stream, lowlevel.create_initialization_options())
            group.cancel_scope.cancel()


class SpecErrors:
    """Two answers of the SDK's HTTP transport, put as the specification has them: a body that is
    JSON but no JSON-RPC message is -32600 Invalid Request (the SDK says -32602 with pydantic's
    text), and a body over the size limit gets its 413 with a JSON-RPC error (the SDK's is plain
    text). Status codes and every other response pass unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[dict[str, Any]] = []  # a 400/413 start, decided on its body (sent whole)

        async def rewrite(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 413):
                held.append(message)
                return
            if not held or message["type"] != "http.response.body":
                await send(message)
                return
            start = held.pop()
            # Only a body sent whole is judged and replaced; a streamed one passes as it is.
            body = None if message.get("more_body", False) else _spec_body(start["status"], message.get("body", b""))
            if body is not None:
                headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
                start = {**start, "headers": [*headers, (b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())]}
                message = {"type": "http.response.body", "body": body}
            await send(start)
            await send(message)

        await self.app(scope, receive, rewrite)


def _spec_body(status: int, body: bytes) -> bytes | None:
    """The JSON-RPC error body to send instead of `body`, or None to leave it."""
    if status == 413:
        error = ErrorData(code=INVALID_REQUEST, message=TOO_LARGE)
    else:
        try:
            sent = json.loads(body)
        except ValueError:
            return None
        said = sent.get("error") if isinstance(sent, dict) else None
        if not (isinstance(said, dict) and said.get("code") == INVALID_PARAMS
                and str(said.get("message", "")).startswith("Validation error")):
            return None
        error = ErrorData(code=INVALID_REQUEST, message=NOT_JSON_RPC)
    answer = JSONRPCError(jsonrpc="2.0", id=None, error=error)
    return answer.model_dump_json(by_alias=True, exclude_unset=True).encode()


class BearerToken:
    """Every HTTP request must carry `Authorization: Bearer <token>`; others get 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not hmac.compare_digest(
                dict(scope.get("headers") or []).get(b"authorization", b""), self.expected):
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b'{"error": "missing or wrong bearer token"}'})
            return
        await self.app(scope, receive, send)
