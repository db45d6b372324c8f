"""The one exception type a refused request raises: a stable code, a message, the fix."""

from __future__ import annotations

from typing import Any


class DeftError(Exception):
    """A user error: bad input, refused request. Adapters turn it into exit 2 / isError."""

    def __init__(self, code: str, message: str, *, fix: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fix = fix
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f"\n  fix: {self.fix}" if self.fix else "")
