"""The `deft-mine` command line, generated from the tool registry: parse, call a tool, print."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import traceback
from typing import Any, Sequence

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from deft_mine import __version__
from deft_mine.errors import DeftError
from deft_mine.report.provenance import Invocation
from deft_mine.stopping import exit_code, sigterm_unwinds, stop_signal
from deft_mine.schemas.inputs import BackendOptions, Cli
from deft_mine.schemas.results import ErrorInfo
from deft_mine.tools import TOOLS, Tool, ToolContext

EXIT_OK, EXIT_BUG, EXIT_REFUSED = 0, 1, 2
err = Console(stderr=True)
out = Console(soft_wrap=True)


class RichEvents:
    """Progress bars and log lines on stderr, for people."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bars = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=err, transient=False, disable=quiet)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "RichEvents":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(stage, total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total,
                         description=f"{stage} ({note})" if note else stage)

    def log(self, level: str, message: str) -> None:
        if self.quiet and level in ("debug", "info"):
            return
        style = {"warning": "yellow", "error": "red"}.get(level, "dim")
        self.bars.console.print(f"[{style}]{message}[/]", highlight=False)


# The subcommands in the order --help lists them: the tools, plus serve, demo and store.
COMMANDS = ("embed", "mine", "match", "run", "choose", "serve", "preflight", "select", "report", "demo", "store")


def _add_field(parser: argparse.ArgumentParser, groups: dict[str, Any], name: str, info: FieldInfo) -> None:
    """One input-model field as the option (or positional) its `Cli` marker describes."""
    spec = next((m for m in info.metadata if isinstance(m, Cli)), None)
    if spec is None:
        return
    help_text = info.description if spec.help is None else spec.help
    if not spec.flags:  # a positional: overrides takes the key=value words
        words = {"nargs": "*", "metavar": "key=value"} if name == "overrides" else {}
        parser.add_argument(name, help=help_text or None, **words)
        return
    if spec.group is not None and spec.group not in groups:
        groups[spec.group] = parser.add_mutually_exclusive_group(required=True)
    target = groups[spec.group] if spec.group is not None else parser
    if info.annotation is bool:
        kind: dict[str, Any] = {"action": "store_true"}
    elif spec.choices is not None:
        kind = {"choices": spec.choices, "default": info.default}
    else:
        kind = {"metavar": spec.metavar or spec.flags[-1].lstrip("-").replace("-", "_").upper(),
                "required": spec.required, "type": int if info.annotation is int else str,
                "action": "append" if spec.repeat else "store"}
    target.add_argument(*spec.flags, dest=name, help=help_text, **kind)


def _flag(tool: Tool[Any, Any] | None, field: object) -> str | None:
    """The option that sets an input field: tools and engine name fields, the adapter flags."""
    info = BackendOptions.model_fields.get(str(field))
    if info is None and tool is not None:
        info = tool.input.model_fields.get(str(field))
    spec = next((m for m in info.metadata if isinstance(m, Cli)), None) if info else None
    return "/".join(spec.flags) if spec and spec.flags else None


def _emit(text: str) -> None:
    """A line of the result, on the result's stream (stdout, whatever the work did to sys.stdout)."""
    print(text, file=out.file, flush=True)


def _run_tool(tool: Tool[Any, Any], args: argparse.Namespace, events: RichEvents) -> BaseModel:
    given = {name: getattr(args, name) for name in tool.input.model_fields if hasattr(args, name)}
    invocation = Invocation("cli", tool.name, argv=["deft-mine", *args.words])
    result = tool.invoke(tool.input(**given), ToolContext(events, invocation=invocation))
    if not args.json:
        out.print(result.text(), highlight=False)
        if tool.name == "run":
            _emit(result.run_dir)  # last line of stdout: scripts take the run folder from here
    return result


