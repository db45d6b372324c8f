"""Listings: any input naming images turned into the one standard listing every step reads (its
rows: `filepath`, then every carried column; the images root relative filepaths resolve
against), the only reader of a raw input's `filepath`. A format is one function in FORMATS: a
filepath parquet, a CSV with `filepath`, a ChangeNet CSV (told by its four columns), and a text
parquet (a `text` column and no `filepath`: sentences to embed, its rows keyed by `text`)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from deft_mine.engine import changenet as cn
from deft_mine.engine import tables
from deft_mine.engine.images import resolve_image_path
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import ChangeNetOptions

FILEPATH = "filepath"
TEXT = "text"


@dataclass(frozen=True)
class Listing:
    """One input as the steps read it, in file order; `table`: the rows of a format read whole."""

    path: Path
    format: str
    images_root: Path
    schema: pa.Schema
    rows: int
    table: pa.Table | None = None
    # input rows left out before embedding (a ChangeNet row-light that resolves to no file or to
    # several, with skip_unresolved): embedding counts them as skip reason "unresolved"
    unresolved: int = 0
    unresolved_examples: tuple[str, ...] = ()

    def batches(self, rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        if self.table is None:
            return tables.iter_batches(self.path, rows, columns)
        return iter((self.table if columns is None else self.table.select(columns)).to_batches(max_chunksize=rows))

    def filepaths(self, limit: int | None = None) -> Iterator[str | None]:
        """The rows' filepaths as written (None: a null), streamed: the first `limit` or all."""
        for batch in self.batches(min(limit or 65536, 65536), [FILEPATH]):
            yield from filepaths_of(batch)[:limit]
            if limit is not None and (limit := limit - batch.num_rows) <= 0:
                return

    def resolved(self, limit: int | None = None) -> Iterator[tuple[int, str | None, Path | None]]:
        """(row, filepath, where it resolves; None for a null filepath), in order."""
        for row, filepath in enumerate(self.filepaths(limit)):
            yield row, filepath, None if filepath is None else resolve_image_path(filepath, self.images_root)

    def outside(self, allowed: Callable[[Path], bool], shown: int) -> list[tuple[int, str, Path]]:
        """The first `shown` rows whose image resolves where `allowed` refuses: (row, filepath, path)."""
        return list(itertools.islice(((row, filepath, path) for row, filepath, path in self.resolved()
                                      if path is not None and not allowed(path)), shown))

    @property
    def null_filepaths(self) -> int:
        """Rows that name no image (null, or empty in a CSV): embedding skips them ("null filepath")."""
        return sum(not filepath for filepath in self.filepaths())

    def ray_dataset(self, ray: Any, read_cpus: float) -> Any:
        """The filepaths as a Ray dataset, in file order; from a parquet, the read tasks read only them."""
        if self.table is not None:
            return ray.data.from_arrow(self.table.select([FILEPATH]))
        dataset = ray.data.read_parquet(str(self.path), file_extensions=None, num_cpus=read_cpus)
        return dataset.select_columns([FILEPATH])


def filepath_parquet(path: Path, images_root: Path) -> Listing:
    """A parquet with a `filepath` column, streamed as it is."""
    return Listing(path, "parquet", images_root, tables.schema_of(path), tables.num_rows(path))


def csv(path: Path, images_root: Path) -> Listing:
    """A CSV (or TSV) with a `filepath` column, its separator taken from the header line."""
    table = tables.read_csv(path)
    return Listing(path, "csv", images_root, table.schema, table.num_rows, table)


def changenet(path: Path, images_root: Path, options: ChangeNetOptions | None = None) -> Listing:
    """A ChangeNet CSV: one row per CSV row and light (row-major), `filepath` the row's image for
    that light (resolved before any embedding; relative to images_dir when inside it), every CSV
    column as text, then `light`, `golden_filepath` (null: no golden_path) and `csv_row` (0-based)."""
    options = options or ChangeNetOptions()
    layout = cn.layout_of(options, path, images_root)
    rows = cn.read_csv(path)
    if clash := [c for c in (FILEPATH, *cn.ADDED) if c in rows.column_names]:
        raise DeftError("changenet_column_reserved", f"{path}: column(s) {', '.join(clash)} clash with the "
                        "columns a ChangeNet listing adds", field="source", columns=clash,
                        fix="rename those columns in the CSV (or drop them)")
    found = cn.resolve_rows(rows, layout, path, options.skip_unresolved)
    table = rows.take(pa.array(found.csv_rows, pa.int64()))
    table = table.add_column(0, FILEPATH, pa.array(found.filepaths, pa.string()))
    table = table.append_column("light", pa.array(found.lights, pa.string()))
    table = table.append_column("golden_filepath", pa.array(found.goldens, pa.string()))
    table = table.append_column("csv_row", pa.array(found.csv_rows, pa.int64()))
    return Listing(path, "changenet", layout.images_dir, table.schema, table.num_rows, table,
                   found.unresolved, tuple(found.examples))


