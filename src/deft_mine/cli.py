"""The `deft-mine` command line: a thin adapter that parses, calls a tool, and prints."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from deft_mine import __version__
from deft_mine.backends import BACKENDS
from deft_mine.errors import DeftError
from deft_mine.schemas.results import ToolWarning

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

    def progress(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(stage, total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)

    def log(self, level: str, message: str) -> None:
        if self.quiet and level in ("debug", "info"):
            return
        style = {"warning": "yellow", "error": "red"}.get(level, "dim")
        self.bars.console.print(f"[{style}]{message}[/]", highlight=False)


def print_warnings(warnings: list[ToolWarning]) -> None:
    for w in warnings:
        err.print(f"[yellow]warning[/] [bold]{w.code}[/]: {w.message}", highlight=False)


def _summary_table(summary: dict[str, int]) -> Table:
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        table.add_row(key, str(value))
    return table


# ---- subcommands: each parses nothing itself, calls one tool, returns its result ----

def _cmd_embed(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.embed import embed

    result = embed(spec_path=args.spec, overrides=args.overrides, backend=args.backend, events=events,
                   image=args.image, mounts=args.mount)
    if not args.json:
        out.print(f"embedded {result.rows} of {result.input_rows} rows ({result.skipped} skipped) "
                  f"with {result.encoder.model} on {result.device} → {result.output_parquet}")
        out.print(f"columns: {', '.join(result.columns)}")
    return result


def _cmd_mine(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.mine import mine

    result = mine(spec_path=args.spec, overrides=args.overrides, backend=args.backend, events=events,
                  image=args.image, mounts=args.mount)
    if not args.json:
        out.print(_summary_table(result.summary))
        out.print(f"mined {result.mined} unique images → {result.output_parquet}")
    return result


def _cmd_run(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.run import run

    result = run(args.targets, args.source, output_dir=args.output_dir, run_dir=args.run_dir,
                 embedding_spec_path=args.embedding_spec, mining_spec_path=args.mining_spec,
                 overrides=args.overrides, backend=args.backend, events=events, history=args.history,
                 image=args.image, mounts=args.mount)
    if not args.json:
        out.print(_summary_table(result.mine.summary))
        if result.select is not None:
            out.print(f"history: iteration {result.select.iteration}, {result.select.newly_selected} new of "
                      f"{result.select.candidates} candidates ({result.select.previously_selected} selected before)")
        out.print(f"mined {result.mined} unique images in {result.timings['total']:.1f}s; "
                  f"report: {result.report.verdict.upper()} ({Path(result.report.report_path).name})")
        print(result.run_dir)  # last line of stdout: scripts take the run folder from here
    return result


def _cmd_preflight(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.preflight import preflight

    result = preflight(args.backend, args.image, args.targets, args.source, args.mining_spec,
                       args.overrides, output_dir=args.output_dir)
    if not args.json:
        table = Table(show_header=False, box=None)
        for check in result.checks:
            style = {"ok": "green", "warn": "yellow", "fail": "red"}[check.status]
            table.add_row(f"[{style}]{check.status}[/]", check.name, check.detail, check.fix or "")
        out.print(table)
        out.print(("ready" if result.ok else "NOT ready") + f" for backend {result.backend}")
    return result


def _cmd_select(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.select import select

    result = select(args.candidates, args.ledger, args.iteration, args.output,
                    image_root=args.image_root, events=events)
    if not args.json:
        out.print(f"iteration {result.iteration}{' (resumed)' if result.resumed else ''}: "
                  f"{result.newly_selected} of {result.candidates} candidates selected, "
                  f"{result.previously_selected} selected before, {result.duplicates_in_candidates} "
                  f"repeated; {result.cumulative_selected} in all → {result.output}")
    return result


def _cmd_report(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.report import report

    result = report(args.run_dir, events=events)
    if not args.json:
        out.print(f"{result.verdict.upper()}: {result.words} words → {result.report_path}")
        if result.missing_facts:
            out.print(f"facts unavailable: {', '.join(result.missing_facts)}")
    return result


def _cmd_demo(args: argparse.Namespace, events: RichEvents) -> BaseModel:
    from deft_mine.tools.demo import demo

    result, agreement = demo(args.output_dir, events=events)
    if not args.json:
        out.print(_summary_table(result.mine.summary))
        out.print(f"label agreement: {agreement:.0%} of mined images share the defect class of the "
                  "target that mined them (thumbnail encoder, no label filter)")
        print(result.run_dir)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft-mine", description=(
        "DEFT embed → mine → report for AOI images. Spec keys follow the TAO contract; "
        "key=value overrides win over the spec file."))
    parser.add_argument("--version", action="version", version=f"deft-mine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        p.add_argument("--backend", choices=BACKENDS, default="local")
        p.add_argument("--image", help="docker backend: image URI (default: TAO versions.yaml under "
                       "$TAO_SKILL_BANK_PATH, else deft-mine:latest)")
        p.add_argument("--mount", action="append", default=None, metavar="PATH",
                       help="docker backend: extra read-only bind mount at the identical path (repeatable)")
        p.add_argument("--json", action="store_true",
                       help="print exactly the structured result (as the MCP tool returns it) on stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines")
        return p

    p = command("embed", _cmd_embed, "embed the images of a parquet/CSV into an embedding parquet")
    p.add_argument("-e", "--spec", help="embedding spec YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. input_parquet=targets.parquet output_parquet=t_emb.parquet model=CLIP")

    p = command("mine", _cmd_mine, "find each target's topn nearest pool images")
    p.add_argument("-e", "--spec", help="mining spec YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. source_parquet=… target_parquet=… output_parquet=mined.parquet topn=10")

    p = command("run", _cmd_run, "embed targets and pool, mine, and write a run folder")
    p.add_argument("--targets", required=True, help="target parquet (column filepath; optional label)")
    p.add_argument("--source", required=True, help="source pool parquet or CSV")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--output-dir", help="the run goes to DIR/mining_results/<YYYY-MM-DD_HHMMSS>/")
    where.add_argument("--run-dir", help="the run goes exactly here (new or empty folder)")
    p.add_argument("-e", "--embedding-spec", help="embedding spec YAML")
    p.add_argument("-m", "--mining-spec", help="mining spec YAML")
    p.add_argument("--history", help="history ledger JSON: mine to mined_candidates.parquet, then keep "
                   "only images no earlier iteration selected in mined.parquet")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any key of either spec, e.g. model=thumbnail topn=10 filter_by_label=true")

    p = sub.add_parser("serve", help="start the MCP server (stdio for Claude Code)",
                       description="Start the MCP server. It reads and writes only under its roots.")
    p.set_defaults(handler=None)
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind")
    p.add_argument("--port", type=int, default=8765, help="streamable-http: port")
    p.add_argument("--root", action="append", default=None,
                   help="allowed root folder (repeatable; default: the working directory)")

    p = command("preflight", _cmd_preflight, "check this machine for a backend; predict input warnings")
    p.add_argument("--targets", help="target parquet, to predict warnings")
    p.add_argument("--source", help="pool parquet/CSV, to predict warnings")
    p.add_argument("-m", "--mining-spec", help="mining spec YAML")
    p.add_argument("--output-dir", help="where outputs will go (disk space, writability)")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = command("select", _cmd_select, "drop candidates earlier DEFT iterations selected; record this one")
    p.add_argument("--candidates", required=True, help="mined candidates parquet (filepath first)")
    p.add_argument("--ledger", required=True, help="history ledger JSON (created on iteration 1)")
    p.add_argument("--iteration", required=True, type=int, help="this iteration: the ledger's last + 1 "
                   "(or its last, to resume)")
    p.add_argument("--output", required=True, help="selected rows (the next round's mined.parquet)")
    p.add_argument("--image-root", help="where relative filepaths resolve (default: the candidates' folder)")

    p = command("report", _cmd_report, "write Mining_Report.md and its pictures for a run folder")
    p.add_argument("run_dir", help="a run folder (with run.json, or one the TAO container filled)")

    p = command("demo", _cmd_demo, "make a small AOI-like sample set and run the workflow offline")
    p.add_argument("--output-dir", default="deft_mine_demo", help="where the sample data and run go")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come between or after options
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "serve":
        from deft_mine.server import serve

        serve(args.transport, args.root, args.host, args.port)
        return EXIT_OK
    try:
        with RichEvents(quiet=args.quiet or args.json) as events:
            result = args.handler(args, events)
    except DeftError as exc:
        if args.json:
            print(json.dumps(exc.to_dict(), indent=2, default=str))
        err.print(f"[red]error[/] [bold]{exc.code}[/]: {exc.message}", highlight=False)
        if exc.fix:
            err.print(f"  fix: {exc.fix}", highlight=False)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        err.print("interrupted; finished files are kept, unfinished ones were not written")
        return 130
    except Exception:  # a bug, not the user's fault: say so and show where
        err.print("[red]internal error[/] (please report it with the trace below)")
        traceback.print_exc()
        return EXIT_BUG
    print_warnings(getattr(result, "warnings", []))
    if args.json:
        print(result.model_dump_json(indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
