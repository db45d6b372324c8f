"""The rulebook: each warning rule decided once, over a small facts record, with its action.

`mine` (after the search), `preflight` (before any work, from the listings) and the report (from
a run folder) each fill `Facts` with what they know and call `rule`; a rule's `Ruling` carries
the tool's warning, the report's sentence and the recommended action, so the three faces can
never disagree on whether a rule fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from deft_mine.schemas import warnings
from deft_mine.schemas.warnings import ToolWarning, WarningCode

NOT_RECORDED = "not recorded"

# What to do about the mining controls' warnings (decided by the mining engine, acted on here).
CONTROL_ACTIONS: dict[str, str] = {
    "floor_removed_all": "Loosen the floor (a lower `min_similarity`, a higher `max_distance`; the score "
                         "histogram shows where the pairs lie) and mine again: nothing was mined.",
    "targets_without_neighbours": "Look at those targets on the contact sheet: the pool may hold no real "
                                  "look-alike of them; grow the pool, or loosen the floor.",
    "label_missing_in_pool": "Label pool images of those classes (or fix the spelling; labels compare as "
                             "strings), or mine those targets with label_mode=post_filter.",
}


@dataclass(frozen=True)
class Facts:
    """What the rules look at; None where the caller cannot know it (preflight: nothing mined yet)."""

    topn: int | None = None
    queries: int | None = None  # targets searched (preflight: target rows listed)
    pool: int | None = None  # pool rows searched (preflight: pool rows listed)
    mined: int | None = None
    filter_by_label: bool | None = None
    label_filter: str | None = None  # the outcome when already known ("off" | "applied" | "noop")
    sides_without_label: tuple[str, ...] = ()
    target_in_pool: int | None = None
    exclude_targets: bool | None = None  # None: predicted (preflight does not judge it)
    sides_without_identity: tuple[str, ...] = ()  # embedding parquets that record no encoder identity
    predicted: bool = False  # preflight: before any work
    mine_command: str | None = None  # the report's command to re-run mining (its action names it)


@dataclass(frozen=True)
class Ruling:
    """A rule that fired: what a tool result carries, and what the report says and advises.
    `reason` None: the report states the warning itself (it adds nothing of its own)."""

    code: WarningCode
    warning: ToolWarning
    reason: str | None
    action: str | None


def label_filter(filter_by_label: bool | None, sides_without_label: tuple[str, ...] | list[str]) -> str:
    """What filter_by_label does, given which sides lack a `label` column: the no-op rule."""
    if not filter_by_label:
        return "off"
    return "noop" if sides_without_label else "applied"


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
    if outcome != "noop":
        return None
    sides = " and ".join(f.sides_without_label) or "one"
    return Ruling("filter_by_label_noop", warnings.filter_by_label_noop(list(f.sides_without_label),
                                                                        predicted=f.predicted),
                  f"filter_by_label=true did nothing: the {sides} parquet has no `label` column, so mining "
                  "ran unfiltered",
                  f"Give the {sides} side a `label` column (label its rows, then add the column to its "
                  "embedding parquet by joining on `filepath`; the vectors need no re-embedding) and re-run "
                  f"mining only: {f.mine_command or 'deft-mine mine'}.")


def pool_exhausted(f: Facts) -> Ruling | None:
    topn, queries, pool = f.topn, f.queries, f.pool
    if not (queries and topn and pool is not None and topn * queries > pool):
        return None
    most = pool // queries
    mined = NOT_RECORDED if f.mined is None else str(f.mined)
    return Ruling("pool_exhausted", warnings.pool_exhausted(topn, queries, pool, None if f.predicted else f.mined),
                  f"topn × targets = {topn} × {queries} = {topn * queries} is more than the {pool} pool rows "
                  "searched",
                  "Grow the pool with more unused images, or lower topn" + (f" to at most {most}" if most else "")
                  + ", so each target can get neighbours of its own; this run mined "
                  f"{mined} unique image{'' if f.mined == 1 else 's'}.")


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


#: The rules mine, preflight and the report share, in the order their findings are listed.
RULES: tuple[Callable[[Facts], Ruling | None], ...] = (provenance_unknown, filter_by_label_noop, pool_exhausted,
                                                       target_in_pool)


def rule(facts: Facts) -> list[Ruling]:
    """Every shared rule that fires on these facts, in the rulebook's order."""
    return [ruling for check in RULES if (ruling := check(facts)) is not None]
