"""The MCP server: typed tools over tools/, per-session encoder lock and roots, references/ as resources."""

from __future__ import annotations

import functools
import json
import inspect
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Annotated, Any, Callable, Literal
from urllib.parse import unquote, urlparse

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resources import FileResource
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from deft_mine import __version__
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.schemas.results import EmbedResult, MineResult, ReportResult, RunResult, SelectResult
from deft_mine.tools.guards import EncoderLock, PathPolicy
from deft_mine.tools.preflight import PreflightResult

REFERENCES = Path(__file__).parent / "references"
INSTRUCTIONS = """\
deft-mine finds, in a large pool of unused AOI images, those most like the images a Visual
ChangeNet model is weakest on (DEFT iterations). Call `preflight` first (it also predicts the
warnings your inputs will raise), then `run` for the whole workflow into a new run folder, or
`embed` + `mine` step by step. One session = one encoder: the first embed fixes it. Warnings
come back as data in every result (`warnings`); read them. Refusals come back as isError with
a stable `code` and a `fix`. The resources under deft-mine://references/ explain invocation,
pitfalls and the report."""

Overrides = Annotated[dict[str, Any] | None, Field(
    description="spec keys as in the YAML, e.g. {\"model\": \"thumbnail\", \"topn\": 10}; they win over the spec file")]
_SESSIONLESS_PROTOCOL = "2026-07-28"  # the protocol revision that dropped sessions
ERROR_META_KEY = "io.github.deft-mine/error"

Backend = Annotated[Literal["local", "docker"], Field(description="where the work runs; local = in-process")]
Image = Annotated[str | None, Field(description="docker backend: image URI (default: TAO versions.yaml, else deft-mine:latest)")]
Mounts = Annotated[list[str] | None, Field(description="docker backend: extra read-only mounts at identical paths")]


class _Session:
    def __init__(self) -> None:
        self.lock = EncoderLock()


class _ClientEvents:
    """Bridges the tools' events (worker thread) to MCP progress and log notifications."""

    _MIN_INTERVAL = 0.2

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cancelled = threading.Event()
        self._stage_done: dict[str, int] = {}
        self._overall = 0
        self._last_sent = 0.0
        self._single_total: int | None = None

    def _send(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            anyio.from_thread.run(functools.partial(fn, *args, **kwargs))
        except Exception:  # the client went away; the work itself must not fail for that
            pass

    def progress(self, stage: str, done: int, total: int | None) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"cancelled by the client during {stage}")
        # MCP progress must only grow: count units across all stages of the call.
        self._overall += max(0, done - self._stage_done.get(stage, 0))
        self._stage_done[stage] = done
        now = time.monotonic()
        if done != total and now - self._last_sent < self._MIN_INTERVAL:
            return
        self._last_sent = now
        overall_total = total if len(self._stage_done) == 1 else None
        message = f"{stage}: {done}/{total if total is not None else '?'}"
        self._send(self.ctx.report_progress, self._overall, overall_total, message)

    def log(self, level: str, message: str) -> None:
        with warnings.catch_warnings():  # logging is deprecated in the newest protocol, still useful
            warnings.simplefilter("ignore")
            self._send(self.ctx.log, level if level in ("debug", "info", "warning", "error") else "info",
                       message, logger_name="deft-mine")


