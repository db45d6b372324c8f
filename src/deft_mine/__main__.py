"""`python -m deft_mine` starts the MCP server (same as `deft-mine serve`)."""

import sys

from deft_mine.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
