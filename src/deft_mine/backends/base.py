"""The backend contract: what tools hand a backend, what they get back, what it can do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deft_mine.engine.embedding import EmbedStats
from deft_mine.engine.leak_search import LeakOutcome
from deft_mine.engine.listings import Listing
from deft_mine.events import Events
from deft_mine.schemas import artifacts
from deft_mine.schemas.artifacts import MiningSummary
from deft_mine.schemas.results import Check, ClusterFacts, EncoderIdentity
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, Side, UniqueMatchingSpec
from deft_mine.schemas.warnings import ToolWarning


@dataclass
class BackendEmbed:
    """Facts about one finished embedding step (the embedding parquet already written)."""

    stats: EmbedStats
    encoder: EncoderIdentity
    dim: int
    device: str
    timings: dict[str, float]  # loading the encoder, then each stage of the batches
    cluster: ClusterFacts | None = None  # where it ran (backend ray)


@dataclass
class BackendMine:
    """Facts about one finished mining step (mined parquet and summary already written)."""

    summary: MiningSummary  # the label filter's outcome among it
    label_missing: list[Side]
    searched_rows: int
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[ToolWarning] = field(default_factory=list)  # what the engine saw in the data
    cluster: ClusterFacts | None = None  # where it ran (backend ray)
    leaks: LeakOutcome | None = None  # the guard in the search: leaks.parquet written beside


@dataclass
class BackendMatch:
    """Facts about one finished unique matching (output_dir's files already written)."""

    summary: dict[str, Any]  # summary.json as written (the container's keys, then ours when the engine is ours)
    warnings: list[ToolWarning] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cluster: ClusterFacts | None = None  # where it ran (backend ray)


@dataclass(frozen=True)
class MineOutputs:
    """Where a mining step writes: the mined parquet, mining_summary.txt beside it, (when the
    backend can and the caller wants them) every pair found, and (`loop_files`, a run folder's)
    the DEFT loop's floor-stage files beside it when a floor is set."""

    mined: Path
    pairs: Path | None = None
    loop_files: bool = False

    @property
    def summary(self) -> Path:
        return self.mined.parent / artifacts.SUMMARY

    @property
    def leaks(self) -> Path:
        """The leaks the guard in the search found (leaks.parquet), beside the mined parquet."""
        return self.mined.parent / artifacts.LEAKS

    @property
    def near_duplicates(self) -> Path:
        """The mined images collapsed into one kept (near_duplicates.parquet), beside the mined parquet."""
        return self.mined.parent / artifacts.NEAR_DUPLICATES

    @property
    def raw(self) -> Path:
        """The k-NN output before the floor (mined_raw.parquet)."""
        return self.mined.parent / artifacts.MINED_RAW

    @property
    def knn_summary(self) -> Path:
        return self.mined.parent / artifacts.KNN_SUMMARY

    @property
    def cosine_filter(self) -> Path:
        """floor_rule=best_target's audit (cosine_filter_summary.json)."""
        return self.mined.parent / artifacts.COSINE_FILTER_SUMMARY


@dataclass(frozen=True)
class Capabilities:
    writes_pairs: bool  # mine() fills `outputs.pairs` (the report's contact sheet and score histogram)
    runs_tao_checkpoints: bool  # embeds model=<TAO kind> with a .pth/.ckpt model_path
    reads_parquet_only: bool = False  # embed() hands the listing's file to a program that reads parquet only
    runs_unique_matching: bool = False  # match() runs `tmm unique_neighbor_matching` (docker: if the image has it)
    loads_encoders_here: bool = False  # embed() loads the encoder in this process (choose probes each candidate)
    leaves_rows_out: bool = True  # mine() can leave pool rows out (leaks): in deft-mine's code, or on the host
    guards_in_search: bool = False  # mine() judges its candidates against protected_parquet (leak_scope=mined)
    runs_text_embeddings: bool = False  # embed_text() runs `embedding text_embeddings` (docker: if the image has it;
    # ray: embed_texts in a task on the cluster)


def match_unsupported(backend: str, why: str) -> DeftError:
    """The refusal of `tmm unique_neighbor_matching` by a backend that cannot run it, before any work."""
    return DeftError("backend_unsupported", f"backend={backend} cannot run tmm unique_neighbor_matching: {why}",
                     fix="use backend=local (it runs the matching in-process)", field="backend", backend=backend,
                     action="tmm unique_neighbor_matching")


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def check(self, output_dir: Path, store: Path | None = None) -> tuple[list[Check], list[str]]:
        """Preflight: can this backend run here (its checks, the embedding `store`'s use
        among them), and the GPUs it would use."""

    def accepts(self, spec: MiningSpec) -> None:
        """Refuse, before any work, a mining spec this backend cannot honour (its paths set)."""

    def embed(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
              store: Path | None) -> BackendEmbed:
        """Write `output_path` from the `listing`, reusing and adding to the embedding `store` (None: off)."""

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
             events: Events) -> BackendMine:
        """Write the `outputs` (each atomically) and say what was found."""

    def accepts_text(self) -> None:
        """Refuse, before any work, sentences it cannot embed; only a backend whose capabilities
        say runs_text_embeddings."""

    def embed_text(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                   store: Path | None) -> BackendEmbed:
        """Write `output_path` (text, embedding, the other columns) from a text `listing`; only a
        backend whose capabilities say runs_text_embeddings."""

    def match(self, spec: UniqueMatchingSpec, events: Events) -> BackendMatch:
        """Write the spec's output_dir (per-pass parquets, final_unique_files.parquet, summary.json)
        and say what was found; only a backend whose capabilities say runs_unique_matching."""
