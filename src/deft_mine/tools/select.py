"""The select tool: drop candidates earlier DEFT iterations already selected, and record this one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.inputs import SelectInput
from deft_mine.schemas.manifest import HistoryFacts, IterationFacts
from deft_mine.schemas.results import SelectResult
from deft_mine.tools._common import distinct_output
from deft_mine.tools.registry import Tool, ToolContext, register


def select_new(inputs: SelectInput, ctx: ToolContext) -> SelectResult:
    """Drop every candidate whose normalised filepath an earlier iteration selected (order
    kept), write the rest, and record the iteration in the ledger with the SHA-256 of its
    files. Refuses non-consecutive iterations (ledger_iteration_invalid), a resume whose
    files changed (ledger_hash_mismatch), a damaged ledger (ledger_corrupt) and a ledger
    another process is writing (ledger_busy); nothing is written then."""
    source = tables.require_file(Path(inputs.candidates).expanduser().absolute(), "candidates")
    ledger_path = Path(inputs.ledger).expanduser().absolute()
    target = distinct_output(Path(inputs.output).expanduser().absolute(), "output", source, ledger_path)
    # Relative filepaths are made absolute against image_root (default: the candidates' folder).
    base = Path(inputs.image_root).expanduser().absolute() if inputs.image_root else source.parent
    summary = source.parent / artifacts.SUMMARY
    iteration = inputs.iteration
    # Whatever can be refused without the ledger is refused before its folder and lock exist.
    if iteration < 1:
        raise DeftError("ledger_iteration_invalid", f"iteration {iteration}: iterations start at 1",
                        fix="pass iteration 1 for the first round", field="iteration")
    if iteration != 1 and not ledger_path.exists():
        raise _not_consecutive(iteration, ledger_path, 0)
    _read(source, base)
    with ledgers.locked(ledger_path):
        book = ledgers.load(ledger_path)
        last = book.last_iteration
        if iteration == last:
            result = _resume(book, iteration, source, target, summary, base)
        elif iteration == last + 1:
            result = _record(book, iteration, source, target, summary, base, inputs.topn)
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


def _read(source: Path, base: Path) -> tuple[pa.Table, list[str]]:
    table = tables.read_columns(source, tables.schema_of(source).names)
    tables.require_columns(source, table.schema, ["filepath"], "candidates")
    paths = table.column("filepath").to_pylist()
    if None in paths:
        raise DeftError("column_invalid", f"candidates {source}: filepath is null in row {paths.index(None)}",
                        fix="every candidate needs a filepath", path=str(source))
    return table, [ledgers.absolute_normal(str(p), base) for p in paths]


def _file_fact(path: Path) -> dict[str, str] | None:
    return {"path": str(path), "sha256": tables.sha256_of(path)} if path.is_file() else None


def _record(book: ledgers.Ledger, iteration: int, source: Path, target: Path, summary: Path,
            base: Path, topn: int | None) -> SelectResult:
    table, normal = _read(source, base)
    keep, seen = [], set()
    for path in normal:
        keep.append(path not in book.selected and path not in seen)
        seen.add(path)
    previously = sum(path in book.selected for path in normal)
    duplicates = len(normal) - previously - sum(keep)  # repeats of a candidate earlier in the file
    tables.write_table_atomic(target, table.filter(pa.array(keep, pa.bool_())))
    chosen = [p for p, k in zip(normal, keep) if k]
    book.iterations.append({
        "iteration": iteration,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "topn": topn,
        "candidates": len(normal),
        "previously_selected": previously,
        "duplicates_in_candidates": duplicates,
        "newly_selected": len(chosen),
        "image_root": str(base),
        "selected": chosen,
        "files": {"candidates": _file_fact(source), "output": _file_fact(target),
                  "summary": _file_fact(summary)},
    })
    book.selected.update(dict.fromkeys(chosen, iteration))
    ledgers.save(book)
    return _result(book, iteration, target, resumed=False)


def _resume(book: ledgers.Ledger, iteration: int, source: Path, target: Path, summary: Path,
            base: Path) -> SelectResult:
    """Re-run of the last recorded iteration: every recorded file must be unchanged."""
    entry = book.entry(iteration)
    files = entry["files"]
    checks = [("candidates", source), ("summary", summary)] + ([("output", target)] if target.exists() else [])
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
    if not target.exists():  # the output was lost after the ledger recorded it: write it again
        # ...judging paths as they were judged then, whatever image_root this call passed
        table, normal = _read(source, Path(entry.get("image_root") or base))
        wanted, keep = set(entry["selected"]), []
        for path in normal:
            keep.append(path in wanted)
            wanted.discard(path)
        tables.write_table_atomic(target, table.filter(pa.array(keep, pa.bool_())))
    return _result(book, iteration, target, resumed=True)


def _result(book: ledgers.Ledger, iteration: int, target: Path, resumed: bool) -> SelectResult:
    entry = book.entry(iteration)
    found = [warnings.selection_empty(iteration, entry["candidates"])] if entry["newly_selected"] == 0 else []
    return SelectResult(
        output=str(target), ledger=str(book.path), iteration=iteration, resumed=resumed, warnings=found,
        cumulative_selected=sum(1 for it in book.selected.values() if it <= iteration),
        **{count: entry[count] for count in ledgers.COUNTS})


def history_facts(selected: SelectResult) -> HistoryFacts:
    """This selection and, per iteration of its ledger, the counts a report shows."""
    rows, total = [], 0
    for it in ledgers.load(Path(selected.ledger)).iterations:
        total += it["newly_selected"]
        rows.append(IterationFacts(**{key: it[key] for key in IterationFacts.model_fields if key in it},
                                   cumulative=total))
    return HistoryFacts(**selected.model_dump(exclude={"warnings"}), iterations=rows)


select = register(Tool("select", "Select across DEFT iterations",
                       "drop candidates earlier DEFT iterations selected; record this one",
                       SelectInput, SelectResult, select_new))
