"""The warning catalogue: every code a result may carry, and one constructor per code."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

WarningCode = Literal[
    # raised by the tools (preflight predicts the first five before any work)
    "filter_by_label_noop", "provenance_unknown", "pool_exhausted", "images_skipped", "target_in_pool",
    "selection_empty", "picture_failed", "store_shard_corrupt", "duplicate_paths", "zero_vectors",
    "distance_threshold_inert", "label_null", "listing_empty", "texts_skipped", "unique_count_short",
    # raised by run with a ChangeNet pool (mined_training_rows.csv)
    "training_rows_left_out", "training_rows_leaked",
    # raised by run's leakage guard (pool copies of protected images, never mined)
    "leaks_excluded",
    # raised by a selection against a history ledger (the DEFT loop's yield checks, the budget)
    "candidates_mostly_mined", "yield_collapsed", "budget_exhausted",
    # raised by the mining controls (a similarity floor, label_mode=per_label)
    "targets_without_neighbours", "floor_removed_all", "label_missing_in_pool",
    # findings of the report on a run folder
    "run_failed", "encoder_mismatch", "mined_missing", "mined_paths_missing", "path_encoding",
    "mined_schema", "mined_count_differs", "nothing_mined", "facts_unavailable",
]


class ToolWarning(BaseModel):
    """A condition the caller must see: the run went on, but not quite as asked."""

    code: WarningCode = Field(description="stable code; the enum lists every one")
    message: str
    fields: list[str] = Field(default_factory=list, description="spec fields / columns involved")
    details: dict[str, Any] = Field(default_factory=dict)

    def for_side(self, side: str) -> "ToolWarning":
        """The same warning, said of one side of a run (targets or source)."""
        return self.model_copy(update={"details": {**self.details, "side": side},
                                       "message": f"{side}: {self.message}"})


def filter_by_label_noop(sides: list[str], *, predicted: bool = False) -> ToolWarning:
    message = (f"filter_by_label=true will do nothing: the {' and '.join(sides)} file has no 'label' column, "
               "so mining would run unfiltered" if predicted else
               f"filter_by_label=true did nothing: the {' and '.join(sides)} parquet has no 'label' column, "
               "so mining ran unfiltered")
    return ToolWarning(code="filter_by_label_noop", message=message, fields=["filter_by_label", "label"],
                       details={"sides_without_label": sides})


def provenance_unknown(sides: list[str], *, predicted: bool = False) -> ToolWarning:
    if predicted:  # preflight judges one file at a time
        return ToolWarning(code="provenance_unknown", fields=list(sides), details={"sides": sides},
                           message=f"{' and '.join(sides)}: this embedding parquet records no encoder identity")
    return ToolWarning(
        code="provenance_unknown", fields=[f"{side}_parquet" for side in sides], details={"sides": sides},
        message=f"the {' and '.join(sides)} parquet records no encoder identity (written by another tool, "
                "e.g. the TAO container): cannot check both sides used the same encoder")


def pool_exhausted(topn: int, queries: int, pool: int, mined: int | None = None) -> ToolWarning:
    """`mined` None: predicted before the run."""
    if mined is None:
        message = (f"topn × targets = {topn * queries} exceeds the {pool} pool rows; "
                   "fewer unique images than that will be mined")
    else:
        message = (f"topn × targets = {topn} × {queries} = {topn * queries} is more than the {pool} "
                   "pool rows searched"
                   + ("; topn exceeds the pool, so each target got the whole pool" if topn > pool else "")
                   + f"; {mined} unique images were mined")
    return ToolWarning(code="pool_exhausted", message=message, fields=["topn"],
                       details={"topn": topn, "queries": queries, "pool": pool})


def images_skipped(source: str, input_rows: int, by_reason: dict[str, int], examples: list[str],
                   image_root: str) -> ToolWarning:
    return _rows_skipped("images_skipped", "filepath", "their image could not be read", source, input_rows,
                         by_reason, examples, image_root=image_root)


def texts_skipped(source: str, input_rows: int, by_reason: dict[str, int], examples: list[str]) -> ToolWarning:
    """A text parquet's null or blank texts, left out of the embedding (counted like unreadable images)."""
    return _rows_skipped("texts_skipped", "text", "their text is null or blank", source, input_rows, by_reason,
                         examples)


