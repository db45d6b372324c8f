"""The run folder's files (the TAO contract's, plus ours) and the mining summary's format."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from deft_mine.schemas.specs import LabelFilter

EMBEDDING_SPEC = "embedding_spec.yaml"
MINING_SPEC = "mining_spec.yaml"
TARGET_EMBEDDINGS = "target_embeddings.parquet"
SOURCE_EMBEDDINGS = "source_embeddings.parquet"
MINED = "mined.parquet"
CANDIDATES = "mined_candidates.parquet"  # with a history ledger: mined before selection
SUMMARY = "mining_summary.txt"
# Ours:
TARGET_LISTING = "target_listing.parquet"  # each side's listing (engine/listings), as every step read it
SOURCE_LISTING = "source_listing.parquet"
PAIRS = "mined_pairs.parquet"  # every (target, neighbour) pair: what the report draws
MANIFEST = "run.json"  # every fact the report states
REPORT = "Mining_Report.md"
# Provenance, written with the report (TAO's packaging hook did the same):
MINING_CONFIG = "mining_config"  # the specs as resolved, environment.json, invocation.json
ENVIRONMENT = "environment.json"  # versions of deft-mine, Python and the packages; the device
INVOCATION = "invocation.json"  # the exact command or MCP call that made the run
SESSION_LOG = "session.jsonl"  # one line per tool call of the MCP session (the CLI: the command)


def task_result(output_name: str) -> str:
    """deft-mine-task's result JSON (an EmbedResult or MineResult), hidden beside its output: the
    docker backend reads its facts from there instead of from the container's log."""
    return f".{output_name}.result.json"


def _count(meaning: str = "", *aliases: str) -> Any:
    """An optional count of the summary, what it means (the report's table explains it), and
    how other tools may spell it (read as ours)."""
    return field(default=None, metadata={"meaning": meaning, "aliases": aliases})


@dataclass
class MiningSummary:
    """mining_summary.txt: one mining step's counts and the label filter's outcome. The fields'
    order is the file's; an optional count is written only when set (a default run's summary
    reads as it always has)."""

    queries: int | None = _count("targets searched (embedded target rows)", "num_queries", "number_of_queries",
                                  "targets")
    topn: int | None = _count("neighbours asked for per target")
    neighbours_requested: int | None = _count("queries × topn", "neighbors_requested")
    pool: int | None = _count("pool rows searched")
    pairs: int | None = _count("(target, neighbour) pairs found")
    below_floor: int | None = _count("pairs beyond the similarity floor (dropped before de-duplication)")
    kept_pairs: int | None = _count("pairs whose labels agree (kept by the filter)", "kept")
    dropped_pairs: int | None = _count("pairs whose labels differ (dropped)", "dropped")
    duplicates_removed: int | None = _count("kept pairs that repeat an image already mined", "duplicates")
    mined: int | None = _count("unique images written to the mined parquet", "unique_mined")
    target_in_pool: int | None = _count("pool rows whose filepath is also a target")
    targets_without_neighbours: int | None = _count("targets that kept no pair (floor or per-label search)")
    duplicate_paths: int | None = _count()  # pool rows repeating an earlier row's file
    zero_vectors: int | None = _count()  # all-zero vectors left out under cosine
    label_filter: LabelFilter | None = None
    extra: dict[str, int] = field(default_factory=dict)  # another tool's counts, under its names
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)  # a read file's key order

    def as_dict(self) -> dict[str, int]:
        """The counts by name (MineResult.summary, run.json), in a read file's order, else ours."""
        counts = {name: value for name in _COUNTS if (value := getattr(self, name)) is not None} | self.extra
        first = [name for name in self.order if name in counts]
        return {name: counts[name] for name in [*first, *(n for n in counts if n not in first)]}

    def text(self) -> str:
        """The file: one `key: value` per line, the label filter's outcome last."""
        lines = [*self.as_dict().items(), ("label_filter", self.label_filter)]
        return "".join(f"{key}: {value}\n" for key, value in lines)

    @classmethod
    def of(cls, counts: Mapping[str, int], label_filter: LabelFilter | str | None = None) -> MiningSummary:
        """A summary from counts by name (run.json's `summary`, a file's lines), keeping their order."""
        return cls(**{k: v for k, v in counts.items() if k in _COUNTS},
                   extra={k: v for k, v in counts.items() if k not in _COUNTS},
                   label_filter=None if label_filter is None else LabelFilter(label_filter), order=tuple(counts))

    @classmethod
    def parse(cls, text: str) -> MiningSummary:
        """A mining summary, ours or another tool's (`key: value` or `key = value`; other
        spellings of our keys are mapped to ours); the first line of a key wins."""
        counts: dict[str, int] = {}
        label_filter = None
        for line in text.splitlines():
            match = re.match(r"\s*([^:=]+?)\s*[:=]\s*(.+?)\s*$", line)
            if not match:
                continue
            key = re.sub(r"[^a-z0-9]+", "_", match.group(1).lower()).strip("_")
            key, value = SUMMARY_ALIASES.get(key, key), match.group(2)
            if key == "label_filter":
                label_filter = value if value in LabelFilter.__members__ else None
            elif re.fullmatch(r"[+-]?\d+", value):
                counts.setdefault(key, int(value))
        return cls.of(counts, label_filter)


_COUNTS = tuple(f.name for f in fields(MiningSummary) if "meaning" in f.metadata)
SUMMARY_ALIASES = {alias: f.name for f in fields(MiningSummary) for alias in f.metadata.get("aliases", ())}
# What each count means, where the report explains it.
SUMMARY_MEANING = {f.name: f.metadata["meaning"] for f in fields(MiningSummary) if f.metadata.get("meaning")}
