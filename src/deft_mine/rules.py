"""The rulebook: each warning rule decided once, over a small facts record, with its action.

`mine` (after the search), `preflight` (before any work, from the listings) and the report (from
a run folder) each fill `Facts` with what they know and call `rule`; a rule's `Ruling` carries
the tool's warning, the report's sentence and the recommended action, so the three faces can
never disagree on whether a rule fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from deft_mine.schemas import warnings
from deft_mine.schemas.results import ErrorInfo
from deft_mine.schemas.specs import LabelFilter
from deft_mine.schemas.warnings import ToolWarning, WarningCode

NOT_RECORDED = "not recorded"

# What to do about the mining controls' warnings (decided by the mining engine, acted on here).
CONTROL_ACTIONS: dict[str, str] = {
    "floor_removed_all": "Loosen the floor (a lower `min_similarity`, a higher `max_distance`; the score "
                         "histogram shows where the pairs lie) and mine again: nothing was mined.",
    "targets_without_neighbours": "Look at those targets on the contact sheet: the pool may hold no real "
                                  "look-alike of them; grow the pool, or loosen the floor.",
    "training_rows_left_out": "Look at the left-out components (the warning lists examples by reason): give a "
                              "non-PASS row its golden image, restore a missing light, or pass "
                              "`--pass-golden self` for PASS rows of an OK-only pool; they stay in mined.parquet.",
    "leaks_excluded": "Nothing to undo: the copies of protected images were never mined; leaks.parquet "
                      "names each with the image it copies. Take them out of the pool for good, and check the "
                      "`similar` ones against the nearest-protected histogram if leak_similarity seems loose.",
    "training_rows_leaked": "Nothing to undo: the rows equal to validation rows were left out of "
                            "mined_training_rows.csv; if the pool holds validation images, take them out of it.",
    # ...and a selection's against the history ledger (decided by the select tool)
    "candidates_mostly_mined": "Raise `topn` for the next iteration so the search reaches past the images "
                               "earlier iterations took, or grow the pool.",
    "yield_collapsed": "Add new images to the pool before the next iteration: it is near exhaustion for these "
                       "targets (a larger `topn` helps only while look-alikes remain).",
    "budget_exhausted": "The selection budget is spent: raise `max_cumulative_fraction`, grow the pool, or stop "
                        "iterating (later rounds would select nothing new).",
    "label_missing_in_pool": "Grow the pool with images of those classes, or fix the spelling (labels compare "
                             "as the container compares them): with filter_by_label their yield is 0; under "
                             "label_mode=per_label, mining those targets with label_mode=post_filter is the other way.",
    "listing_empty": "Check that the right listing was given: an empty side embeds and mines nothing.",
    # ...and unique matching's budget (decided by the unique matching engine)
    "unique_count_short": "Lower `desired_unique_count`, grow the pool (or the short class's part of it), or "
                          "exclude less: summary.json's `shortfall` names each short group and why.",
}


@dataclass(frozen=True)
class Facts:
    """What the rules look at; None where the caller cannot know it (preflight: nothing mined yet)."""

    topn: int | None = None
    queries: int | None = None  # targets searched (preflight: target rows listed)
    pool: int | None = None  # pool rows searched (preflight: pool rows listed)
    mined: int | None = None
    filter_by_label: bool | None = None
    label_filter: LabelFilter | None = None  # the outcome, when already known
    sides_without_label: tuple[str, ...] = ()
    target_in_pool: int | None = None
    exclude_targets: bool | None = None  # None: predicted (preflight does not judge it)
    distance_threshold: float | None = None
    knn_metric: str | None = None
    sides_without_identity: tuple[str, ...] = ()  # embedding parquets that record no encoder identity
    predicted: bool = False  # preflight: before any work
    mine_command: str | None = None  # the report's command to re-run mining (its action names it)
    # What a run folder shows: the report's own rules (a tool call leaves `folder` False).
    folder: bool = False
    has_manifest: bool = True  # False: a folder the TAO container filled (no run.json)
    missing_facts: int = 0  # facts the folder could not state
    status: str | None = None  # run.json's
    error: ErrorInfo | None = None
    encoder_match: bool | None = None
    differing: tuple[str, ...] = ()  # identity fields the two sides differ in
    mined_name: str = "mined.parquet"
    mined_file: MinedFile | None = None  # None: no mined parquet in the folder
    summary_mined: int | None = None  # mined images, as the summary records them
    floored: str | None = None  # the floor's key, when every pair found was beyond it
    skipped: tuple[int, int] = (0, 0)  # targets and pool rows left out while embedding
    skipped_roots: str = ""  # where those images were read from
    skipped_examples: tuple[str, ...] = ()
    # the yield precheck: target labels (as written) no pool row carries, with their target counts
    labels_missing_in_pool: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class MinedFile:
    """The mined parquet as the report found it on disk."""

    rows: int
    paths_checked: int = 0
    paths_missing: int = 0
    odd_paths: int = 0  # non-UTF-8, control characters or backslashes
    schema_ok: bool = True  # `filepath` first, unique


@dataclass(frozen=True)
class Ruling:
    """A rule that fired: what a tool result carries, and what the report says and advises.
    `reason` None: the report states the warning itself (it adds nothing of its own)."""

    code: WarningCode
    warning: ToolWarning
    reason: str | None
    action: str | None
    severity: str = "attention"  # "failed": the run is not usable


def _found(code: WarningCode, reason: str, action: str, severity: str = "attention") -> Ruling:
    """A rule of the report's own: its warning is the finding itself."""
    return Ruling(code, warnings.report_finding(code, reason, severity, action), reason, action, severity)


