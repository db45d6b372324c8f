"""The select tool: drop candidates earlier DEFT iterations already selected, and record this one."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.inputs import LedgerFormat, SelectInput
from deft_mine.schemas.manifest import HistoryFacts, IterationFacts
from deft_mine.schemas.results import SelectResult
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.tools._common import distinct_output
from deft_mine.tools.registry import Tool, ToolContext, register

MOSTLY_MINED = 0.5  # the DEFT loop's historical_candidate_rate at which it recommends a larger topn
COLLAPSE = 0.5  # its yield monitor: fewer than half the last round's count is a collapse


@dataclass(frozen=True)
class Budget:
    """max_cumulative_fraction of the pool: what all iterations together may select."""

    fraction: float
    pool_size: int

    @property
    def cap(self) -> int:
        # exact decimal arithmetic: 0.29 × 100 is 29, not the float's 28.999…
        return math.floor(Fraction(repr(self.fraction)) * self.pool_size)


@dataclass(frozen=True)
class Paths:
    source: Path  # the candidates
    target: Path  # the selected rows (mined.parquet)
    summary: Path  # mining_summary.txt beside the candidates (our ledger hashes it)
    history_summary: Path  # mining_history_summary.json beside the output
    base: Path  # where relative filepaths resolve (our ledger's identity)


@dataclass
class Tally:
    """One candidates file judged against the paths selected before (no budget applied)."""

    normal: list[str]  # each row's identity
    rows_before: int  # rows whose path an earlier iteration selected (repeats counted)
    repeats: int  # rows repeating a path earlier in the file that no iteration selected
    unique: int  # unique identities (the loop's candidate_unique_count)
    already: int  # unique identities selected before (its already_mined_count)
    new: list[str]  # identities no iteration selected, first occurrences in order

    @property
    def rate(self) -> float:
        return self.already / self.unique if self.unique else 0.0

    def keep(self, chosen: set[str]) -> list[bool]:
        """Which rows to write: the first row of each chosen identity."""
        mask, left = [], set(chosen)
        for path in self.normal:
            mask.append(path in left)
            left.discard(path)
        return mask


def check_history(ledger_path: Path, asked: LedgerFormat | None, fraction: float | None,
                  pool_size: int | None, verify: bool = True) -> tuple[LedgerFormat, Budget | None]:
    """What a selection needs settled before any work: the budget's arguments, the ledger (whole,
    its recorded hashes too unless `verify` is False) and its format (an existing file's wins;
    asking for the other is refused). `run` calls it before it embeds, so a bad budget or a
    damaged ledger costs nothing."""
    budget = None
    if fraction is not None:
        if not (0 < fraction <= 1):
            raise DeftError("budget_invalid", f"max_cumulative_fraction {fraction} is outside (0, 1]",
                            fix="give a fraction of the pool above 0 and at most 1 (1 = no cap)",
                            field="max_cumulative_fraction")
        if pool_size is None or pool_size < 0:
            raise DeftError("budget_invalid", f"max_cumulative_fraction {fraction} needs pool_size (the pool's "
                            f"row count), and pool_size is {pool_size}",
                            fix="give pool_size (the rows of the pool the candidates were mined from) with "
                                "max_cumulative_fraction", field="pool_size")
        budget = Budget(fraction, pool_size)
    found = ledgers.load(ledger_path, verify).format if ledger_path.exists() else None
    if found is not None and asked is not None and asked != found:
        raise DeftError("ledger_format_conflict", f"ledger {ledger_path} is a {found} ledger; this call asked "
                        f"for ledger_format {asked}", fix=f"leave ledger_format out (or pass {found}), or name a "
                        "new ledger file for the other format", field="ledger_format", found=str(found))
    return found or asked or LedgerFormat.deft_mine, budget


def select_new(inputs: SelectInput, ctx: ToolContext,
               before_commit: Callable[[ledgers.Ledger, int], None] | None = None) -> SelectResult:
    """Drop every candidate whose normalised filepath an earlier iteration selected (order
    kept), write the rest and mining_history_summary.json beside them, and record the iteration
    in the ledger (ours, or the DEFT loop's mining_history.json) with the SHA-256 of its files.
    Refuses non-consecutive iterations (ledger_iteration_invalid), a resume whose files changed
    (ledger_hash_mismatch), a damaged ledger (ledger_corrupt), one another process is writing
    (ledger_busy) and a bad budget (budget_invalid); nothing is written then. `before_commit(ledger,
    iteration)` runs once a new iteration's files are written, before the ledger records it (a
    caller's own outputs of the iteration: if they fail, the iteration stays unrecorded)."""
    source = tables.require_file(Path(inputs.candidates).expanduser().absolute(), "candidates")
    ledger_path = Path(inputs.ledger).expanduser().absolute()
    target = distinct_output(Path(inputs.output).expanduser().absolute(), "output", source, ledger_path)
    history_summary = distinct_output(target.parent / artifacts.MINING_HISTORY_SUMMARY, "output",
                                      source, ledger_path, target)
    # Relative filepaths are made absolute against image_root (default: the candidates' folder).
    base = Path(inputs.image_root).expanduser().absolute() if inputs.image_root else source.parent
    paths = Paths(source, target, source.parent / artifacts.SUMMARY, history_summary, base)
    iteration = inputs.iteration
    # Whatever can be refused without the ledger is refused before its folder and lock exist.
    if iteration < 1:
        raise DeftError("ledger_iteration_invalid", f"iteration {iteration}: iterations start at 1",
                        fix="pass iteration 1 for the first round", field="iteration")
    if iteration != 1 and not ledger_path.exists():
        raise _not_consecutive(iteration, ledger_path, 0)
    fmt, budget = check_history(ledger_path, inputs.ledger_format, inputs.max_cumulative_fraction, inputs.pool_size,
                                verify=False)  # verified below, under the lock
    if fmt is LedgerFormat.tao_skill and (inputs.topn is None or inputs.topn < 1):
        raise DeftError("invalid_arguments", f"select: topn: a tao-skill ledger records each iteration's topn "
                        f"(its resume rule compares it), and topn is {inputs.topn}",
                        fix="give topn, the neighbours per target the candidates were mined with", field="topn")
    _read(source, base, fmt)
    with ledgers.locked(ledger_path):
        book = ledgers.load(ledger_path)
        book.format = fmt
        last = book.last_iteration
        if iteration == last or (fmt is LedgerFormat.tao_skill and iteration < last):
            result = _resume(book, iteration, paths, inputs.topn, budget)
        elif iteration == last + 1:
            result = _record(book, iteration, paths, inputs.topn, budget, before_commit)
        else:
            raise _not_consecutive(iteration, ledger_path, last)
    ctx.events.log("info", f"iteration {iteration}: {result.newly_selected} of {result.candidates} "
                           f"candidates selected ({result.previously_selected} selected before)")
    return result


def _not_consecutive(iteration: int, ledger_path: Path, last: int) -> DeftError:
    return DeftError("ledger_iteration_invalid",
                     f"iteration {iteration} does not follow the ledger {ledger_path}, whose last "
                     f"iteration is {last}: iterations are consecutive",
                     fix=f"pass iteration {last + 1} (or {last} to resume the last one)" if last
                     else "pass iteration 1", field="iteration", last_iteration=last)


def _read(source: Path, base: Path, fmt: LedgerFormat) -> tuple[pa.Table, list[str]]:
    """The candidates and each row's identity: our ledger's absolute normalised path, or the
    loop's path normalised as written."""
    table = tables.read_columns(source, tables.schema_of(source).names)
    tables.require_columns(source, table.schema, ["filepath"], "candidates")
    paths = table.column("filepath").to_pylist()
    if None in paths:
        raise DeftError("column_invalid", f"candidates {source}: filepath is null in row {paths.index(None)}",
                        fix="every candidate needs a filepath", path=str(source))
    normal = [ledgers.identity(str(p), fmt, base) for p in paths]
    if None in normal:
        row = normal.index(None)
        raise DeftError("column_invalid", f"candidates {source}: filepath {paths[row]!r} in row {row} names no file",
                        fix="every candidate needs a filepath", path=str(source), row=row)
    return table, [p for p in normal if p is not None]


def _tally(normal: list[str], before: set[str] | dict[str, int]) -> Tally:
    seen: set[str] = set()
    rows_before = repeats = already = 0
    new: list[str] = []
    for path in normal:
        rows_before += path in before
        if path in seen:
            repeats += path not in before
            continue
        seen.add(path)
        if path in before:
            already += 1
        else:
            new.append(path)
    return Tally(normal, rows_before, repeats, len(seen), already, new)


def _file_fact(path: Path) -> dict[str, str] | None:
    return {"path": str(path), "sha256": tables.sha256_of(path)} if path.is_file() else None


def _record(book: ledgers.Ledger, iteration: int, paths: Paths, topn: int | None, budget: Budget | None,
            before_commit: Callable[[ledgers.Ledger, int], None] | None = None) -> SelectResult:
    table, normal = _read(paths.source, paths.base, book.format)
    tally = _tally(normal, book.selected)
    room = None if budget is None else max(0, budget.cap - len(book.selected))
    chosen = tally.new if room is None else tally.new[:room]
    _write_output(paths, table, tally, chosen)
    summary = _history_summary(book, iteration, paths, topn, tally, chosen, budget)
    _write_summary(paths, summary)
    if before_commit is not None:
        before_commit(book, iteration)
    book.iterations.append(_skill_entry(iteration, paths, summary, chosen) if book.format is LedgerFormat.tao_skill
                           else _our_entry(iteration, paths, topn, tally, chosen))
    book.selected.update(dict.fromkeys(chosen, iteration))
    ledgers.save(book)
    return _result(book, iteration, paths, tally, budget, resumed=False)


def _write_output(paths: Paths, table: pa.Table, tally: Tally, chosen: list[str]) -> None:
    """The selection's parquet: the candidates' rows whose paths are chosen, in their order."""
    tables.write_table_atomic(paths.target, table.filter(pa.array(tally.keep(set(chosen)), pa.bool_())))


def _write_summary(paths: Paths, summary: dict[str, Any]) -> None:
    tables.write_text_atomic(paths.history_summary, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def _our_entry(iteration: int, paths: Paths, topn: int | None, tally: Tally, chosen: list[str]) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "topn": topn,
        "candidates": len(tally.normal),
        "previously_selected": tally.rows_before,
        "duplicates_in_candidates": tally.repeats,
        "newly_selected": len(chosen),
        "image_root": str(paths.base),
        "selected": chosen,
        "files": {"candidates": _file_fact(paths.source), "output": _file_fact(paths.target),
                  "summary": _file_fact(paths.summary)},
    }


def _skill_entry(iteration: int, paths: Paths, summary: dict[str, Any], chosen: list[str]) -> dict[str, Any]:
    """An iteration as the loop's filter_mined_history.py records it (its keys, its order)."""
    return {
        "iteration": iteration, "topn": summary["topn"],
        "candidate_parquet": summary["candidate_parquet"], "candidate_sha256": summary["candidate_sha256"],
        "candidate_unique_count": summary["candidate_unique_count"],
        "already_mined_count": summary["already_mined_count"], "selected_count": len(chosen),
        "selected_filepaths": chosen,
        "output_parquet": summary["output_parquet"], "output_sha256": summary["output_sha256"],
        "summary_file": str(paths.history_summary.resolve()),
        "summary_sha256": tables.sha256_of(paths.history_summary),
    }


def _history_summary(book: ledgers.Ledger, iteration: int, paths: Paths, topn: int | None, tally: Tally,
                     chosen: list[str], budget: Budget | None) -> dict[str, Any]:
    """mining_history_summary.json: the loop's keys with its meanings (counts of unique
    identities; paths resolved), then the budget's."""
    before = len(book.selected_before(iteration))
    excluded = len(tally.new) - len(chosen)
    if tally.unique and not tally.new:
        recommendation = ("every candidate was selected by an earlier iteration: raise topn or grow the "
                          "source pool")
    elif tally.rate >= MOSTLY_MINED:
        recommendation = ("half or more of the unique candidates were selected by earlier iterations: raise "
                          "topn to reach past them")
    elif excluded:
        recommendation = "the selection budget is spent: raise max_cumulative_fraction or grow the pool"
    else:
        recommendation = None
    return {
        "version": ledgers.SKILL_VERSION, "iteration": iteration, "identity": ledgers.SKILL_IDENTITY,
        "topn": topn,
        "candidate_parquet": str(paths.source.resolve()), "candidate_sha256": tables.sha256_of(paths.source),
        "candidate_row_count": len(tally.normal), "candidate_unique_count": tally.unique,
        "candidate_duplicate_count": len(tally.normal) - tally.unique,
        "history_count_before": before, "already_mined_count": tally.already,
        "historical_candidate_rate": tally.rate, "selected_count": len(chosen),
        "cumulative_unique_count": before + len(chosen),
        "output_parquet": str(paths.target.resolve()), "output_sha256": tables.sha256_of(paths.target),
        "recommendation": recommendation,
        "budget_excluded_count": excluded,
        "max_cumulative_fraction": None if budget is None else budget.fraction,
        "pool_size": None if budget is None else budget.pool_size,
        "budget_cap": None if budget is None else budget.cap,
    }


def _resume(book: ledgers.Ledger, iteration: int, paths: Paths, topn: int | None,
            budget: Budget | None) -> SelectResult:
    """Re-run of a recorded iteration: its files must be the recorded ones, unchanged."""
    entry = book.entry(iteration)
    if book.format is LedgerFormat.tao_skill:
        _check_skill_resume(book, iteration, paths, topn)
        base = paths.base
    else:
        _check_our_resume(book, iteration, paths)
        # ...judging paths as they were judged then, whatever image_root this call passed
        base = Path(entry.get("image_root") or paths.base)
    table, normal = _read(paths.source, base, book.format)
    tally = _tally(normal, book.selected_before(iteration))
    chosen = [p for p, it in book.selected.items() if it == iteration]
    budget = _recorded_budget(paths.history_summary) or budget  # the budget the iteration ran under
    if not paths.target.exists():  # the output was lost after the ledger recorded it: write it again
        _write_output(paths, table, tally, chosen)
    if not paths.history_summary.exists():  # selections before this file existed: write it now
        summary = _history_summary(book, iteration, paths, topn or entry.get("topn"), tally, chosen, budget)
        _write_summary(paths, summary)
    return _result(book, iteration, paths, tally, budget, resumed=True)


def _recorded_budget(history_summary: Path) -> Budget | None:
    try:
        data = json.loads(history_summary.read_text(encoding="utf-8"))
        return Budget(float(data["max_cumulative_fraction"]), int(data["pool_size"]))
    except (OSError, ValueError, KeyError, TypeError):  # no file, or a selection without a budget
        return None


def _check_our_resume(book: ledgers.Ledger, iteration: int, paths: Paths) -> None:
    files = book.entry(iteration)["files"]
    checks = [("candidates", paths.source), ("summary", paths.summary)] + (
        [("output", paths.target)] if paths.target.exists() else [])
    for role, path in checks:
        recorded = files.get(role)
        current = _file_fact(path)
        if recorded is not None and (current is None or current["sha256"] != recorded["sha256"]):
            # Another file than the recorded one is most likely a second selection that lost the
            # race for this iteration number, not an edit: say so.
            elsewhere = recorded.get("path") not in (None, str(path))
            raise DeftError(
                "ledger_hash_mismatch",
                f"iteration {iteration} is recorded in {book.path}, "
                + (f"from the {role} file {recorded['path']}, and {path} differs from it" if elsewhere and current
                   else f"but its {role} file {path} " + ("is gone" if current is None else "changed since"))
                + "; refusing to resume",
                fix=f"restore the original {role} file, or record the new selection as iteration "
                    f"{iteration + 1}", field=role, path=str(path),
                recorded_sha256=recorded["sha256"], current_sha256=current and current["sha256"])


def _check_skill_resume(book: ledgers.Ledger, iteration: int, paths: Paths, topn: int | None) -> None:
    """The loop's resume rule: a committed iteration is reused only for the same candidate,
    output and summary paths, the same candidate bytes and the same topn (`load` has verified
    every recorded hash)."""
    entry = book.entry(iteration)
    for key, path in (("candidate_parquet", paths.source), ("output_parquet", paths.target),
                      ("summary_file", paths.history_summary)):
        if Path(entry[key]).resolve() != path.resolve():
            raise DeftError("ledger_hash_mismatch", f"iteration {iteration} is committed in {book.path} with "
                            f"{key} {entry[key]}, not {path}; refusing to resume",
                            fix=f"select with the committed files, or record the new selection as iteration "
                                f"{book.last_iteration + 1}", field=key, iteration=iteration, path=str(path))
    if entry.get("topn") != topn:
        raise DeftError("ledger_iteration_invalid", f"iteration {iteration} is committed in {book.path} with "
                        f"topn {entry.get('topn')}, and this selection has topn {topn}; refusing to resume",
                        fix=f"resume with topn {entry.get('topn')}, or record the new selection as iteration "
                            f"{book.last_iteration + 1}", field="topn", iteration=iteration)


def _result(book: ledgers.Ledger, iteration: int, paths: Paths, tally: Tally, budget: Budget | None,
            resumed: bool) -> SelectResult:
    selected = sum(1 for it in book.selected.values() if it == iteration)
    excluded = len(tally.new) - selected
    return SelectResult(
        output=str(paths.target), ledger=str(book.path), iteration=iteration, resumed=resumed,
        warnings=_selection_warnings(book, iteration, tally, selected, budget),
        cumulative_selected=sum(1 for it in book.selected.values() if it <= iteration),
        candidates=len(tally.normal), previously_selected=tally.rows_before,
        duplicates_in_candidates=tally.repeats, newly_selected=selected, budget_excluded_count=excluded,
        ledger_format=book.format, history_summary=str(paths.history_summary))


def _selection_warnings(book: ledgers.Ledger, iteration: int, tally: Tally, selected: int,
                        budget: Budget | None) -> list[ToolWarning]:
    """The loop's checks after selection, and ours: nothing new, a spent neighbourhood, a
    collapsed yield, a spent budget (each judged on its own: the loop's yield monitor speaks
    whether or not anything new was selected)."""
    found = [warnings.selection_empty(iteration, len(tally.normal))] if selected == 0 else []
    if tally.unique and tally.rate >= MOSTLY_MINED:
        found.append(warnings.candidates_mostly_mined(iteration, tally.unique, tally.already, tally.rate,
                                                      book.entry(iteration).get("topn")))
    if iteration > 1:
        previous = book.counts(iteration - 1)[2]
        if tally.unique < COLLAPSE * previous:
            drop = round(100 * (previous - tally.unique) / previous)
            found.append(warnings.yield_collapsed(iteration, previous, tally.unique, drop))
    excluded = len(tally.new) - selected
    if excluded and budget is not None:
        cumulative = sum(1 for it in book.selected.values() if it <= iteration)
        found.append(warnings.budget_exhausted(iteration, excluded, budget.cap, budget.fraction,
                                               budget.pool_size, cumulative))
    return found


def history_facts(selected: SelectResult) -> HistoryFacts:
    """This selection and, per iteration of its ledger, the counts a report shows."""
    rows, total = [], 0
    book = ledgers.load(Path(selected.ledger), verify=False)  # the selection has just verified it
    for it in book.iterations:
        candidates, previously, newly = book.counts(it["iteration"])
        total += newly
        rows.append(IterationFacts(iteration=it["iteration"], candidates=candidates,
                                   previously_selected=previously, newly_selected=newly, cumulative=total))
    return HistoryFacts(**selected.model_dump(exclude={"warnings"}), iterations=rows)


select = register(Tool("select", "Select across DEFT iterations",
                       "drop candidates earlier DEFT iterations selected; record this one",
                       SelectInput, SelectResult, select_new))
