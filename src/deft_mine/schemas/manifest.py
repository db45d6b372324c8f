"""RunManifest: run.json, the typed record of every fact a run folder's report states.

Every field may be None: a folder the TAO container filled has no run.json, and the report
rebuilds what it can of one from the files, leaving the rest unknown. Fields never set are left
out of run.json (`dump`), so a failed run's file has no `encoder`, a finished one no `error`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from deft_mine.schemas.results import (ClusterFacts, EncoderIdentity, ErrorInfo, LeakFacts, SelectResult,
                                       TrainingRowsResult)
from deft_mine.schemas.specs import LabelFilter
from deft_mine.schemas.warnings import ToolWarning


class InputFacts(BaseModel):
    """One input listing (targets or pool) as it was read."""

    path: str | None = None
    format: str | None = None  # "parquet" | "csv" | "changenet"
    images_root: str | None = None  # where its relative image paths resolve (a ChangeNet CSV: images_dir)
    rows: int | None = None
    columns: list[str] | None = None
    has_label: bool | None = None


class Inputs(BaseModel):
    targets: InputFacts = Field(default_factory=InputFacts)
    source: InputFacts = Field(default_factory=InputFacts)


#: A step's `cluster` is written only for a step that ran on a cluster, so a local run's run.json
#: reads as it always has.
ClusterField = Field(None, exclude_if=lambda cluster: cluster is None)


class EmbedFacts(BaseModel):
    """One embedding step's outcome."""

    rows: int | None = None
    input_rows: int | None = None
    skipped: int | None = None
    skipped_by_reason: dict[str, int] | None = None
    embedding_dim: int | None = None
    device: str | None = None
    store: str | None = None  # the embedding store (None: off, or not recorded)
    reused: int | None = None  # rows whose vector came from the store
    embedded: int | None = None  # rows the encoder ran on
    seconds_saved: float | None = None
    timings: dict[str, float] | None = None
    cluster: ClusterFacts | None = ClusterField  # backend ray: address, nodes, workers, GPUs


class Embeddings(BaseModel):
    target: EmbedFacts = Field(default_factory=EmbedFacts)
    source: EmbedFacts = Field(default_factory=EmbedFacts)


class EncoderFacts(BaseModel):
    target: EncoderIdentity | None = None
    source: EncoderIdentity | None = None
    match: bool | None = None
    fingerprint: str | None = None


class LabelCounts(BaseModel):
    targets: dict[str, int] | None = None  # target rows per label
    mined: dict[str, int] | None = None  # mined images per pool label
    # Labels spelled more than one way, counted as one class (the container's rule: case and
    # padding do not matter): its name (first spelling) -> every spelling seen. Left out when none.
    merged: dict[str, list[str]] = Field(default_factory=dict, exclude_if=lambda merged: not merged)


class UniqueGroupFacts(BaseModel):
    """One group of a budget (global; or a rare class, non_rare): its quota, what it got, and why short."""

    group: str
    quota: int
    got: int
    from_non_rare: int = 0  # of `got`, taken from the non_rare pool when the rare class's own ran dry
    shortfall: int = 0
    reason: str | None = None  # pool_spent | class_empty | excluded (None: not short)


class UniqueFacts(BaseModel):
    """run mode=unique: how the budget of unique images was spent (from the matcher's summary.json)."""

    folder: str  # the matcher's output folder, relative to the run folder
    allocation_policy: str
    desired: int
    retrieved: int
    coverage_pct: float
    distance_metric: str
    candidate_expansion_factor: int | None = None
    rare_classes: list[str] = Field(default_factory=list)
    excluded_rows: int = 0  # pool rows exclude_path (the ledger's earlier selections) kept out
    passes: int = 0
    groups: list[UniqueGroupFacts] = Field(default_factory=list)
    # with dedup_similarity / dedup_distance: pool files set aside as near copies of held ones (listed in
    # the folder's near_duplicates.parquet); left out of run.json with the rule off
    near_duplicates_removed: int | None = Field(None, exclude_if=lambda value: value is None)


class MiningFacts(BaseModel):
    summary: dict[str, int] = Field(default_factory=dict)  # the counts of mining_summary.txt
    label_filter: LabelFilter | None = None
    knn_metric: str | None = None
    topn: int | None = None
    filter_by_label: bool | None = None
    labels: LabelCounts | None = None
    cluster: ClusterFacts | None = ClusterField  # backend ray: address, nodes, shard tasks
    # written only for a run with mode=unique, so a nearest run's run.json reads as it always has
    unique: UniqueFacts | None = Field(None, exclude_if=lambda unique: unique is None)


class IterationFacts(BaseModel):
    iteration: int
    candidates: int
    previously_selected: int
    newly_selected: int
    cumulative: int


class HistoryFacts(SelectResult):
    """This run's selection against the ledger, and every iteration the ledger holds."""

    warnings: list[ToolWarning] = Field(default_factory=list, exclude=True)
    iterations: list[IterationFacts] = Field(default_factory=list)


class TrainingRowsFacts(TrainingRowsResult):
    """mined_training_rows.csv as the run wrote it (a run whose pool is a ChangeNet CSV)."""


class RunManifest(BaseModel):
    deft_mine_version: str | None = None
    # "running": written when the folder is made, so a run killed outright (SIGKILL, power loss)
    #   never looks finished; "finished": every mining output is whole (the report is written
    #   after, and Mining_Report.md is absent if that failed); "failed": stopped by an error
    #   (`error` says which); "interrupted": stopped from outside (SIGINT, SIGTERM: error code
    #   `interrupted`; an MCP cancel: `cancelled`).
    status: str | None = None  # "running" | "finished" | "failed" | "interrupted"
    started_at: str | None = None
    host: str | None = None
    backend: str | None = None
    run_dir: str | None = None
    inputs: Inputs = Field(default_factory=Inputs)
    embedding_spec: dict[str, Any] | None = None  # the specs as written (a TAO spec may hold anything)
    mining_spec: dict[str, Any] | None = None
    error: ErrorInfo | None = None  # why a failed or interrupted run stopped
    finished_at: str | None = None
    encoder: EncoderFacts = Field(default_factory=EncoderFacts)
    embeddings: Embeddings = Field(default_factory=Embeddings)
    mining: MiningFacts = Field(default_factory=MiningFacts)
    history: HistoryFacts | None = None
    training_rows: TrainingRowsFacts | None = None  # set only with a ChangeNet pool (dump leaves it out else)
    leaks: LeakFacts | None = None  # set only when the leakage guard ran or found a leak (else left out)
    artifacts: list[str] | None = None
    warnings: list[ToolWarning] = Field(default_factory=list)
    timings: dict[str, float] | None = None

    def dump(self) -> str:
        """run.json's text: the facts set so far (nested models are always whole)."""
        data = self.model_dump(mode="json")
        return json.dumps({key: data[key] for key in data if key in self.model_fields_set}, indent=2) + "\n"
