"""Pydantic models at the boundaries: specs, tool results, warnings, errors."""

from deft_mine.schemas.results import (
    EmbedResult,
    EncoderIdentity,
    ErrorInfo,
    MineResult,
    RunResult,
    ToolWarning,
)
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, load_spec

__all__ = [
    "EmbedResult", "EmbeddingSpec", "EncoderIdentity", "ErrorInfo", "MineResult", "MiningSpec",
    "RunResult", "ToolWarning", "load_spec",
]
