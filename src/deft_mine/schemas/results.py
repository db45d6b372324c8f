"""What tools return: warnings, errors, encoder identity and one result model per tool."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field


class ToolWarning(BaseModel):
    """A condition the caller must see: the run went on, but not quite as asked."""

    code: str = Field(description="stable: filter_by_label_noop, provenance_unknown, pool_exhausted, "
                      "images_skipped, target_in_pool, …")
    message: str
    fields: list[str] = Field(default_factory=list, description="spec fields / columns involved")
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorInfo(BaseModel):
    """A refused request, as data."""

    code: str
    message: str
    fix: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class EncoderIdentity(BaseModel):
    """What makes two embeddings comparable; batch_size is deliberately not part of it."""

    model: str
    model_path: str | None = None
    model_config_path: str | None = None
    weights_digest: str | None = None
    preprocessing: dict[str, Any] = Field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class EmbedResult(BaseModel):
    output_parquet: str
    rows: int = Field(description="rows written (input rows less skipped images)")
    input_rows: int
    columns: list[str]
    skipped: int = Field(description="rows left out because their image could not be read")
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)
    skipped_examples: list[str] = Field(default_factory=list)
    encoder: EncoderIdentity
    embedding_dim: int
    device: str
    backend: str = "local"
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[ToolWarning] = Field(default_factory=list)


class MineResult(BaseModel):
    output_parquet: str
    summary_path: str
    mined: int
    summary: dict[str, int] = Field(description="the keys of mining_summary.txt")
    knn_metric: str
    topn: int
    filter_by_label: bool
    label_filter: str = Field(description="off | applied | noop (asked for, but a side has no label)")
    encoder: EncoderIdentity | None = Field(None, description="shared identity of both inputs, if recorded")
    backend: str = "local"
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[ToolWarning] = Field(default_factory=list)


class RunResult(BaseModel):
    run_dir: str
    mined: int
    mined_parquet: str
    target_embed: EmbedResult
    source_embed: EmbedResult
    mine: MineResult
    select: "SelectResult | None" = Field(None, description="the history-aware selection (runs with a ledger)")
    report: "ReportResult"
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[ToolWarning] = Field(default_factory=list)


class ReportResult(BaseModel):
    """What `report` wrote: Mining_Report.md, its pictures, and what it could not state."""

    report_path: str
    words: int = Field(description="words in the report (tokens holding a letter or digit)")
    verdict: Literal["ok", "attention", "failed"]
    pictures: list[str] = Field(default_factory=list, description="PNG file names in the run folder")
    missing_facts: list[str] = Field(default_factory=list,
                                     description="facts the folder did not record (e.g. no run.json)")
    warnings: list[ToolWarning] = Field(default_factory=list)



class SelectResult(BaseModel):
    """One DEFT iteration's history-aware selection, as recorded in the ledger."""

    output: str = Field(description="the selected rows (candidates' order and columns kept)")
    ledger: str
    iteration: int
    candidates: int = Field(description="candidate rows read")
    previously_selected: int = Field(description="candidates an earlier iteration already selected")
    duplicates_in_candidates: int = Field(description="repeats of a path earlier in the candidates")
    newly_selected: int = Field(description="rows written to output")
    cumulative_selected: int = Field(description="paths selected over all iterations so far")
    resumed: bool = Field(description="this iteration was already recorded: its files were re-verified")
    warnings: list[ToolWarning] = Field(default_factory=list)


RunResult.model_rebuild()  # it names ReportResult and SelectResult, defined after it
