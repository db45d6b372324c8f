"""run mode=unique: the run folder's embeddings matched to a budget of unique pool images (the match
tool's `tmm unique_neighbor_matching`), laid out as a run's mined files, pairs and summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from deft_mine.backends import Backend
from deft_mine.backends.base import match_unsupported
from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.engine.leak_search import LeakOutcome, read_protected
from deft_mine.engine.leaks import TARGETS, leak_table
from deft_mine.engine.listings import Listing
from deft_mine.engine.mining import label_text
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts
from deft_mine.schemas.manifest import UniqueFacts, UniqueGroupFacts
from deft_mine.schemas.results import MatchResult
from deft_mine.schemas.specs import AllocationPolicy, ExcludeBy, LabelFilter, Metric, MiningSpec, spec_to_yaml
from deft_mine.tools.match import match_spec
from deft_mine.tools.registry import ToolContext

MINED_COLUMNS = ("filepath", "matched_target", "distance", "class")  # mined.parquet's, of final_unique_files


@dataclass
class UniquePaths:
    """The run folder's files a unique run reads and writes."""

    folder: Path
    targets: Path  # target embeddings
    source: Path  # pool embeddings
    mined: Path  # mined.parquet, or mined_candidates.parquet with a ledger
    pairs: Path
    target_key: str = "filepath"  # what names a target (sentences as targets: their `text`)

    @property
    def output_dir(self) -> Path:
        return self.folder / artifacts.UNIQUE_FOLDER


def refuse_early(mining: MiningSpec, backend: Backend, given: dict[str, Listing]) -> None:
    """What unique mode can refuse before a run folder exists: a backend that cannot match,
    and class_stratified with a side that has no `label` to split the budget by."""
    if not backend.capabilities.runs_unique_matching:
        raise match_unsupported(backend.name, "mode=unique's one-to-one passes need a backend that runs them "
                                "(local, ray, or docker with an image that has the action)")
    if mining.allocation_policy is AllocationPolicy.class_stratified:
        for name, listing in given.items():
            if "label" not in listing.schema.names:
                raise DeftError("column_missing", f"{name} {listing.path} has no `label` column, and "
                                "allocation_policy=class_stratified splits the budget by each row's `label`",
                                fix="give both sides a `label` column, or use allocation_policy=global",
                                field=name, column="label", path=str(listing.path))


@dataclass
class Exclusion:
    """The ledger's earlier selections as the matcher's exclude_path, and how it must match them."""

    path: str
    by: ExcludeBy


def exclusions(ledger_path: Path, paths: UniquePaths, images_root: Path) -> Exclusion | None:
    """The pool files the ledger's earlier iterations selected, as the pool's own filepaths, written
    for the matcher's exclude_path so they take none of the budget (None: nothing to exclude). By
    the container's rule (full path or file name) unless a file name selected before is also the
    name of a pool file that was not: then by full path alone (one board's C1_SolderLight.jpg is
    not every board's)."""
    if not ledger_path.exists():
        return None
    book = ledgers.load(ledger_path, verify=False)  # run has checked it before embedding
    if not book.selected:
        return None
    pool = [p for p in dict.fromkeys(tables.read_columns(paths.source, ["filepath"]).column("filepath").to_pylist())
            if p is not None]
    chosen = [ledgers.identity(str(p), book.format, images_root) in book.selected for p in pool]
    taken = [p for p, was in zip(pool, chosen) if was]
    if not taken:
        return None
    names = {PurePosixPath(p).name for p in taken}
    shared = any(PurePosixPath(p).name in names for p, was in zip(pool, chosen) if not was)
    out = paths.folder / artifacts.UNIQUE_EXCLUDE
    tables.write_table_atomic(out, pa.table({"filepath": pa.array(taken, pa.string())}))
    return Exclusion(str(out), ExcludeBy.path if shared else ExcludeBy.path_or_name)


def match_run(mining: MiningSpec, paths: UniquePaths, exclude: Exclusion | None, backend: Backend,
              ctx: ToolContext) -> MatchResult:
    """The budget matched through the backend's `match` (as the match tool runs it) into the run
    folder's unique_matching/, its spec written there first; then the run's own files from it."""
    spec = mining.unique_spec(str(paths.source), str(paths.targets), str(paths.output_dir),
                              *((exclude.path, exclude.by) if exclude else ())).model_copy(
        update={"target_filepath_column": paths.target_key})
    paths.output_dir.mkdir(exist_ok=True)
    tables.write_text_atomic(paths.output_dir / artifacts.UNIQUE_SPEC, spec_to_yaml(spec))
    result = match_spec(spec, backend, ctx)
    final = tables.read_columns(Path(result.final_parquet), tables.schema_of(Path(result.final_parquet)).names)
    tables.write_table_atomic(paths.mined, final.select([c for c in MINED_COLUMNS if c in final.column_names]))
    tables.write_table_atomic(paths.pairs, pairs_table(final, paths, mining.knn_metric))
    matched = json.loads(Path(result.summary_path).read_text(encoding="utf-8"))
    summary = artifacts.MiningSummary(
        queries=tables.num_rows(paths.targets), pool=tables.num_rows(paths.source), pairs=final.num_rows,
        duplicates_removed=0, near_duplicates_removed=matched.get("near_duplicates_removed"), mined=final.num_rows,
        identical_images=matched.get("identical_images"),
        label_filter=LabelFilter.off)  # the rule's count is the matcher's (None: the rule was off)
    tables.write_text_atomic(paths.folder / artifacts.SUMMARY, summary.text())
    return result