def _rows_skipped(code: WarningCode, column: str, because: str, source: str, input_rows: int,
                  by_reason: dict[str, int], examples: list[str], **details: Any) -> ToolWarning:
    """Listing rows an embedding left out, counted by reason, with the first examples."""
    skipped = sum(by_reason.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
    return ToolWarning(
        code=code, message=f"{skipped} of {input_rows} rows of {source} were left out because {because} "
                           f"({reasons})" + (f"; e.g. {examples[0]}" if examples else ""),
        fields=[column], details={"count": skipped, "by_reason": by_reason, "examples": examples, **details})


def images_missing(side: str, missing: list[Any], checked: int, root: str) -> ToolWarning:
    """Predicted images_skipped: image paths of a listing that do not exist."""
    return ToolWarning(
        code="images_skipped",
        message=f"{side}: {len(missing)} of the first {checked} image paths do not exist (relative "
                f"paths resolve against {root}); e.g. {missing[0]}",
        fields=["filepath", "image_root"],
        details={"side": side, "count": len(missing), "checked": checked,
                 "examples": [str(p) for p in missing[:5]]})


def store_shard_corrupt(store: str | None, shards: list[str]) -> ToolWarning:
    return ToolWarning(code="store_shard_corrupt", fields=["store"], details={"store": store, "shards": shards},
                       message=f"{len(shards)} shard(s) of the embedding store {store} failed their checksum "
                               f"and were set aside (renamed .corrupt-*); their images were embedded again")


def leaks_excluded(by_kind: dict[str, int], pool: int, examples: list[str], judged: int | None = None) -> ToolWarning:
    """Pool rows the leakage guard left out (copies of protected images, never mined), by kind; `judged`
    (leak_scope=mined): the pool rows it judged, those the search would have taken."""
    total = sum(by_kind.values())
    among = f"{pool} pool rows" if judged is None else f"the {judged} pool rows the search reached (of {pool})"
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in by_kind.items() if n)
    every = "; every pool row is a leak, so nothing was mined" if total and total >= pool else ""
    return ToolWarning(code="leaks_excluded", fields=["protect", "leak_similarity", "leak_distance"],
                       details={"count": total, "by_kind": by_kind, "pool": pool, "examples": examples,
                                **({} if judged is None else {"judged": judged})},
                       message=f"{total} of {among} copy a protected image ({kinds}) and were left out, "
                               f"never mined (leaks.parquet lists each with the image it copies){every}")


def target_in_pool(count: int, excluded: bool | None) -> ToolWarning:
    """`excluded` None: predicted before the run."""
    if excluded is None:
        return ToolWarning(code="target_in_pool", fields=["filepath", "exclude_targets"],
                           details={"count": count},
                           message=f"{count} pool rows are also targets; they will be mined like any "
                                   "other row unless exclude_targets=true")
    action = ("were removed from the pool (exclude_targets=true)" if excluded else
              "were searched like any other pool row; set exclude_targets=true to drop them")
    return ToolWarning(code="target_in_pool", fields=["filepath", "exclude_targets"],
                       details={"count": count, "excluded": excluded},
                       message=f"{count} pool rows have a filepath that is also a target and {action}")


def distance_threshold_inert(threshold: float, metric: str) -> ToolWarning:
    """The container's two warnings about a distance_threshold that filters nothing."""
    why = ("is more than 2, the largest cosine distance: it drops nothing" if threshold > 2 else
           "is negative, so distance filtering is off (-1 says so explicitly)")
    return ToolWarning(code="distance_threshold_inert", message=f"distance_threshold={threshold:g} {why}",
                       fields=["distance_threshold"], details={"distance_threshold": threshold, "knn_metric": metric})


def label_null(pairs: int, found: int) -> ToolWarning:
    """Our one difference from the container's label rule, said where it bites."""
    return ToolWarning(code="label_null", fields=["label"], details={"pairs": pairs, "pairs_found": found},
                       message=f"{pairs} of {found} pairs were dropped by the label filter because the target's or "
                               "the pool image's label is null: a null label matches nothing here (the TAO "
                               "container's str(None) makes two nulls agree, as 'NONE')")


def duplicate_paths(count: int, examples: list[str]) -> ToolWarning:
    """Pool rows naming a file an earlier row already names: searched as rows, as TAO does."""
    return ToolWarning(code="duplicate_paths", fields=["filepath"], details={"count": count, "examples": examples},
                       message=f"{count} pool rows repeat the filepath of an earlier row (e.g. {examples[0]}); "
                               "they were searched as rows of their own, as the TAO container does, so a "
                               "repeated file can fill two of a target's topn places (mined.parquet lists it "
                               "once); dedupe the pool listing if the repeats were not meant")