def text_parquet(path: Path, images_root: Path) -> Listing:
    """A parquet with a `text` column (and no `filepath`): one sentence per row, streamed as it is."""
    return Listing(path, "text", images_root, tables.schema_of(path), tables.num_rows(path))


FORMATS: dict[str, Callable[..., Listing]] = {"parquet": filepath_parquet, "csv": csv, "changenet": changenet,
                                              "text": text_parquet}


def format_of(path: Path, field: str) -> str:
    """Which format a file is in: a CSV by its name, a ChangeNet CSV by its columns (the four, and
    no `filepath`); one with some of ChangeNet's own columns but not all is refused, naming them."""
    if not tables.is_csv(path):
        names = tables.schema_of(path).names
        return "text" if TEXT in names and FILEPATH not in names else "parquet"
    names = cn.header(path)
    if FILEPATH in names:
        return "csv"
    if cn.is_changenet(names):
        return "changenet"
    if some := [c for c in cn.COLUMNS if c in names and c != "label"]:
        missing = [c for c in cn.COLUMNS if c not in names]
        raise DeftError("changenet_columns_missing", f"{field} {path} has the ChangeNet column(s) {', '.join(some)} "
                        f"but not {', '.join(missing)} (nor a filepath column); its columns are: {', '.join(names)}",
                        fix=f"add {', '.join(missing)} (a ChangeNet CSV has {', '.join(cn.COLUMNS)}), or give a "
                            "filepath column", field=field, path=str(path), missing=missing, columns=names)
    return "csv"


def open_listing(path: Path, field: str, images_root: Path | None = None,
                 changenet_options: ChangeNetOptions | None = None, texts: bool = False) -> Listing:
    """`path` as a standard listing; a file with no text `filepath` column is refused naming `field`.
    A ChangeNet CSV resolves with `changenet_options` (images_dir there wins over `images_root`).
    `texts`: a text parquet is taken too (what embed reads); a file with neither column is refused naming both."""
    kind = format_of(path, field)
    if kind == "text" and texts:
        return open_text_listing(path, field)
    root = images_root or path.parent
    listing = changenet(path, root, changenet_options) if kind == "changenet" else FORMATS[kind](path, root)
    if texts and FILEPATH not in listing.schema.names:
        raise DeftError("column_missing", f"{field} {path} has neither a 'filepath' column (images to embed) nor "
                        f"a 'text' column (sentences to embed); its columns are: {', '.join(listing.schema.names)}",
                        fix="name the image paths column filepath, or the sentences column text", field=field,
                        path=str(path), missing=[FILEPATH, TEXT], columns=list(listing.schema.names))
    tables.require_columns(path, listing.schema, [FILEPATH], field)
    return listing


def open_text_listing(path: Path, field: str) -> Listing:
    """A parquet's `text` column as a text listing, whatever else it holds (the container's
    `embedding text_embeddings` reads `text` alone); refused without one, or with non-strings in it."""
    listing = text_parquet(path, path.parent)
    tables.require_columns(path, listing.schema, [TEXT], field)
    kind = listing.schema.field(TEXT).type
    if not (tables.is_text(kind) or pa.types.is_null(kind)):  # numbers or lists are no sentences
        raise DeftError("column_invalid", f"{field} {path}: column 'text' has type {kind}; it must hold sentences "
                        "as strings", fix="write the text column as strings", field=field, path=str(path),
                        column=TEXT, type=str(kind))
    return listing


def text_listing(texts: list[str], path: Path) -> Listing:
    """Sentences given as such (`run --text`) as a text listing held in memory, one row each, to be
    written to `path` (the run folder's target listing) by write_listing."""
    table = pa.table({TEXT: pa.array(texts, pa.string())})
    return Listing(path, "text", path.parent, table.schema, table.num_rows, table)


def write_listing(listing: Listing, path: Path) -> Listing:
    """The listing's rows written to `path` as a filepath parquet (streamed, atomically), and the
    listing read from there: one file per side in a run folder that every later step — and the
    TAO container, which reads parquet only — takes, whatever the input's format was."""
    with tables.atomic_output(path) as temp, pq.ParquetWriter(temp, listing.schema) as writer:
        for batch in listing.batches(65536):
            writer.write_batch(batch)
    # a text listing stays one (its rows are sentences); any other is now a filepath parquet
    return dataclasses.replace(listing, path=path, format="text" if listing.format == "text" else "parquet",
                               table=None)


def filepaths_of(batch: pa.RecordBatch | pa.Table) -> list[str | None]:
    """A listing batch's filepaths, as written (None: a null filepath)."""
    return batch.column(FILEPATH).to_pylist()