def _rows_and_labels(path: Path, key: str = "filepath") -> tuple[dict[str, int], list[Any] | None]:
    """Each key's (filepath's) first row in an embedding parquet, and the rows' labels as text (None: no `label`)."""
    names = tables.schema_of(path).names
    table = tables.read_columns(path, [key] + (["label"] if "label" in names else []))
    first: dict[str, int] = {}
    for row, value in enumerate(table.column(key).to_pylist()):
        first.setdefault(str(value), row)
    return first, label_text(table.column("label")).to_pylist() if "label" in names else None


def pairs_table(final: pa.Table, paths: UniquePaths, metric: Metric) -> pa.Table:
    """mined_pairs.parquet of a budget: one kept pair per selected file, with the target that claimed
    it, ranked per target nearest first; `score` on the report's scale (cosine: 1 - distance)."""
    t_rows, t_labels = _rows_and_labels(paths.targets, paths.target_key)
    s_rows, s_labels = _rows_and_labels(paths.source)
    files = final.column("filepath").to_pylist()
    owners = [t_rows[str(t)] for t in final.column("matched_target").to_pylist()]
    distance = np.asarray(final.column("distance").to_pylist(), dtype=np.float64)
    order = sorted(range(len(files)), key=lambda i: (owners[i], distance[i], files[i]))
    rank, last = [], None
    for i in order:
        rank.append(rank[-1] + 1 if rank and owners[i] == last else 1)
        last = owners[i]
    sources = [s_rows[str(files[i])] for i in order]
    columns = {
        "target_filepath": pa.array([final.column("matched_target")[i].as_py() for i in order], pa.string()),
        "target_row": pa.array([owners[i] for i in order], pa.int64()),
        "rank": pa.array(rank, pa.int32()),
        "filepath": pa.array([files[i] for i in order], pa.string()),
        "source_row": pa.array(sources, pa.int64()),
        "score": pa.array([1.0 - distance[i] if metric is Metric.cosine else distance[i] for i in order], pa.float64()),
        "kept": pa.array([True] * len(order), pa.bool_()),
    }
    if t_labels is not None:
        columns["target_label"] = pa.array([t_labels[owners[i]] for i in order], pa.string())
    if s_labels is not None:
        columns["source_label"] = pa.array([s_labels[row] for row in sources], pa.string())
    return pa.table(columns)


def unique_facts(result: MatchResult, folder: Path, metric: Metric) -> UniqueFacts:
    """run.json's account of the budget: per group its quota, what it got and why it fell short."""
    summary = json.loads(Path(result.summary_path).read_text(encoding="utf-8"))
    short = {s.group: s for s in result.shortfalls}
    allocation = summary.get("allocation") or {}
    if result.allocation_policy == AllocationPolicy.class_stratified.value and allocation:
        quotas = {name: int(g["desired_count"]) for name, g in (allocation.get("per_class") or {}).items()}
        quotas["non_rare"] = int((allocation.get("non_rare") or {}).get("desired_count", 0))
        got = result.per_class or {}
    else:
        quotas, got = {"global": result.desired_unique_count}, {"global": result.retrieved_unique_count}
    final = Path(result.final_parquet)
    subsets = tables.read_columns(final, ["subset"]).column("subset").to_pylist() \
        if "subset" in tables.schema_of(final).names else []
    groups = [UniqueGroupFacts(group=name, quota=quota, got=got.get(name, 0),
                               from_non_rare=subsets.count(f"{name}_fallback"),
                               shortfall=short[name].missing if name in short else 0,
                               reason=short[name].reason if name in short else None) for name, quota in quotas.items()]
    return UniqueFacts(
        folder=str(Path(result.output_dir).relative_to(folder)), allocation_policy=result.allocation_policy,
        desired=result.desired_unique_count, retrieved=result.retrieved_unique_count, coverage_pct=result.coverage_pct,
        distance_metric=str(summary.get("distance_metric") or metric.value), rare_classes=list(summary.get("rare_classes") or []),
        candidate_expansion_factor=summary.get("candidate_expansion_factor"),
        excluded_rows=int(summary.get("excluded_rows") or 0), passes=len(result.passes), groups=groups,
        near_duplicates_removed=summary.get("near_duplicates_removed"))


def claimed_leaks(result: MatchResult, mining: MiningSpec) -> LeakOutcome | None:
    """The byte guard the matcher applied as it claimed (protected_parquet): what it judged and found,
    read back from unique_matching/ (leaks.parquet, summary.json) and the protected images."""
    if mining.protected_parquet is None:
        return None
    summary = json.loads(Path(result.summary_path).read_text(encoding="utf-8"))
    listed = Path(result.output_dir) / artifacts.LEAKS
    table = tables.read_columns(listed, tables.schema_of(listed).names) if listed.exists() else None
    protected = read_protected(Path(mining.protected_parquet), False)
    listings = list(dict.fromkeys(o for o in protected.origins if o != TARGETS))
    if table is None:  # nothing found: an empty table of leaks.parquet's columns
        table = leak_table(np.zeros(0, np.int64), [], np.zeros(0, np.int64), None, None, protected, mining.knn_metric,
                           None)
    return LeakOutcome(table, int(summary.get("leaks_judged") or 0), np.zeros(0), int(summary.get("pool_rows") or 0),
                       len(protected.origins), listings, bool(listings))