def _text(result: BaseModel) -> str:
    """The short human text that goes with a structured result."""
    lines = []
    if isinstance(result, RunResult):
        lines.append(f"run folder {result.run_dir}: mined {result.mined} unique images "
                     f"({result.mine.summary.get('pairs', 0)} pairs for {result.mine.summary.get('queries', 0)} "
                     f"targets); report {result.report.verdict.upper()}: {result.report.report_path}")
    elif isinstance(result, MineResult):
        lines.append(f"mined {result.mined} unique images → {result.output_parquet}; "
                     + ", ".join(f"{k}={v}" for k, v in result.summary.items()))
    elif isinstance(result, EmbedResult):
        lines.append(f"embedded {result.rows} of {result.input_rows} rows ({result.skipped} skipped) "
                     f"with {result.encoder.model} on {result.device} → {result.output_parquet}")
    elif isinstance(result, SelectResult):
        lines.append(f"iteration {result.iteration}{' (resumed)' if result.resumed else ''}: "
                     f"{result.newly_selected} of {result.candidates} candidates selected "
                     f"({result.previously_selected} before); {result.cumulative_selected} in all → {result.output}")
    elif isinstance(result, ReportResult):
        lines.append(f"{result.verdict.upper()}: {result.report_path} ({result.words} words; "
                     f"pictures: {', '.join(result.pictures) or 'none'})")
    elif isinstance(result, PreflightResult):
        lines.append(("ready" if result.ok else "NOT ready") + f" ({result.backend}): "
                     + "; ".join(f"{c.name}: {c.detail}" for c in result.checks))
        if result.session_encoder:
            lines.append(f"session encoder: {result.session_encoder.model} {result.session_encoder.model_path}")
    for w in getattr(result, "warnings", []):
        lines.append(f"warning {w.code}: {w.message}")
    return "\n".join(lines)