def zero_vectors(by_side: dict[str, int], examples: list[str]) -> ToolWarning:
    """All-zero vectors under cosine (a flat image under the thumbnail encoder): no direction."""
    counts = " and ".join(f"{n} {side}" for side, n in by_side.items() if n)
    return ToolWarning(code="zero_vectors", fields=["knn_metric", "embedding"],
                       details={"count": sum(by_side.values()), "by_side": by_side, "examples": examples},
                       message=f"{counts} rows have an all-zero vector, which has no cosine similarity to anything "
                               f"(e.g. {examples[0]}, a flat image?); they were left out of the search. "
                               "knn_metric=euclidean or manhattan would keep them")


def targets_without_neighbours(examples: list[str], count: int, queries: int, floor: bool,
                               per_label: bool) -> ToolWarning:
    """Targets that kept no pair: every neighbour fell below the floor, or (per_label) their
    label has no searchable pool row, or they have no label."""
    why = " or ".join(([("the similarity floor (min_similarity / max_distance)")] if floor else [])
                      + (["the per-label search (no pool row shares their label, or they have none)"]
                         if per_label else []))
    return ToolWarning(
        code="targets_without_neighbours", fields=["filepath"] + (["min_similarity", "max_distance"] if floor else [])
        + (["label_mode", "label"] if per_label else []),
        details={"count": count, "queries": queries, "targets": examples},
        message=f"{count} of {queries} targets kept no neighbour after {why}, so nothing was mined for them "
                f"(e.g. {examples[0]}); lower the floor, or grow the pool with look-alikes of those targets")


def floor_removed_all(pairs: int, key: str, floor: float, best: float) -> ToolWarning:
    """The floor dropped every pair the label rule kept: an empty mined parquet, a valid answer."""
    return ToolWarning(
        code="floor_removed_all", fields=[key], details={"pairs": pairs, key: floor, "best_score": best},
        message=f"{key}={floor:g} dropped all {pairs} pairs it judged (the nearest scored {best:.6g}), so "
                f"nothing was mined and the mined parquet has zero rows; loosen {key} to mine something")


def listing_empty(path: str, side: str | None = None) -> ToolWarning:
    """A listing with no rows: a valid input, an empty answer, never a silent one."""
    return ToolWarning(code="listing_empty", fields=["filepath"], details={"path": path, **({"side": side} if side else {})},
                       message=(f"{side}: " if side else "") + f"{path} lists no rows (0 rows): nothing from it is "
                               "embedded or mined; check that the right file was given")