def short(text: str, words: int) -> str:
    """The first `words` words of `text` (an ellipsis when cut)."""
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " …"


def plural(n: int | None, one: str) -> str:
    """`n` and the noun, made plural unless n is 1 (NOT_RECORDED when n is unknown)."""
    many = one + ("es" if one.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{NOT_RECORDED if n is None else n} {one if n == 1 else many}"


def label_filter(filter_by_label: bool | None, sides_without_label: Sequence[str]) -> LabelFilter:
    """What filter_by_label does, given which sides lack a `label` column: the no-op rule (mining
    applies the filter by it, the rules below warn by it)."""
    if not filter_by_label:
        return LabelFilter.off
    return LabelFilter.noop if sides_without_label else LabelFilter.applied


def provenance_unknown(f: Facts) -> Ruling | None:
    if not f.sides_without_identity:
        return None
    sides = list(f.sides_without_identity)
    return Ruling("provenance_unknown", warnings.provenance_unknown(sides, predicted=f.predicted),
                  f"the {' and '.join(sides)} side records no encoder identity, so the report cannot confirm "
                  "both sides used the same encoder",
                  "Embed with deft-mine (it records the encoder identity in each embedding parquet), or confirm "
                  "that both container embedding steps used the same embedding_spec.yaml.")


def filter_by_label_noop(f: Facts) -> Ruling | None:
    outcome = f.label_filter or label_filter(f.filter_by_label, f.sides_without_label)
    if outcome != LabelFilter.noop:
        return None
    sides = " and ".join(f.sides_without_label) or "one"
    return Ruling("filter_by_label_noop", warnings.filter_by_label_noop(list(f.sides_without_label),
                                                                        predicted=f.predicted),
                  f"filter_by_label=true did nothing: the {sides} parquet has no `label` column, so mining "
                  "ran unfiltered",
                  f"Give the {sides} side a `label` column (label its rows, then add the column to its "
                  "embedding parquet by joining on `filepath`; the vectors need no re-embedding) and re-run "
                  f"mining only: {f.mine_command or 'deft-mine mine'}.")


def labels_missing_in_pool(target_keys: Iterable[str | None], target_labels: Iterable[str | None],
                           pool_keys: Iterable[str | None]) -> tuple[tuple[str, int], ...]:
    """The loop's pre-mine yield precheck, decided here only: each target label key no pool row
    carries (shown as its first spelling), with its targets counted; null labels match nothing
    and are left to the label_null rule. Keys are the container's (engine.mining.label_keys)."""
    pool, names, counts = set(pool_keys), {}, {}
    for key, label in zip(target_keys, target_labels):
        if key is not None and key not in pool:
            name = names.setdefault(key, label)
            counts[name] = counts.get(name, 0) + 1
    return tuple(sorted(counts.items()))


def label_missing_in_pool(f: Facts) -> Ruling | None:
    """Before any embedding, in every label mode: a target label with no pool row (the report states the warning)."""
    if not f.labels_missing_in_pool:
        return None
    return Ruling("label_missing_in_pool", warnings.label_missing_in_pool(
        dict(f.labels_missing_in_pool), precheck=True, filter_by_label=f.filter_by_label), None,
        CONTROL_ACTIONS["label_missing_in_pool"])


def pool_exhausted(f: Facts) -> Ruling | None:
    topn, queries, pool = f.topn, f.queries, f.pool
    if not (queries and topn and pool is not None and topn * queries > pool):
        return None
    most = pool // queries
    return Ruling("pool_exhausted", warnings.pool_exhausted(topn, queries, pool, None if f.predicted else f.mined),
                  f"topn × targets = {topn} × {queries} = {topn * queries} is more than the {pool} pool rows "
                  "searched",
                  "Grow the pool with more unused images, or lower topn" + (f" to at most {most}" if most else "")
                  + ", so each target can get neighbours of its own; this run mined "
                  f"{plural(f.mined, 'unique image')}.")


def target_in_pool(f: Facts) -> Ruling | None:
    if not f.target_in_pool:
        return None
    warning = warnings.target_in_pool(f.target_in_pool, None if f.predicted else bool(f.exclude_targets))
    if f.exclude_targets:  # done as asked: the report repeats the warning, with nothing to advise
        return Ruling("target_in_pool", warning, None, None)
    return Ruling("target_in_pool", warning,
                  f"{f.target_in_pool} pool rows are target images themselves and were searched like any "
                  "other pool row",
                  "Set exclude_targets=true and mine again if the targets must not be mined back, or confirm "
                  "that mining them back is wanted.")


def distance_threshold_inert(f: Facts) -> Ruling | None:
    """The container's rule: a negative threshold other than -1, or a cosine one above 2, filters nothing."""
    threshold = f.distance_threshold
    if threshold is None or threshold == -1.0 or 0 <= threshold and not (f.knn_metric == "cosine" and threshold > 2):
        return None
    return Ruling("distance_threshold_inert", warnings.distance_threshold_inert(threshold, str(f.knn_metric)),
                  None, None)


def run_failed(f: Facts) -> Ruling | None:
    if not (f.folder and f.has_manifest and f.status != "finished"):
        return None
    error = f.error
    what = f"{error.code}: {short(error.message, 40)}" if error else "no error recorded"
    fix = (error.fix if error else None) or "see the error above"
    return _found("run_failed", f"the run did not finish (status {f.status or NOT_RECORDED}; {what})",
                  f"Fix the cause ({short(fix, 30)}) and run again; finished steps are kept in this folder, but "
                  "nothing mined here is complete.", "failed")


def encoder_mismatch(f: Facts) -> Ruling | None:
    if not (f.folder and f.encoder_match is False):
        return None
    return _found("encoder_mismatch", "the targets and the pool were embedded with different encoders (they "
                  f"differ in {', '.join(f.differing) or 'their identity'}), so their vectors are not comparable",
                  "Re-embed one side with the other side's embedding spec (same model, model_path, "
                  "model_config_path and preprocessing), then mine again; do not train on the current "
                  f"`{f.mined_name}`.", "failed")


def mined_missing(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined_file is None and f.status in (None, "finished")):
        return None
    return _found("mined_missing", "no mined parquet was found in the run folder",
                  "Run the mining step again; without its output there is nothing to train on.", "failed")


def images_skipped(f: Facts) -> Ruling | None:
    if not (f.folder and any(f.skipped)):
        return None
    examples = ", ".join(f"`{e}`" for e in f.skipped_examples)
    return _found("images_skipped", f"images could not be read while embedding: {plural(f.skipped[0], 'target')} "
                  f"and {plural(f.skipped[1], 'pool row')} left out",
                  "Fix the missing or unreadable image paths, or set `image_root` in the embedding spec to the "
                  "folder relative paths resolve against" + (f" (this run read {f.skipped_roots})"
                                                             if f.skipped_roots else "")
                  + ", then run again" + (f" (unreadable, e.g. {examples})." if examples else "."))


def mined_paths_missing(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined_file and f.mined_file.paths_missing):
        return None
    return _found("mined_paths_missing", f"{f.mined_file.paths_missing} of {f.mined_file.paths_checked} mined "
                  "paths do not exist on disk", "Restore or mount the missing images (listed under Output "
                  "Sanity) before training, or drop them from the queue.")


def path_encoding(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined_file and f.mined_file.odd_paths):
        return None
    return _found("path_encoding", f"{f.mined_file.odd_paths} mined paths have suspicious characters "
                  "(non-UTF-8, control characters or backslashes)", "Normalise those paths (forward slashes, "
                  "valid UTF-8, no control characters) so training jobs on other machines can open them.")


def mined_schema(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined_file and not f.mined_file.schema_ok):
        return None
    return _found("mined_schema", f"`{f.mined_name}` does not have unique `filepath`s as its first column",
                  f"Regenerate `{f.mined_name}` with the mining step; the contract is `filepath` first, unique.")


def mined_count_differs(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined_file and f.summary_mined is not None and f.mined_file.rows != f.summary_mined):
        return None
    return _found("mined_count_differs", f"`{f.mined_name}` has {f.mined_file.rows} rows but the summary "
                  f"records {f.summary_mined} mined images", "The file changed after mining; mine again or "
                  "restore it.")


def nothing_mined(f: Facts) -> Ruling | None:
    if not (f.folder and f.mined == 0 and f.queries):
        return None
    return _found("nothing_mined", "the run mined no images at all",
                  f"Loosen `{f.floored}`: every pair found was beyond it." if f.floored else
                  "Check that target and pool labels use the same spelling (the label filter drops pairs whose "
                  "labels differ), and that the pool is not empty.")


def facts_unavailable(f: Facts) -> Ruling | None:
    if not (f.folder and not f.has_manifest):
        return None
    return _found("facts_unavailable", f"the folder has no run.json, so {f.missing_facts} facts could not be "
                  "stated", "For a fully audited run, run the workflow with `deft-mine run`, which records every "
                  "fact in run.json.")


#: Every rule, in the order the report lists its findings; mine and preflight share the first ones
#: (the report's own rules look at a run folder only).
RULES: tuple[Callable[[Facts], Ruling | None], ...] = (
    run_failed, encoder_mismatch, provenance_unknown, mined_missing, filter_by_label_noop, label_missing_in_pool,
    pool_exhausted,
    images_skipped, target_in_pool, distance_threshold_inert, mined_paths_missing, path_encoding, mined_schema, mined_count_differs,
    nothing_mined, facts_unavailable)


def rule(facts: Facts) -> list[Ruling]:
    """Every rule that fires on these facts, in the rulebook's order."""
    return [ruling for check in RULES if (ruling := check(facts)) is not None]
