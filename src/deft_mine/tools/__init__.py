"""The tools: one module each; the MCP server, the CLI and pytest all call these."""

from deft_mine.tools.embed import embed
from deft_mine.tools.mine import mine
from deft_mine.tools.run import run

__all__ = ["embed", "mine", "run"]