def label_missing_in_pool(missing: dict[str, int], *, precheck: bool = False,
                          filter_by_label: bool | None = None) -> ToolWarning:
    """Target labels no pool row carries (label -> targets): label_mode=per_label's, from the rows
    searched; or (`precheck`) the loop's pre-mine yield precheck, from the listings, in any mode."""
    labels = sorted(missing)
    shown = ", ".join(repr(x) for x in labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
    if precheck:
        counts = ", ".join(f"{label!r}: {missing[label]}" for label in labels[:10])
        return ToolWarning(
            code="label_missing_in_pool", fields=["label", "filter_by_label"],
            details={"labels": labels, "targets_per_label": dict(sorted(missing.items())), "precheck": True,
                     "filter_by_label": filter_by_label},
            message=f"pre-mine precheck: {len(labels)} target label(s) have 0 candidates in the pool (targets per "
                    f"label: {counts}{' …' if len(labels) > 10 else ''}): with filter_by_label=true their yield "
                    "is guaranteed 0 regardless of similarity"
                    + (" (this run filters by label)" if filter_by_label else
                       "; without the filter k-NN may still pull look-alikes labelled otherwise")
                    + "; grow the pool with rows of those labels, or check their spelling")
    return ToolWarning(
        code="label_missing_in_pool", fields=["label", "label_mode"],
        details={"labels": labels, "targets_per_label": dict(sorted(missing.items()))},
        message=f"{len(labels)} target label(s) appear in no pool row searched: {shown}; with label_mode=per_label "
                f"their {sum(missing.values())} target(s) get no neighbours (label them in the pool, or check "
                "the spelling: labels compare as strings)")


def training_rows_left_out(count: int, components: int, by_reason: dict[str, int],
                           examples: list[dict[str, Any]]) -> ToolWarning:
    """Mined components of a ChangeNet pool that could form no training row (examples: filepath, reason, detail)."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in by_reason.items())
    first = examples[0] if examples else {}
    return ToolWarning(
        code="training_rows_left_out", fields=["label", "golden_path", "pass_golden"],
        details={"count": count, "components": components, "by_reason": by_reason, "examples": examples},
        message=f"{count} of {components} mined components were left out of mined_training_rows.csv ({reasons}), "
                f"e.g. {first.get('filepath')}: {first.get('reason')} ({first.get('detail')}); they stay in "
                "mined.parquet")


def training_rows_leaked(count: int, keys: list[str], validation_csv: str, examples: list[dict[str, str]]) -> ToolWarning:
    """Training rows equal to a validation row on the validator's keys: left out, the loop's hard stop avoided."""
    return ToolWarning(
        code="training_rows_leaked", fields=["validation_csv", *keys],
        details={"count": count, "keys": keys, "validation_csv": validation_csv, "examples": examples},
        message=f"{count} mined training rows equal a row of the validation CSV {validation_csv} on {keys} "
                "(train/val leaks) and were left out of mined_training_rows.csv; the loop's validator would "
                "stop on them")


def unique_count_short(desired: int, got: int, groups: list[dict[str, Any]]) -> ToolWarning:
    """unique_neighbor_matching held fewer files than desired_unique_count; `groups` say where and why."""
    why = "; ".join(f"{g['group']}: {g['got']} of {g['wanted']} ({g['reason']})" for g in groups)
    return ToolWarning(code="unique_count_short", fields=["desired_unique_count"],
                       message=f"selected {got} of desired_unique_count={desired} unique pool images, "
                               f"{desired - got} short: {why}",
                       details={"desired": desired, "selected": got, "missing": desired - got, "groups": groups})


def selection_empty(iteration: int, candidates: int) -> ToolWarning:
    return ToolWarning(code="selection_empty", fields=["filepath"], details={"candidates": candidates},
                       message=f"iteration {iteration} selected nothing new: all {candidates} candidates "
                               "were selected before (or repeat one another); the output has zero rows")


def candidates_mostly_mined(iteration: int, unique: int, already: int, rate: float,
                            topn: int | None) -> ToolWarning:
    """The DEFT loop's historical_candidate_rate >= 0.5: the neighbourhood is mostly spent."""
    return ToolWarning(
        code="candidates_mostly_mined", fields=["topn"],
        message=f"iteration {iteration}: {already} of the {unique} unique candidates ({rate:.0%}) were already "
                "selected by earlier iterations: raise topn" + (f" (now {topn})" if topn is not None else "")
                + " to reach past them, or grow the pool",
        details={"iteration": iteration, "candidate_unique_count": unique, "already_mined_count": already,
                 "historical_candidate_rate": rate, "topn": topn})


def yield_collapsed(iteration: int, previous_selected: int, candidates: int, drop_percent: int) -> ToolWarning:
    """The DEFT loop's yield monitor: this round's candidates fell below half the last round's selection."""
    return ToolWarning(
        code="yield_collapsed", fields=["filepath"],
        message=f"mining yield dropped {drop_percent}% (iteration {iteration - 1}: {previous_selected} selected → "
                f"iteration {iteration}: {candidates} unique candidates): the pool is near exhaustion for these "
                "targets; grow the pool before the next iteration",
        details={"iteration": iteration, "previous_iteration": iteration - 1,
                 "previous_selected_count": previous_selected, "candidate_unique_count": candidates,
                 "drop_percent": drop_percent})


def budget_exhausted(iteration: int, excluded: int, cap: int, fraction: float, pool_size: int,
                     cumulative: int) -> ToolWarning:
    return ToolWarning(
        code="budget_exhausted", fields=["max_cumulative_fraction", "pool_size"],
        message=f"iteration {iteration}: {excluded} new candidates were left out: all iterations together may "
                f"select {cap} images (max_cumulative_fraction {fraction} × {pool_size} pool rows) and "
                f"{cumulative} are now selected",
        details={"iteration": iteration, "budget_excluded_count": excluded, "budget_cap": cap,
                 "max_cumulative_fraction": fraction, "pool_size": pool_size, "cumulative_unique_count": cumulative})


def picture_failed(name: str, error: Exception) -> ToolWarning:
    return ToolWarning(code="picture_failed", message=f"could not draw {name}: {error}",
                       details={"picture": name})


def report_finding(code: WarningCode, reason: str, severity: str, action: str | None) -> ToolWarning:
    """A finding of the report (what its Verdict section lists) as a warning."""
    return ToolWarning(code=code, message=reason, details={"severity": severity, "action": action})
