"""ChangeNet training rows from a run's mined images of a ChangeNet pool: one row per mined component,
each checked as the DEFT loop's validator checks it, and the validation-set leak guard."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv

from deft_mine.engine import changenet as cn
from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.engine.listings import FILEPATH
from deft_mine.errors import DeftError
from deft_mine.schemas import warnings
from deft_mine.schemas.inputs import PassGolden
from deft_mine.schemas.results import TrainingRowsResult
from deft_mine.schemas.warnings import ToolWarning

# The validator's train/val join keys, those present in both files (values stripped).
LEAK_KEYS = ("input_path", "golden_path", "label", "object_name", "boardname")
EXAMPLES = 5


class Reason(StrEnum):
    """Why a mined component formed no training row."""

    not_in_pool = "not_in_pool"  # the mined filepath is no row of the pool's listing
    empty_label = "empty_label"
    no_golden = "no_golden"  # no golden image (a non-PASS row; a PASS row unless pass_golden=self)
    outside_images_root = "outside_images_root"  # image or golden not under images_dir
    not_siamese = "not_siamese"  # the file name is not <object_name>_<light><image_ext>
    light_missing = "light_missing"  # a light's image does not resolve by the siamese form
    golden_missing = "golden_missing"  # a light's golden does not resolve by the siamese form
    trained_before = "trained_before"  # an earlier iteration selected one of its images: a training row then


@dataclass(frozen=True)
class LeftOut:
    filepath: str  # the mined image
    csv_row: int | None
    reason: Reason
    detail: str  # what failed: the path that did not resolve, the label …


@dataclass(frozen=True)
class Validation:
    """A validation CSV's rows on the leak keys it has (values stripped)."""

    path: Path
    columns: tuple[str, ...]  # the leak keys it has, in LEAK_KEYS order
    rows: list[tuple[str, ...]] = field(compare=False)

    def join_keys(self, training_columns: Sequence[str]) -> list[str]:
        return [k for k in self.columns if k in training_columns]

    def require_keys(self, training_columns: Sequence[str]) -> list[str]:
        """The join keys with a training CSV of these columns; none is refused (the validator cannot check)."""
        if not (keys := self.join_keys(training_columns)):
            raise DeftError("column_missing", f"validation_csv: {self.path} shares none of the leak keys "
                            f"{list(LEAK_KEYS)} with the training rows (its keys: {list(self.columns)})",
                            fix="give the ChangeNet validation CSV (input_path, golden_path, label, object_name …)",
                            field="validation_csv", path=str(self.path))
        return keys

    def keyed(self, join_keys: Sequence[str]) -> set[tuple[str, ...]]:
        """Its rows on `join_keys` (a subset of its columns)."""
        index = [self.columns.index(k) for k in join_keys]
        return {tuple(row[i] for i in index) for row in self.rows}


@dataclass
class TrainingRows:
    """The rows to write (columns in order), and what was left out on the way."""

    table: pa.Table
    layout: cn.Layout
    components: int  # mined components: rows + left out + leaks
    left_out: list[LeftOut]
    leaks: list[dict[str, str]]  # rows equal to a validation row on `join_keys`, left out
    join_keys: list[str]

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(str(x.reason) for x in self.left_out).items()))

    def result(self, path: Path, pass_golden: PassGolden, validation: Validation | None) -> TrainingRowsResult:
        return TrainingRowsResult(
            path=str(path), rows=self.table.num_rows, components=self.components, left_out=len(self.left_out),
            left_out_by_reason=self.by_reason(), leaks=len(self.leaks), leak_keys=self.join_keys,
            validation_csv=None if validation is None else str(validation.path), pass_golden=str(pass_golden),
            images_dir=str(self.layout.images_dir), lights=list(self.layout.lights), image_ext=self.layout.image_ext)

    def warnings(self, validation: Validation | None) -> list[ToolWarning]:
        """What was left out, said: by reason (the first examples of each), and the leaks. A
        component an earlier round already wrote is counted, not warned: nothing is wrong with it."""
        said: list[ToolWarning] = []
        if wrong := [x for x in self.left_out if x.reason is not Reason.trained_before]:
            by_reason = {r: n for r, n in self.by_reason().items() if r != Reason.trained_before}
            firsts = [next(x for x in wrong if x.reason == r) for r in by_reason]
            examples = [{"filepath": x.filepath, "csv_row": x.csv_row, "reason": str(x.reason), "detail": x.detail}
                        for x in [*firsts, *(x for x in wrong if x not in firsts)][:EXAMPLES]]
            said.append(warnings.training_rows_left_out(len(wrong), self.components, by_reason, examples))
        if self.leaks and validation is not None:
            said.append(warnings.training_rows_leaked(len(self.leaks), self.join_keys, str(validation.path),
                                                      self.leaks[:EXAMPLES]))
        return said


