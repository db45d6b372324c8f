"""The command line is generated from the tool registry: its --help must stay what users know
(tests/snapshots/cli_help.txt was taken from the hand-written parser before the registry)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

import pytest

from deft_mine.cli import COMMANDS, build_parser, main
from deft_mine.tools import TOOLS

SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_help.txt"


def _help(*argv: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return buffer.getvalue()


def test_help_of_every_subcommand_matches_the_snapshot(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal width
    text = "".join(f"==> deft-mine {' '.join(argv) + ' ' if argv else ''}--help\n" + _help(*argv)
                   for argv in [(), *((c,) for c in COMMANDS), ("store", "info"), ("store", "prune")])
    if os.environ.get("DEFT_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8")


def test_every_tool_is_a_subcommand_whose_options_set_its_input_fields():
    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001

    commands = subcommands(build_parser())
    for name, tool in TOOLS.items():
        group, _, action = name.partition("_")
        parser = subcommands(commands[group])[action] if action else commands[name]
        dests = {action.dest for action in parser._actions}  # noqa: SLF001
        # what the command line cannot set comes from the spec (embed/mine paths) or run (topn)
        assert dests >= set(tool.input.model_fields) - {"input_parquet", "output_parquet", "source_parquet",
                                                         "target_parquet", "mounts", "topn"}, name
