"""Every error code deft-mine raises is explained, with its fix, in the troubleshooting page
(served as an MCP resource): a new code without a row there fails here."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deft_mine"


def raised_codes() -> dict[str, str]:
    """Each literal code given to DeftError(...) in the package, with a file that raises it."""
    codes: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "DeftError"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                codes.setdefault(node.args[0].value, str(path.relative_to(SRC)))
    return codes


def test_every_raised_code_has_a_row_in_troubleshooting():
    page = (SRC / "references" / "troubleshooting.md").read_text()
    codes = raised_codes()
    assert len(codes) > 30  # the scan finds the codes (a broken scan would pass vacuously)
    missing = {code: where for code, where in codes.items() if f"`{code}`" not in page}
    assert not missing, f"codes raised but not explained in references/troubleshooting.md: {missing}"
