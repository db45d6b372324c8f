"""The tools, one module each, registered in TOOLS in the order clients list them; the MCP
server, the command line and pytest all drive these."""

from deft_mine.tools.embed import embed
from deft_mine.tools.match import match
from deft_mine.tools.mine import mine
from deft_mine.tools.preflight import preflight
from deft_mine.tools.registry import TOOLS, Tool, ToolContext
from deft_mine.tools.report import report
from deft_mine.tools.run import run
from deft_mine.tools.select import select
from deft_mine.tools.store import store_info, store_prune
from deft_mine.tools.choose import choose  # noqa: E402,I001  after run: clients list it there

__all__ = ["TOOLS", "Tool", "ToolContext", "choose", "embed", "match", "mine", "preflight", "report", "run", "select",
           "store_info", "store_prune"]