def training_columns(pool_columns: Sequence[str]) -> list[str]:
    """The training CSV's columns: the four, then the pool's metadata columns in pool order."""
    return [*cn.COLUMNS, *(n for n in pool_columns if n not in (*cn.COLUMNS, FILEPATH, *cn.ADDED))]


def read_validation(path: Path) -> Validation:
    """A validation CSV's leak-key values (every column read as text); one with none of the keys is refused."""
    table = tables.read_text_csv(tables.require_file(path, "validation_csv"))
    present = tuple(k for k in LEAK_KEYS if k in table.column_names)
    if not present:
        raise DeftError("column_missing", f"validation_csv: {path} has none of the leak keys {list(LEAK_KEYS)}; "
                        f"its columns: {table.column_names}", fix="give the ChangeNet validation CSV "
                        "(input_path, golden_path, label, object_name …)", field="validation_csv", path=str(path))
    columns = [[("" if v is None else str(v)).strip() for v in table.column(k).to_pylist()] for k in present]
    return Validation(path, present, list(zip(*columns)))


def trained_before(book: ledgers.Ledger, iteration: int, images_root: Path) -> Callable[[str], int | None]:
    """The iteration before `iteration` that selected a pool filepath (None: none), by the ledger's identity."""
    before = book.selected_before(iteration)

    def earlier(filepath: str) -> int | None:
        normal = ledgers.identity(filepath, book.format, images_root)
        return book.selected[normal] if normal in before else None
    return earlier


def build(mined: Sequence[str | None], listing: pa.Table, images_root: Path, pass_golden: PassGolden,
          validation: Validation | None = None, before: Callable[[str], int | None] | None = None) -> TrainingRows:
    """One training row per mined component, in order of first appearance in `mined`, or why not; with
    `before` (a ledger's earlier selections), a component one of whose images was selected before is not."""
    layout = cn.listing_layout(listing, images_root)
    pool = _Pool(listing, images_root)
    trained = pool.trained(before) if before is not None else {}
    rows: list[dict[str, str]] = []
    left_out: list[LeftOut] = []
    seen: set[int] = set()
    components = 0
    for filepath in dict.fromkeys(p for p in mined if p is not None):
        row = pool.row_of(filepath)
        if row is None:
            components += 1
            left_out.append(LeftOut(filepath, None, Reason.not_in_pool, filepath))
            continue
        if (component := pool.csv_row[row]) in seen:
            continue
        seen.add(component)
        components += 1
        if component in trained:
            left_out.append(LeftOut(filepath, component, Reason.trained_before, trained[component]))
            continue
        formed = _form(pool, row, layout, pass_golden)
        (left_out if isinstance(formed, LeftOut) else rows).append(formed)  # type: ignore[arg-type]
    columns = training_columns(listing.column_names)
    join_keys = validation.require_keys(columns) if validation is not None else []
    held = validation.keyed(join_keys) if validation is not None else set()
    leaked = [tuple(r[k].strip() for k in join_keys) in held for r in rows]
    leaks = [r for r, leak in zip(rows, leaked) if leak]
    kept = [r for r, leak in zip(rows, leaked) if not leak]
    table = pa.table({c: pa.array([r[c] for r in kept], pa.string()) for c in columns})
    return TrainingRows(table, layout, components, left_out, leaks, join_keys)


def make(mined_parquet: Path, listing_parquet: Path, images_root: Path, output: Path, pass_golden: PassGolden,
         validation: Validation | None = None, before: Callable[[str], int | None] | None = None
         ) -> tuple[TrainingRowsResult, list[ToolWarning]]:
    """A run's step: its mined images and its pool's listing in, the training CSV written, its facts out."""
    mined = tables.read_columns(mined_parquet, ["filepath"]).column("filepath").to_pylist()
    rows = build(mined, tables.read_columns(listing_parquet, tables.schema_of(listing_parquet).names),
                 images_root, pass_golden, validation, before)
    write(output, rows)
    return rows.result(output, pass_golden, validation), rows.warnings(validation)


def write(path: Path, rows: TrainingRows) -> None:
    """The training CSV, atomically (a header only when no row could be formed)."""
    # quoted only where a value must be, as the loop's own CSVs are (Arrow quotes every header name, and
    # under "needed" every text value): the header is ours, the rows Arrow's
    plain = not any(_needs_quotes(str(v)) for column in rows.table.columns for v in column.to_pylist())
    header = ",".join(f'"{n.replace(chr(34), chr(34) * 2)}"' if _needs_quotes(n) else n
                      for n in rows.table.column_names)
    with tables.atomic_output(path) as temp, open(temp, "wb") as fh:
        fh.write(f"{header}\n".encode())
        pacsv.write_csv(rows.table, fh, pacsv.WriteOptions(include_header=False,
                                                           quoting_style="none" if plain else "needed"))


def _needs_quotes(text: str) -> bool:
    return any(ch in text for ch in ',"\r\n')


