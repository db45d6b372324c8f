"""The MCP server: typed tools over tools/, per-session encoder lock and roots, references/ as resources."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import traceback
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable
from urllib.parse import unquote, urlparse

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp.server.mcpserver.resources import FileResource
from mcp.server.mcpserver.prompts import Prompt
from mcp_types import (INVALID_PARAMS, CallToolResult, EmptyResult, LoggingLevel,
                       SetLevelRequestParams, TextContent, ToolAnnotations)
from pydantic import Field, ValidationError, WithJsonSchema

from deft_mine import __version__, prompts, wire
from deft_mine.engine.store import default_location
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.schemas.inputs import Internal
from deft_mine.schemas.results import ErrorInfo
from deft_mine.tools import TOOLS, Tool, ToolContext
from deft_mine.tools.registry import invalid_arguments
from deft_mine.report.provenance import Invocation, SessionLog, call_line
from deft_mine.tools.guards import EncoderLock, PathPolicy

REFERENCES = Path(__file__).parent / "references"
INSTRUCTIONS = """\
deft-mine finds, in a large pool of unused AOI images, those most like the images a Visual
ChangeNet model is weakest on (DEFT iterations). Call `preflight` first (it also predicts the
warnings your inputs will raise), then `run` for the whole workflow into a new run folder, or
`embed` + `mine` step by step. One session = one encoder: the first embed fixes it. Warnings
come back as data in every result (`warnings`); read them. Refusals come back as isError with
a stable `code` and a `fix`. The resources under deft-mine://references/ explain invocation,
pitfalls and the report."""

_SESSIONLESS_PROTOCOL = "2026-07-28"  # the protocol revision that dropped sessions
ERROR_META_KEY = "io.github.deft-mine/error"
#: Tool calls run on threads of their own: on the default pool (40) they starved the transport, whose stdio
#: needs a thread too (40 calls reporting progress hung the server). More calls wait, cancellably, for a thread.
TOOL_THREADS = 32
MAX_HTTP_SESSIONS = 1024
log = logging.getLogger("deft_mine.server")
#: MCP log levels, least severe first (RFC 5424, as the specification orders them).
LOG_LEVELS: tuple[LoggingLevel, ...] = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class _ClientEvents:
    """Bridges the tools' events (worker thread) to MCP progress and log notifications."""

    _MIN_INTERVAL = 0.2

    def __init__(self, ctx: Context, session: "_Session") -> None:
        self.ctx = ctx
        self.session = session  # read at each line: a logging/setLevel mid-call applies at once
        self.cancelled = threading.Event()
        self._stage_done: dict[str, int] = {}
        self._overall, self._last_sent = 0, 0.0
        self._last_value = -1  # the progress last sent: the first report (0) goes out, repeats do not

    def _send(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(Exception):  # the client went away; the work itself must not fail for that
            anyio.from_thread.run(functools.partial(fn, *args, **kwargs))

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"cancelled by the client during {stage}")
        # MCP progress must only grow: count units across all stages of the call.
        self._overall += max(0, done - self._stage_done.get(stage, 0))
        self._stage_done[stage] = done
        now = time.monotonic()
        # Not sent: a report that nothing moved (a wait's cancel check), or one too soon after the last.
        if self._overall <= self._last_value or (done != total and now - self._last_sent < self._MIN_INTERVAL):
            return
        self._last_sent, self._last_value = now, self._overall
        overall_total = total if len(self._stage_done) == 1 else None
        message = f"{stage}: {done}/{total if total is not None else '?'}" + (f" ({note})" if note else "")
        self._send(self.ctx.report_progress, self._overall, overall_total, message)

    def log(self, level: str, message: str) -> None:
        level = level if level in LOG_LEVELS else "info"
        if not self.session.wants(level):
            return
        with warnings.catch_warnings(action="ignore"):  # logging is deprecated in the newest protocol, still useful
            self._send(self.ctx.log, level, message, logger_name="deft-mine")


class _Server(MCPServer):
    """The SDK's server, answering as the MCP specification (2025-11-25) asks: an unknown tool or prompt,
    or a prompt missing a required argument, is JSON-RPC error -32602 (the SDK answers code 0); arguments
    that fail the input schema are an isError result in our error model (`invalid_arguments`, the field, a fix)."""

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None, context: Any = None) -> Any:
        prompt = self._prompt_manager.get_prompt(name)
        if prompt is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name}", data={"prompt": name})
        missing = sorted(a.name for a in prompt.arguments or [] if a.required and a.name not in (arguments or {}))
        if missing:
            raise MCPError(code=INVALID_PARAMS, message=f"Prompt {name} needs argument(s): {', '.join(missing)}",
                           data={"prompt": name, "missing": missing})
        return await super().get_prompt(name, arguments, context)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        if self._tool_manager.get_tool(name) is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}", data={"tool": name})
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            return _refusal(ErrorInfo.of(invalid_arguments(name, exc.__cause__)))