def build_server(roots: list[str | Path] | None = None) -> MCPServer:
    """A server that reads and writes only under `roots` (default: the working directory)
    plus the roots each client announces."""
    server_roots = [Path(r).expanduser().resolve() for r in (roots or [Path.cwd()])]
    sessions: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
    mcp = MCPServer(name="deft-mine", title="DEFT image mining", version=__version__,
                    instructions=INSTRUCTIONS, log_level="WARNING")

    by_id: dict[str, _Session] = {}
    process_wide = _Session()

    def session_state(ctx: Context) -> _Session:
        """The state of the client behind this request. mcp 2.x builds a new session object per
        request; what lasts is the connection: an Mcp-Session-Id over streamable HTTP, the
        connection object over stdio. The 2026-07-28 protocol has no sessions at all: its
        clients share the process's state (over stdio that is one client per process)."""
        connection = getattr(ctx.session, "_connection", None)
        session_id = getattr(connection, "session_id", None)
        if session_id:
            return by_id.setdefault(session_id, _Session())
        if connection is None or str(ctx.session.protocol_version) >= _SESSIONLESS_PROTOCOL:
            return process_wide
        if connection not in sessions:
            sessions[connection] = _Session()
        return sessions[connection]

    async def policy(ctx: Context) -> PathPolicy:
        extra: list[Path] = []
        caps = ctx.client_capabilities
        if caps is not None and getattr(caps, "roots", None) is not None:
            try:
                with anyio.fail_after(5):
                    listed = await ctx.session.list_roots()
                extra = [Path(unquote(urlparse(str(r.uri)).path)) for r in listed.roots
                         if str(r.uri).startswith("file://")]
            except Exception:  # a client that cannot answer keeps the server's own roots
                extra = []
        return PathPolicy([*server_roots, *extra])

    async def call(ctx: Context, work: Callable[[_ClientEvents, PathPolicy, EncoderLock], BaseModel]) -> CallToolResult:
        events = _ClientEvents(ctx)
        state = session_state(ctx)
        allowed = await policy(ctx)
        try:
            result = await anyio.to_thread.run_sync(lambda: work(events, allowed, state.lock),
                                                    abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            events.cancelled.set()  # the worker stops at its next progress report, cleaning up
            raise
        except DeftError as exc:
            # The error as data rides in _meta: clients (the TypeScript SDK among them) check
            # structuredContent against the tool's outputSchema even on errors.
            text = f"{exc.code}: {exc.message}" + (f"\nfix: {exc.fix}" if exc.fix else "")
            return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True,
                                  meta={ERROR_META_KEY: json.loads(json.dumps(exc.to_dict(), default=str))})
        return CallToolResult(content=[TextContent(type="text", text=_text(result))],
                              structured_content=result.model_dump(mode="json"))

    def tool(title: str, read_only: bool = False, idempotent: bool = True) -> Callable:
        def register(fn: Callable) -> Callable:
            description = " ".join(inspect.cleandoc(fn.__doc__ or "").split())
            annotations = ToolAnnotations(title=title, read_only_hint=read_only, destructive_hint=False,
                                          idempotent_hint=idempotent, open_world_hint=False)
            return mcp.tool(description=description, annotations=annotations)(fn)
        return register

    @tool("Check before mining", read_only=True)
    async def preflight(
        ctx: Context,
        backend: Backend = "local",
        image: Annotated[str | None, Field(description="container image (docker backend)")] = None,
        targets: Annotated[str | None, Field(description="target parquet, to predict warnings")] = None,
        source: Annotated[str | None, Field(description="pool parquet/CSV, to predict warnings")] = None,
        mining_spec_path: Annotated[str | None, Field(description="mining spec YAML")] = None,
        overrides: Overrides = None,
    ) -> Annotated[CallToolResult, PreflightResult]:
        """Check that the backend can run here (torch, GPU), show the encoder this session is
        bound to, and predict the warnings the given inputs will raise (filter_by_label_noop,
        pool_exhausted, target_in_pool, images_skipped, provenance_unknown) before any work.
        Reads only; refuses paths outside the allowed roots."""
        from deft_mine.tools.preflight import preflight as tool

        return await call(ctx, lambda ev, pol, lock: tool(
            backend, image, targets, source, mining_spec_path, overrides, policy=pol, lock=lock))

    @tool("Embed images")
    async def embed(
        ctx: Context,
        input_parquet: Annotated[str, Field(description="parquet or CSV with a filepath column")],
        output_parquet: Annotated[str, Field(description="embedding parquet to write (atomically)")],
        spec_path: Annotated[str | None, Field(description="embedding spec YAML (TAO format)")] = None,
        overrides: Overrides = None,
        backend: Backend = "local",
        image: Image = None,
        mounts: Mounts = None,
    ) -> Annotated[CallToolResult, EmbedResult]:
        """Embed the images a parquet/CSV lists into an embedding parquet (filepath, embedding,
        every input column carried). The first embed of a session fixes its encoder; a
        different model/model_path/model_config_path later is refused (encoder_mismatch).
        Unreadable images are skipped and reported (images_skipped). Streams progress."""
        from deft_mine.tools.embed import embed as tool

        return await call(ctx, lambda ev, pol, lock: tool(
            input_parquet, output_parquet, spec_path, overrides, backend, ev, pol, lock, image, mounts))

    @tool("Mine nearest images")
    async def mine(
        ctx: Context,
        source_parquet: Annotated[str, Field(description="pool embedding parquet")],
        target_parquet: Annotated[str, Field(description="target embedding parquet")],
        output_parquet: Annotated[str, Field(description="mined parquet to write; mining_summary.txt goes beside it")],
        spec_path: Annotated[str | None, Field(description="mining spec YAML (TAO format)")] = None,
        overrides: Overrides = None,
        backend: Backend = "local",
        image: Image = None,
        mounts: Mounts = None,
    ) -> Annotated[CallToolResult, MineResult]:
        """For each target take the topn nearest pool images (exact; cosine, euclidean or
        manhattan), optionally keep only label-agreeing pairs, de-duplicate, and write the
        unique mined filepaths plus mining_summary.txt. Refuses two parquets embedded with
        different encoders (encoder_mismatch). Warnings: filter_by_label_noop,
        provenance_unknown, pool_exhausted, target_in_pool."""
        from deft_mine.tools.mine import mine as tool

        return await call(ctx, lambda ev, pol, lock: tool(
            source_parquet, target_parquet, output_parquet, spec_path, overrides, backend, ev, pol,
            image, mounts))

    @tool("Run the whole workflow", idempotent=False)
    async def run(
        ctx: Context,
        targets: Annotated[str, Field(description="target parquet (filepath; optional label)")],
        source: Annotated[str, Field(description="pool parquet or CSV")],
        output_dir: Annotated[str | None, Field(description="run goes to output_dir/mining_results/<timestamp>/")] = None,
        run_dir: Annotated[str | None, Field(description="or exactly here (new or empty folder)")] = None,
        embedding_spec_path: Annotated[str | None, Field(description="embedding spec YAML")] = None,
        mining_spec_path: Annotated[str | None, Field(description="mining spec YAML")] = None,
        overrides: Overrides = None,
        backend: Backend = "local",
        history: Annotated[str | None, Field(
            description="history ledger JSON: keep only images no earlier iteration selected")] = None,
        image: Image = None,
        mounts: Mounts = None,
    ) -> Annotated[CallToolResult, RunResult]:
        """Embed targets and pool with one encoder, mine, and write a new run folder
        (embedding_spec.yaml, mining_spec.yaml, both embedding parquets, mined.parquet,
        mining_summary.txt, run.json). Give exactly one of output_dir and run_dir; a run never
        reuses a non-empty folder. Overrides go to whichever spec owns the key. With `history`
        (a ledger), mining writes mined_candidates.parquet and mined.parquet keeps only images no
        earlier iteration selected (the next iteration number is taken from the ledger)."""
        from deft_mine.tools.run import run as tool

        return await call(ctx, lambda ev, pol, lock: tool(
            targets, source, output_dir, run_dir, embedding_spec_path, mining_spec_path, overrides,
            backend, ev, pol, lock, history, image, mounts))

    @tool("Select across DEFT iterations")
    async def select(
        ctx: Context,
        candidates: Annotated[str, Field(description="mined candidates parquet")],
        ledger: Annotated[str, Field(description="history ledger JSON (created on iteration 1)")],
        iteration: Annotated[int, Field(ge=1, description="the ledger's last iteration + 1, or its last to resume")],
        output: Annotated[str, Field(description="parquet of the selected rows (the round's mined.parquet)")],
        image_root: Annotated[str | None, Field(
            description="where relative filepaths resolve (default: the candidates' folder)")] = None,
    ) -> Annotated[CallToolResult, SelectResult]:
        """Drop every candidate whose normalised filepath an earlier iteration selected (order
        kept), write the rest, and record the iteration in the ledger with the SHA-256 of its
        files. Refuses non-consecutive iterations (ledger_iteration_invalid), a resume whose
        files changed (ledger_hash_mismatch), a damaged ledger (ledger_corrupt) and a ledger
        another process is writing (ledger_busy); nothing is written then."""
        from deft_mine.tools.select import select as tool

        return await call(ctx, lambda ev, pol, lock: tool(
            candidates, ledger, iteration, output, image_root, None, ev, pol))

    @tool("Write the mining report")
    async def report(
        ctx: Context,
        run_dir: Annotated[str, Field(description="run folder (with run.json, or one the TAO container filled)")],
    ) -> Annotated[CallToolResult, ReportResult]:
        """Write Mining_Report.md (seven sections, every number from the run's recorded facts)
        and its pictures (contact sheet, score histogram, per-label bars) into a run folder;
        `run` already does this as its last step. Works on folders without run.json too and
        says which facts were unavailable. Returns the report path, word count, verdict and
        warnings."""
        from deft_mine.tools.report import report as tool

        return await call(ctx, lambda ev, pol, lock: tool(run_dir, ev, pol))

    for path in sorted(REFERENCES.glob("*.md")):
        mcp.add_resource(FileResource(
            uri=f"deft-mine://references/{path.name}", name=path.stem, path=path.resolve(),
            title=path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip(),
            mime_type="text/markdown"))
    return mcp


def serve(transport: str = "stdio", roots: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8765) -> None:
    server = build_server(roots)
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=host, port=port)