class _Pool:
    """The listing's columns as lists, and its rows by filepath (as written, else where it resolves)."""

    def __init__(self, listing: pa.Table, images_root: Path) -> None:
        self.root = images_root
        data = {name: listing.column(name).to_pylist() for name in listing.column_names}
        self.filepath, self.light, self.label = data["filepath"], data["light"], data["label"]
        self.golden = data.get("golden_filepath") or [None] * listing.num_rows
        # a listing without csv_row: each row is its own component
        self.csv_row = data["csv_row"] if "csv_row" in data else list(range(listing.num_rows))
        self.metadata = training_columns(listing.column_names)[len(cn.COLUMNS):]
        self.values = data
        self.by_path: dict[str, int] = {}
        self.by_resolved: dict[str, int] = {}
        for row, path in enumerate(self.filepath):  # a file two pool rows name: the first row's
            if path:
                self.by_path.setdefault(path, row)
                self.by_resolved.setdefault(self._absolute(path), row)
        self.golden_of: dict[int, str] = {}  # component -> its first golden image
        for row, golden in enumerate(self.golden):
            if golden:
                self.golden_of.setdefault(self.csv_row[row], golden)

    def _absolute(self, path: str) -> str:
        return os.path.normpath(self.root / os.path.expanduser(path))

    def trained(self, before: Callable[[str], int | None]) -> dict[int, str]:
        """Component -> which of its images an earlier iteration selected (the first such row's)."""
        found: dict[int, str] = {}
        for row, path in enumerate(self.filepath):
            if path and self.csv_row[row] not in found and (iteration := before(path)) is not None:
                found[self.csv_row[row]] = f"{path} was selected by iteration {iteration}"
        return found

    def row_of(self, filepath: str) -> int | None:
        row = self.by_path.get(filepath)
        return row if row is not None else self.by_resolved.get(self._absolute(filepath))

    def relative(self, path: str) -> str | None:
        """`path` relative to the images root, posix; None when it lies outside."""
        rel = os.path.relpath(self._absolute(path), os.path.normpath(self.root))
        return None if rel == ".." or rel.startswith(".." + os.sep) else PurePosixPath(Path(rel)).as_posix()


def _form(pool: _Pool, row: int, layout: cn.Layout, pass_golden: PassGolden) -> dict[str, str] | LeftOut:
    """The training row of the component `row` belongs to, checked as the loop's validator checks it."""
    filepath, component = str(pool.filepath[row]), pool.csv_row[row]

    def out(reason: Reason, detail: str) -> LeftOut:
        return LeftOut(filepath, component, reason, detail)

    label = cn.canonical_label(pool.label[row])
    if not label:
        return out(Reason.empty_label, repr(pool.label[row]))
    relative = pool.relative(filepath)
    if relative is None:
        return out(Reason.outside_images_root, filepath)
    suffix, name = layout.suffix(pool.light[row]), PurePosixPath(relative).name
    if not name.endswith(suffix) or name == suffix:
        return out(Reason.not_siamese, f"{name} does not end in {suffix}")
    object_name, directory = name[: -len(suffix)], str(PurePosixPath(relative).parent)
    golden = pool.golden_of.get(component)
    if golden is None and not (label == cn.PASS and pass_golden is PassGolden.self):
        return out(Reason.no_golden, f"label {label}" + (" (pass_golden=self would use its own image)"
                                                         if label == cn.PASS else ""))
    if golden is None:  # a PASS row, asked to: its own image is its golden
        golden_dir = directory
    elif (golden_relative := pool.relative(golden)) is None:
        return out(Reason.outside_images_root, golden)
    else:
        golden_dir = str(PurePosixPath(golden_relative).parent)
    for light in layout.lights:  # every light, image and golden, by the siamese form
        for reason, where in ((Reason.light_missing, directory), (Reason.golden_missing, golden_dir)):
            if not (path := layout.image(where, object_name, light)).is_file():
                return out(reason, str(path))
    metadata = {n: "" if (v := pool.values[n][row]) is None else str(v) for n in pool.metadata}
    # Checked where they resolve, written in the pool CSV's own coordinates: the loop appends pool
    # rows to training CSVs, so a pool spelling `images/B/…` under images_dir=<ws>/images stays so.
    input_dir = _as_written(pool.values["input_path"][row], layout.image_ext, directory)
    golden_dir = input_dir if golden is None else _as_written(pool.values["golden_path"][row], layout.image_ext,
                                                              golden_dir)
    return {"input_path": input_dir, "golden_path": golden_dir, "label": label, "object_name": object_name,
            **metadata}


def _as_written(written: str | None, image_ext: str, resolved: str) -> str:
    """The pool's spelling of a component's folder: a folder as written, an image file's parent;
    `resolved` (relative to the images root) when the pool spells none."""
    text = (written or "").strip().replace("\\", "/")
    if not text:
        return resolved
    path = PurePosixPath(posixpath.normpath(text))
    return str(path.parent if path.suffix.lower() == image_ext.lower() else path)