def _refusal(error: ErrorInfo) -> CallToolResult:
    # The error as data rides in _meta: clients (the TypeScript SDK among them) check
    # structuredContent against the tool's outputSchema even on errors.
    return CallToolResult(content=[TextContent(type="text", text=error.text())], is_error=True,
                          meta={ERROR_META_KEY: error.wire()})


def _internal_error(tool: str, exc: Exception) -> CallToolResult:
    """A bug's answer and log line, both with the exception's text cut short: it may quote an
    argument of megabytes (the SDK's own log printed a 20 MB path, wrapped, for 20 s)."""
    text = str(exc)
    if len(text) > 500:
        text = f"{text[:500]}… ({len(text) - 500} more characters)"
    log.error("tool %s failed: %s: %s\n%s", tool, type(exc).__name__, text,
              "".join(traceback.format_tb(exc.__traceback__)).rstrip())
    return _refusal(ErrorInfo(code="internal_error", message=f"{tool}: {type(exc).__name__}: {text}",
                              fix="this is a bug in deft-mine, not in the request: report it with the server's "
                                  "log (standard error)"))


def _handler(tool: Tool[Any, Any], call: Callable[[Context, Tool[Any, Any], Any], Awaitable[CallToolResult]]
             ) -> Callable[..., Awaitable[CallToolResult]]:
    """An MCP tool function whose parameters are the input model's fields (the SDK reads the
    signature for the input schema and the return annotation for the output schema)."""
    async def handler(ctx: Context, **arguments: Any) -> CallToolResult:
        return await call(ctx, tool, tool.input(**arguments))

    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    for name, info in tool.input.model_fields.items():
        if any(isinstance(m, Internal) for m in info.metadata):
            continue
        schema = [m for m in info.metadata if isinstance(m, WithJsonSchema)]
        annotation = Annotated[(info.annotation, *schema, Field(description=info.description,
                                                                 json_schema_extra=info.json_schema_extra))]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=inspect.Parameter.empty if info.is_required() else info.default))
    returns = Annotated[CallToolResult, tool.result]
    handler.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in params} | {"return": returns}
    handler.__name__ = handler.__qualname__ = tool.name
    return handler


@dataclass
class _Session:
    """What lasts across one client's calls: its encoder lock and its call log (session.jsonl)."""

    lock: EncoderLock = field(default_factory=EncoderLock)
    log: SessionLog = field(default_factory=SessionLog)
    #: the least severe log level the client asked for (logging/setLevel); None: every level.
    #: The 2026-07-28 protocol asks per request instead, and the SDK filters those.
    log_level: LoggingLevel | None = None

    def wants(self, level: LoggingLevel) -> bool:
        return self.log_level is None or LOG_LEVELS.index(level) >= LOG_LEVELS.index(self.log_level)


