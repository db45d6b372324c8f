"""The run folder's files (the TAO contract's, plus ours) and the mining summary's format."""

from __future__ import annotations

import re
from enum import Enum
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from deft_mine.schemas.specs import LabelFilter

EMBEDDING_SPEC = "embedding_spec.yaml"
MINING_SPEC = "mining_spec.yaml"
TARGET_EMBEDDINGS = "target_embeddings.parquet"
SOURCE_EMBEDDINGS = "source_embeddings.parquet"
MINED = "mined.parquet"
CANDIDATES = "mined_candidates.parquet"  # with a history ledger: mined before selection
# With a floor, the DEFT loop's k-NN output before it: the unique images of the pairs the label rule
# kept (also where the docker backend keeps the image's own output when the host applies keys it lacks).
MINED_RAW = "mined_raw.parquet"
KNN_SUMMARY = "knn_summary.csv"  # with a floor, one row: candidate_count = kept_count + rejected_count, threshold
COSINE_FILTER_SUMMARY = "cosine_filter_summary.json"  # floor_rule=best_target: the loop's audit of each candidate
KNN_LOG = "nearest_neighbors.log"  # the mining container's whole log (an embedding step's: <output>.log)
SUMMARY = "mining_summary.txt"
TRAINING_ROWS = "mined_training_rows.csv"  # a ChangeNet pool's mined components as ChangeNet training rows
# The DEFT loop's per-iteration selection summary (filter_mined_history.py's keys), beside mined.parquet
MINING_HISTORY_SUMMARY = "mining_history_summary.json"
# Ours:
TARGET_LISTING = "target_listing.parquet"  # each side's listing (engine/listings), as every step read it
SOURCE_LISTING = "source_listing.parquet"
LEAKS = "leaks.parquet"  # pool rows left out as copies of protected images (filepath, protected_filepath, kind, score)


class LeakKind(str, Enum):
    """Why a pool row is a leak (leaks.parquet's `kind`)."""

    identical_bytes = "identical_bytes"  # its file's bytes are a protected image's (SHA-256)
    similar = "similar"  # its vector is within leak_similarity / leak_distance of a protected image's


class DuplicateKind(str, Enum):
    """Why a mined image was collapsed into one kept before it (near_duplicates.parquet's `kind`)."""

    identical_bytes = "identical_bytes"  # its file's bytes are the kept image's (always on)
    similar = "similar"  # its vector is within dedup_similarity / dedup_distance of the kept image's


PROTECTED_LISTING = "protected_listing.parquet"  # run --protect: the protected images (absolute paths), one listing
PROTECTED_EMBEDDINGS = "protected_embeddings.parquet"  # ...embedded, with leak_similarity / leak_distance
PROTECTED = "protected.parquet"  # the guard in the search: the targets, then the protect listings' images (and vectors)
LEAK_PAIRS_PICTURE = "leak_pairs.png"  # the report's sheet: protected images beside the pool rows that copy them
LEAK_NEAREST_PICTURE = "leak_nearest.png"  # ...and each pool row's nearest protected score, the threshold marked
PAIRS = "mined_pairs.parquet"  # every (target, neighbour) pair: what the report draws
# With dedup_similarity / dedup_distance, beside the mined parquet: each collapsed image, the kept
# image it was collapsed into (duplicate_of) and their similarity (cosine) or distance
NEAR_DUPLICATES = "near_duplicates.parquet"
NEAR_DUPLICATES_PICTURE = "near_duplicates.png"  # the report's sheet: kept images beside the ones collapsed into them
MANIFEST = "run.json"  # every fact the report states
REPORT = "Mining_Report.md"
# Provenance, written with the report (TAO's packaging hook did the same):
MINING_CONFIG = "mining_config"  # the specs as resolved, environment.json, invocation.json
ENVIRONMENT = "environment.json"  # versions of deft-mine, Python and the packages; the device
INVOCATION = "invocation.json"  # the exact command or MCP call that made the run
SESSION_LOG = "session.jsonl"  # one line per tool call of the MCP session (the CLI: the command)


# tmm unique_neighbor_matching's output folder (the container's names)
UNIQUE_FINAL = "final_unique_files.parquet"  # filepath first, then matched_target, distance, class, subset, pass
UNIQUE_SUMMARY = "summary.json"  # the container's keys, then ours (passes, shortfall)
# run mode=unique: the matcher's output folder inside the run folder, the spec it ran (in that folder),
# and the pool files the history ledger's earlier iterations selected (its exclude_path, in the run folder)
UNIQUE_FOLDER = "unique_matching"
UNIQUE_SPEC = "unique_matching_spec.yaml"
UNIQUE_EXCLUDE = "previously_selected.parquet"

