"""The tools: one module each; the MCP server, the CLI and pytest all call these."""

from deft_mine.tools.embed import embed
from deft_mine.tools.mine import mine
from deft_mine.tools.preflight import preflight
from deft_mine.tools.report import report
from deft_mine.tools.run import run
from deft_mine.tools.select import select

__all__ = ["embed", "mine", "preflight", "report", "run", "select"]