def build_server(roots: list[str | Path] | None = None, store: str | Path | None = None) -> MCPServer:
    """A server that reads and writes only under `roots` (default: the working directory) plus the roots
    each client announces, keeping embeddings in `store` (default: default_location()), wherever it lies."""
    server_roots = [Path(r).expanduser().resolve() for r in (roots or [Path.cwd()])]
    server_store = Path(store).expanduser().absolute() if store else default_location()
    sessions: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
    mcp = _Server(name="deft-mine", title="DEFT image mining", version=__version__,
                    instructions=INSTRUCTIONS, log_level="WARNING")

    # HTTP sessions by Mcp-Session-Id; the SDK says nothing when one ends, so the least recently
    # used go once there are more than a server plausibly serves at once (their memory is bounded).
    by_id: OrderedDict[str, _Session] = OrderedDict()
    process_wide = _Session()
    sessions_mutex = threading.Lock()

    def session_of(ctx: Context) -> _Session:
        """The session state of the client behind this request. mcp 2.x builds a new session object per
        request; what lasts is the connection: an Mcp-Session-Id over streamable HTTP, the
        connection object over stdio. The 2026-07-28 protocol has no sessions at all: its
        clients share the process's state (over stdio that is one client per process)."""
        connection = getattr(ctx.session, "_connection", None)
        session_id = getattr(connection, "session_id", None)
        if session_id:
            with sessions_mutex:
                state = by_id.setdefault(session_id, _Session())
                by_id.move_to_end(session_id)
                while len(by_id) > MAX_HTTP_SESSIONS:
                    by_id.popitem(last=False)
            return state
        if connection is None or str(ctx.session.protocol_version) >= _SESSIONLESS_PROTOCOL:
            return process_wide
        return sessions.setdefault(connection, _Session())

    async def policy(ctx: Context) -> PathPolicy:
        extra: list[Path] = []
        if getattr(ctx.client_capabilities, "roots", None) is not None:
            with contextlib.suppress(Exception):  # a client that cannot answer keeps the server's own roots
                # roots are deprecated in the newest protocol; the handshake era's clients still send them
                with anyio.fail_after(5), warnings.catch_warnings(action="ignore"):
                    listed = await ctx.session.list_roots()
                extra = [Path(unquote(urlparse(str(r.uri)).path)) for r in listed.roots
                         if str(r.uri).startswith("file://")]
        return PathPolicy([*server_roots, *extra])

    threads = anyio.CapacityLimiter(TOOL_THREADS)

    async def call(ctx: Context, tool: Tool[Any, Any], inputs: Any) -> CallToolResult:
        session = session_of(ctx)
        events = _ClientEvents(ctx, session)
        invocation = Invocation("mcp", tool.name, inputs.model_dump(mode="json", exclude_none=True))
        tool_ctx = ToolContext(events, await policy(ctx), session.lock, server_store, invocation, session.log)
        try:
            result = await anyio.to_thread.run_sync(lambda: tool.invoke(inputs, tool_ctx), abandon_on_cancel=True,
                                                    limiter=threads)
        except anyio.get_cancelled_exc_class():
            events.cancelled.set()  # the worker stops at its next progress report, cleaning up
            session.log.record(call_line(invocation, "cancelled"))
            raise
        except DeftError as exc:
            session.log.record(call_line(invocation, "refused", exc.code))
            return _refusal(ErrorInfo.of(exc))
        except Exception as exc:  # a bug, still answered in our error model: the client gets a code
            session.log.record(call_line(invocation, "refused", "internal_error"))
            return _internal_error(tool.name, exc)
        session.log.record(call_line(invocation, "ok", warnings=[w.code for w in getattr(result, "warnings", [])],
                                     run_dir=getattr(result, "run_dir", None)))
        text = "\n".join([result.text(), *(f"warning {w.code}: {w.message}" for w in result.warnings)])
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=result.model_dump(mode="json"))

    for tool in (t for t in TOOLS.values() if t.mcp):
        annotations = ToolAnnotations(title=tool.title, read_only_hint=tool.read_only, destructive_hint=False,
                                      idempotent_hint=tool.idempotent, open_world_hint=False)
        mcp.tool(description=tool.description, annotations=annotations)(_handler(tool, call))

    async def set_level(ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        session_of(ctx).log_level = params.level
        return EmptyResult()

    # Declares the logging capability (we send log notifications) for the handshake era, whose clients
    # choose the least severe level they want; on the low-level server: MCPServer has no setting for it.
    mcp._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)

    for prompt, title in prompts.PROMPTS.items():
        mcp.add_prompt(Prompt.from_function(prompt, name=prompt.__name__, title=title))

    for path in sorted(REFERENCES.glob("*.md")):
        mcp.add_resource(FileResource(
            uri=f"deft-mine://references/{path.name}", name=path.stem, path=path.resolve(),
            title=path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip(),
            mime_type="text/markdown"))
    return mcp


LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "DEFT_MINE_AUTH_TOKEN"


def serve(transport: str = "stdio", roots: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8765, store: str | None = None, auth_token: str | None = None,
          allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None) -> None:
    """Serve over stdio, or streamable HTTP: on 127.0.0.1 by default, checking Host/Origin; on
    any other address only with a bearer token (`auth_token` or $DEFT_MINE_AUTH_TOKEN), the
    Host/Origin checks kept on for the names given."""
    server = build_server(roots, store)
    if transport == "stdio":
        anyio.run(wire.serve_stdio, server)
        return
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    token = auth_token or os.environ.get(TOKEN_ENV)
    if host not in LOOPBACK and not token:
        raise DeftError("auth_token_required", f"serving on {host} would let anyone on that network in",
                        fix=f"pass --auth-token TOKEN (or set ${TOKEN_ENV}); clients send "
                            "'Authorization: Bearer TOKEN'", field="host")
    security = TransportSecuritySettings(
        allowed_hosts=[*(allowed_hosts or []), *(f"{h}:{port}" for h in LOOPBACK), *LOOPBACK],
        allowed_origins=[*(allowed_origins or []), *(f"http://{h}:{port}" for h in LOOPBACK)])
    app = wire.SpecErrors(server.streamable_http_app(host=host, transport_security=security,
                                                     max_request_body_size=wire.MAX_MESSAGE_BYTES))
    uvicorn.Server(uvicorn.Config(wire.BearerToken(app, token) if token else app, host=host, port=port,
                                  log_level="warning")).run()
