"""The select tool: drop candidates earlier DEFT iterations already selected, and record this one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa

from deft_mine.engine import ledger as ledgers
from deft_mine.engine import store
from deft_mine.errors import DeftError
from deft_mine.events import Events, NullEvents
from deft_mine.schemas import artifacts
from deft_mine.schemas.results import SelectResult, ToolWarning
from deft_mine.tools._common import distinct_output
from deft_mine.tools.guards import PathPolicy, check_paths


def select(
    candidates: str | Path,
    ledger: str | Path,
    iteration: int,
    output: str | Path,
    image_root: str | Path | None = None,
    topn: int | None = None,
    events: Events | None = None,
    policy: PathPolicy | None = None,
) -> SelectResult:
    """Write the candidates no earlier iteration selected to `output` (order kept) and record
    iteration `iteration` in the ledger. Relative filepaths are made absolute against
    `image_root` (default: the candidates file's folder) before comparing."""
    events = events or NullEvents()
    check_paths(policy, candidates=candidates, ledger=ledger, output=output, image_root=image_root)
    source = store.require_file(Path(candidates).expanduser().absolute(), "candidates")
    ledger_path = Path(ledger).expanduser().absolute()
    target = distinct_output(Path(output).expanduser().absolute(), "output", source, ledger_path)
    base = Path(image_root).expanduser().absolute() if image_root else source.parent
    summary = source.parent / artifacts.SUMMARY
    if iteration < 1:
        raise DeftError("ledger_iteration_invalid", f"iteration {iteration}: iterations start at 1",
                        fix="pass --iteration 1 for the first round", field="iteration")
    with ledgers.locked(ledger_path):
        book = ledgers.load(ledger_path)
        last = book.last_iteration
        if iteration == last:
            result = _resume(book, iteration, source, target, summary, base)
        elif iteration == last + 1:
            result = _record(book, iteration, source, target, summary, base, topn)
        else:
            raise DeftError(
                "ledger_iteration_invalid",
                f"iteration {iteration} does not follow the ledger {ledger_path}, whose last "
                f"iteration is {last}: iterations are consecutive",
                fix=f"pass iteration {last + 1} (or {last} to resume the last one)" if last
                else "pass iteration 1", field="iteration", last_iteration=last)
    events.log("info", f"iteration {iteration}: {result.newly_selected} of {result.candidates} "
                       f"candidates selected ({result.previously_selected} selected before)")
    return result


def _read(source: Path, base: Path) -> tuple[pa.Table, list[str]]:
    table = store.read_columns(source, store.schema_of(source).names)
    store.require_columns(source, table.schema, ["filepath"], "candidates")
    paths = table.column("filepath").to_pylist()
    if None in paths:
        raise DeftError("column_invalid", f"candidates {source}: filepath is null in row {paths.index(None)}",
                        fix="every candidate needs a filepath", path=str(source))
    return table, [ledgers.normalise_filepath(str(p), base) for p in paths]


def _file_fact(path: Path) -> dict[str, str] | None:
    return {"path": str(path), "sha256": store.sha256_of(path)} if path.is_file() else None


def _record(book: ledgers.Ledger, iteration: int, source: Path, target: Path, summary: Path,
            base: Path, topn: int | None) -> SelectResult:
    table, normal = _read(source, base)
    keep, seen = [], set()
    previously = duplicates = 0
    for path in normal:
        if path in book.selected:
            previously += 1
            keep.append(False)
        elif path in seen:
            duplicates += 1
            keep.append(False)
        else:
            seen.add(path)
            keep.append(True)
    store.write_table_atomic(target, table.filter(pa.array(keep, pa.bool_())))
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
    assert entry is not None
    files = entry["files"]
    checks = [("candidates", source), ("summary", summary)]
    if target.exists():
        checks.append(("output", target))
    for role, path in checks:
        recorded = files.get(role)
        current = _file_fact(path)
        if recorded is not None and (current is None or current["sha256"] != recorded["sha256"]):
            raise DeftError(
                "ledger_hash_mismatch",
                f"iteration {iteration} is recorded in {book.path}, but its {role} file {path} "
                + ("is gone" if current is None else "changed since") + "; refusing to resume",
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
        store.write_table_atomic(target, table.filter(pa.array(keep, pa.bool_())))
    return _result(book, iteration, target, resumed=True)


def _result(book: ledgers.Ledger, iteration: int, target: Path, resumed: bool) -> SelectResult:
    entry = book.entry(iteration)
    assert entry is not None
    warnings = []
    if entry["newly_selected"] == 0:
        warnings.append(ToolWarning(
            code="selection_empty",
            message=f"iteration {iteration} selected nothing new: all {entry['candidates']} candidates "
                    "were selected before (or repeat one another); the output has zero rows",
            fields=["filepath"], details={"candidates": entry["candidates"]}))
    return SelectResult(
        output=str(target), ledger=str(book.path), iteration=iteration,
        candidates=entry["candidates"], previously_selected=entry["previously_selected"],
        duplicates_in_candidates=entry["duplicates_in_candidates"],
        newly_selected=entry["newly_selected"],
        cumulative_selected=sum(1 for it in book.selected.values() if it <= iteration),
        resumed=resumed, warnings=warnings)


def history_facts(ledger_path: Path) -> list[dict[str, Any]]:
    """Per iteration: candidates, previously selected, newly selected, cumulative (for reports)."""
    book = ledgers.load(ledger_path)
    rows, total = [], 0
    for it in book.iterations:
        total += it["newly_selected"]
        rows.append({"iteration": it["iteration"], "candidates": it["candidates"],
                     "previously_selected": it["previously_selected"],
                     "newly_selected": it["newly_selected"], "cumulative": total})
    return rows
