"""The backend contract: what tools hand a backend, what they get back, what it can do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from deft_mine.engine.listings import Listing
from deft_mine.events import Events
from deft_mine.schemas.results import Check, ClusterFacts, EmbedResult
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec
from deft_mine.schemas.warnings import ToolWarning


@dataclass
class BackendMine:
    """Facts about one finished mining step (mined parquet and summary already written)."""

    summary: dict[str, int]
    label_filter: str
    label_missing: list[str]
    searched_rows: int
    target_in_pool: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[ToolWarning] = field(default_factory=list)  # what the engine saw in the data
    cluster: ClusterFacts | None = None  # where it ran (backend ray)


@dataclass(frozen=True)
class Capabilities:
    writes_pairs: bool  # mine() fills `pairs_path` (the report's contact sheet and score histogram)
    runs_tao_checkpoints: bool  # embeds model=<TAO kind> with a .pth/.ckpt model_path


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def check(self, output_dir: Path, store: Path | None = None) -> tuple[list[Check], list[str]]:
        """Preflight: can this backend run here (its checks, the embedding `store`'s use
        among them), and the GPUs it would use."""

    def embed(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
              store: Path | None) -> EmbedResult:
        """Write `output_path` from the `listing`, reusing and adding to the embedding `store` (None: off); the
        result's warnings are the tool's to add."""

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, output_path: Path,
             summary_path: Path, events: Events, pairs_path: Path | None = None) -> BackendMine:
        """Write `output_path` and `summary_path` (and every pair found to `pairs_path`)."""