# choose's output folder (it also writes EMBEDDING_SPEC and MINING_SPEC, ready for `run -e … -m …`)
CHOICE = "choice.json"  # every score: each encoder's agreement by k and by label, the pick, the suggestions
CHOICE_REPORT = "Encoder_Choice.md"  # the table, the pick, why, what would change it
CHOICE_PLOT = "encoder_choice.png"  # agreement against k per encoder; same- vs cross-label similarities
CHOICE_SAMPLE = "choice_sample.parquet"  # the label-stratified sample, as every encoder embedded it
CHOICE_TARGETS = "choice_targets.parquet"  # the targets' listing, as every encoder embedded it


def choice_embeddings(slug: str, targets: bool = False) -> str:
    """One candidate encoder's embeddings of the sample (or of the targets) in choose's folder."""
    return f"{'targets' if targets else 'sample'}_embeddings_{slug}.parquet"


def unique_pass(subset: str, number: int, topn: int) -> str:
    """One pass's picks, as the container names them (subset: global, a class, CLASS_fallback, non_rare)."""
    return f"{subset}_iteration_{number}_topn_{topn}.parquet"


def unique_class_picture(group: str) -> str:
    """visualize's contact sheet of one group (a rare class, non_rare, or global), as the container
    names its per-class picture; a character a file name cannot hold becomes `_`."""
    return "viz_class_" + "".join(c if c.isalnum() or c in "._-" else "_" for c in group) + ".png"


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
    """mining_summary.txt: one mining step's counts and the label filter's outcome. The file opens
    with the TAO container's own block (its lines, words and order: a script written against the
    container reads ours unchanged), then ours, one `key: value` per line, in the fields' order; an
    optional count is written only when set."""

    queries: int | None = _count("targets searched (embedded target rows)", "num_queries", "number_of_queries",
                                  "targets")
    topn: int | None = _count("neighbours asked for per target")
    neighbours_requested: int | None = _count("queries × topn", "neighbors_requested")
    pool: int | None = _count("pool rows searched")
    pairs: int | None = _count("(target, neighbour) pairs found")
    kept_pairs: int | None = _count("pairs whose labels agree (kept by the filter)", "kept")
    dropped_pairs: int | None = _count("pairs whose labels differ (dropped)", "dropped")
    below_floor: int | None = _count("pairs the label filter kept that lie beyond distance_threshold (dropped)")
    duplicates_removed: int | None = _count("kept pairs that repeat an image already mined", "duplicates")
    near_duplicates_removed: int | None = _count("mined images within dedup_similarity / dedup_distance of an "
                                                 "image kept before them (collapsed into it)")
    identical_images: int | None = _count("mined images whose bytes repeat an image mined before them under "
                                          "another path (mined once)")
    mined: int | None = _count("unique images written to the mined parquet", "unique_mined")
    target_in_pool: int | None = _count("pool rows whose filepath is also a target")
    targets_without_neighbours: int | None = _count("targets that kept no pair (floor or per-label search)")
    duplicate_paths: int | None = _count()  # pool rows repeating an earlier row's file
    zero_vectors: int | None = _count()  # all-zero vectors left out under cosine
    label_filter: LabelFilter | None = None
    distance_threshold: float | None = None  # the floor as the container states it (its metric's distance)
    saved_to: str | None = None  # the mined parquet (the container's `Results saved to`)
    extra: dict[str, int] = field(default_factory=dict)  # another tool's counts, under its names
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)  # a read file's key order

    def as_dict(self) -> dict[str, int]:
        """The counts by name (MineResult.summary, run.json), in a read file's order, else ours."""
        counts = {name: value for name in _COUNTS if (value := getattr(self, name)) is not None} | self.extra
        first = [name for name in self.order if name in counts]
        return {name: counts[name] for name in [*first, *(n for n in counts if n not in first)]}

    def text(self) -> str:
        """The file: the container's block, then ours, the label filter's outcome last."""
        lines = [*self.as_dict().items(), ("label_filter", self.label_filter)]
        return "".join(f"{line}\n" for line in self.container_lines()) + "".join(
            f"{key}: {value}\n" for key, value in lines)

    def container_lines(self) -> list[str]:
        """The TAO container's summary block (its current release's lines) from our counts."""
        if self.queries is None or self.pairs is None or self.mined is None or self.topn is None:
            return []  # e.g. run mode=unique: no topn, so not the container's nearest_neighbors summary
        kept = self.pairs - (self.dropped_pairs or 0)
        candidates = kept - (self.below_floor or 0)
        lines = ["Summary:", f"  Target queries: {self.queries}", f"  Similar items per query: {self.topn}",
                 f"  Total pairs: {self.pairs}"]
        if self.label_filter is LabelFilter.applied:
            lines.append(f"  After label mismatch filtering: kept {kept}/{self.pairs} pairs, "
                         f"dropped {self.dropped_pairs} mismatches")
        if self.distance_threshold is not None:
            lines.append(f"  After distance filtering: kept {candidates}/{kept} pairs, dropped "
                         f"{self.below_floor or 0} exceeding threshold {self.distance_threshold:.4f}")
        lines += [f"  Total candidates: {candidates}", f"  Duplicates removed: {self.duplicates_removed}",
                  f"  Unique items saved: {self.mined}"]
        return lines + ([f"  Results saved to: {self.saved_to}"] if self.saved_to else [])

    @classmethod
    def of(cls, counts: Mapping[str, int], label_filter: LabelFilter | str | None = None) -> MiningSummary:
        """A summary from counts by name (run.json's `summary`, a file's lines), keeping their order."""
        return cls(**{k: v for k, v in counts.items() if k in _COUNTS},
                   extra={k: v for k, v in counts.items() if k not in _COUNTS},
                   label_filter=None if label_filter is None else LabelFilter(label_filter), order=tuple(counts))

    @classmethod
    def parse(cls, text: str) -> MiningSummary:
        """A mining summary, ours or another tool's: the container's lines (both releases), then
        `key: value` or `key = value` lines (other spellings of our keys mapped to ours); the
        first line of a key wins."""
        counts: dict[str, int] = {}
        found: dict[str, Any] = {}  # what the container's lines say, under our names
        label_filter = None
        for line in text.splitlines():
            if _container_line(line.strip(), found):
                continue
            match = re.match(r"\s*([^:=]+?)\s*[:=]\s*(.+?)\s*$", line)
            if not match:
                continue
            key = re.sub(r"[^a-z0-9]+", "_", match.group(1).lower()).strip("_")
            key, value = SUMMARY_ALIASES.get(key, key), match.group(2)
            if key == "label_filter":
                label_filter = value if value in LabelFilter.__members__ else None
            elif re.fullmatch(r"[+-]?\d+", value):
                counts.setdefault(key, int(value))
        summary = cls.of(counts, label_filter or found.pop("label_filter", None))
        for name, value in found.items():
            if getattr(summary, name) is None:
                setattr(summary, name, value)
        return summary