def _run_demo(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.demo import demo

    result, agreement = demo(args.output_dir, events=events,
                             invocation=Invocation("cli", "demo", argv=["deft-mine", *args.words]))
    if not args.json:
        out.print(result.text(), highlight=False)
        out.print(f"label agreement: {agreement:.0%} of mined images share the defect class of the "
                  "target that mined them (thumbnail encoder, no label filter)")
        _emit(result.run_dir)
    return result


def _command(sub: Any, name: str, summary: str, handler: Any, tool: Tool[Any, Any] | None = None,
             backend_options: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=summary)
    p.set_defaults(handler=handler, tool=tool)
    if backend_options:
        for field_name, info in BackendOptions.model_fields.items():
            _add_field(p, {}, field_name, info)
    p.add_argument("--json", action="store_true",
                   help="print exactly the structured result (as the MCP tool returns it) on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines")
    if tool is not None:
        groups: dict[str, Any] = {}
        for field_name, info in tool.input.model_fields.items():
            _add_field(p, groups, field_name, info)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft-mine", description=(
        "DEFT embed → mine → report for AOI images. Spec keys follow the TAO contract; "
        "key=value overrides win over the spec file."))
    parser.add_argument("--version", action="version", version=f"deft-mine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if name == "serve":
            p = sub.add_parser("serve", help="start the MCP server (stdio for Claude Code)",
                               description="Start the MCP server. It reads and writes only under its roots.")
            p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
            p.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind")
            p.add_argument("--port", type=int, default=8765, help="streamable-http: port")
            p.add_argument("--root", action="append", default=None,
                           help="allowed root folder (repeatable; default: the working directory)")
            p.add_argument("--store", help="the embedding store its tools use (default: $DEFT_MINE_STORE, "
                           "else ~/.cache/deft-mine); it may lie outside the roots")
            p.add_argument("--auth-token", help="streamable-http: bearer token every request must carry "
                           "(default: $DEFT_MINE_AUTH_TOKEN); required on any address but loopback")
            p.add_argument("--allowed-host", action="append", default=None, metavar="HOST[:PORT]",
                           help="streamable-http: a Host header to accept besides loopback (repeatable)")
            p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                           help="streamable-http: an Origin to accept besides loopback (repeatable)")
        elif name == "demo":
            p = _command(sub, name, "make a small AOI-like sample set and run the workflow offline", _run_demo)
            p.add_argument("--output-dir", default="deft_mine_demo", help="where the sample data and run go")
        elif name == "store":
            p = sub.add_parser("store", help="show or prune the embedding store",
                               description="Show or prune the embedding store (vectors reused across rounds).")
            actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            for action in ("info", "prune"):
                tool = TOOLS[f"store_{action}"]
                _command(actions, action, tool.summary, functools.partial(_run_tool, tool), tool, False)
        else:
            _command(sub, name, TOOLS[name].summary, functools.partial(_run_tool, TOOLS[name]), TOOLS[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:  # shell completion when argcomplete is installed (`eval "$(register-python-argcomplete
        # deft-mine)"`): it answers and exits only when the shell asks ($_ARGCOMPLETE set)
        with contextlib.suppress(ImportError):
            import argcomplete

            argcomplete.autocomplete(parser)
    args, extra = parser.parse_known_args(argv)
    args.words = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for provenance
    # key=value overrides may also come between or after options
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "serve":
        from deft_mine.server import serve

        try:
            serve(args.transport, args.root, args.host, args.port, args.store, args.auth_token,
                  args.allowed_host, args.allowed_origin)
        except DeftError as exc:
            err.print(f"[red]error[/] [bold]{exc.code}[/]: {escape(exc.message)}\n  fix: {escape(exc.fix or '')}",
                      highlight=False)
            return EXIT_REFUSED
        return EXIT_OK
    # stdout carries the result alone (scripts take its last line, --json parses it): what a
    # library prints there while the work runs (Ray's raylet warnings do) goes to stderr instead.
    out.file = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr), sigterm_unwinds(), \
                RichEvents(quiet=args.quiet or args.json) as events:
            result = args.handler(args, events)
    except DeftError as exc:
        if args.json:
            _emit(json.dumps(ErrorInfo.of(exc).wire(), indent=2))
        err.print(f"[red]error[/] [bold]{exc.code}[/]: {escape(exc.message)}", highlight=False)
        if exc.fix:
            flag = _flag(args.tool, exc.details.get("field"))
            err.print(f"  fix: {escape(exc.fix)}" + (f" (on the command line: {flag})" if flag else ""), highlight=False)
        return EXIT_REFUSED
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM as Terminated: the work unwound, cleaning up
        number = stop_signal(exc)
        if args.json:
            _emit(json.dumps(ErrorInfo(code="interrupted", message=f"stopped by {number.name}").wire(), indent=2))
        err.print(f"interrupted by {number.name}; finished files are kept, unfinished ones were not written",
                  highlight=False)
        return exit_code(exc)
    except Exception:  # a bug, not the user's fault: say so and show where
        err.print("[red]internal error[/] (please report it with the trace below)")
        traceback.print_exc()
        return EXIT_BUG
    for w in result.warnings:
        err.print(f"[yellow]warning[/] [bold]{w.code}[/]: {escape(w.message)}", highlight=False)
    if args.json:
        _emit(result.model_dump_json(indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