# The container's summary lines (current release, and 7.1.0's trailing label line), by what they
# state in our names; None: a number we derive instead (candidates: kept pairs within the threshold).
_CONTAINER_LINES = [(re.compile(pattern), names) for pattern, names in (
    (r"Target queries: (\d+)", ("queries",)),
    (r"Similar items per query: (\d+)", ("topn",)),
    (r"Total pairs: (\d+)", ("pairs",)),
    (r"(?:After label mismatch filtering|Label filtering): kept (\d+)/(\d+) pairs, dropped (\d+) mismatches",
     ("kept_pairs", "pairs", "dropped_pairs")),
    (r"After distance filtering: kept (\d+)/(\d+) pairs, dropped (\d+) exceeding threshold (\S+)",
     (None, None, "below_floor", "distance_threshold")),
    (r"Total candidates: (\d+)", (None,)),
    (r"Duplicates removed: (\d+)", ("duplicates_removed",)),
    (r"Unique items saved: (\d+)", ("mined",)),
    (r"Results saved to: (.+)", ("saved_to",)),
)]


def _container_line(line: str, found: dict[str, Any]) -> bool:
    """Read one of the container's summary lines into `found` (first wins); False: not one of them."""
    for pattern, names in _CONTAINER_LINES:
        if (match := pattern.fullmatch(line)) is None:
            continue
        for name, value in zip(names, match.groups()):
            if name is not None:
                found.setdefault(name, value if name == "saved_to" else
                                 float(value) if name == "distance_threshold" else int(value))
        if "dropped_pairs" in names:
            found.setdefault("label_filter", LabelFilter.applied.value)
        return True
    return False


_COUNTS = tuple(f.name for f in fields(MiningSummary) if "meaning" in f.metadata)
SUMMARY_ALIASES = {alias: f.name for f in fields(MiningSummary) for alias in f.metadata.get("aliases", ())}
# What each count means, where the report explains it.
SUMMARY_MEANING = {f.name: f.metadata["meaning"] for f in fields(MiningSummary) if f.metadata.get("meaning")}
