"""The listings room: every input format gives the same standard listing (filepath first, the
carried columns, the images root), null filepaths are counted, and a file without a filepath
column is refused naming it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.engine.listings import FORMATS, filepaths_of, open_listing, write_listing
from deft_mine.errors import DeftError

ROWS = {"filepath": ["a.png", None, "sub/b.png", "/abs/c.png"], "label": ["ok", "scratch", "ok", "dent"]}


def _standard(listing) -> tuple:
    table = pa.Table.from_batches(list(listing.batches(2)))
    # a CSV's empty field reads as "" (embedding skips it as it skips a null: "null filepath")
    return (listing.schema.names, listing.rows, listing.images_root, [p or None for p in table.column("filepath").to_pylist()],
            table.column("label").to_pylist(), listing.null_filepaths)


def _csv(path: Path, sep: str) -> Path:
    lines = [sep.join(ROWS)] + [sep.join("" if v is None else v for v in row) for row in zip(*ROWS.values())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_format_gives_the_same_standard_listing(tmp_path: Path) -> None:
    parquet = tmp_path / "pool.parquet"
    pq.write_table(pa.table(ROWS), parquet)
    listings = {"parquet": open_listing(parquet, "source"), "csv": open_listing(_csv(tmp_path / "pool.csv", ","), "source"),
                "csv;": open_listing(_csv(tmp_path / "semi.csv", ";"), "source")}
    # a new format: a function there, and a case here (ChangeNet CSVs: tests/test_changenet_listing.py;
    # text parquets, sentences rather than images: tests/test_text_embeddings.py)
    assert set(FORMATS) == {"parquet", "csv", "changenet", "text"}
    assert [listing.format for listing in listings.values()] == ["parquet", "csv", "csv"]
    expected = (["filepath", "label"], 4, tmp_path, ROWS["filepath"], ROWS["label"], 1)
    for name, listing in listings.items():
        assert _standard(listing) == expected, name


def test_paths_resolve_against_the_images_root_and_a_null_filepath_is_counted(tmp_path: Path) -> None:
    parquet = tmp_path / "pool.parquet"
    pq.write_table(pa.table(ROWS), parquet)
    listing = open_listing(parquet, "source", tmp_path / "images")
    assert list(listing.resolved()) == [(0, "a.png", tmp_path / "images" / "a.png"), (1, None, None),
                                        (2, "sub/b.png", tmp_path / "images" / "sub" / "b.png"),
                                        (3, "/abs/c.png", Path("/abs/c.png"))]
    assert list(listing.filepaths(2)) == ["a.png", None] and listing.null_filepaths == 1
    assert filepaths_of(next(listing.batches(3, ["filepath"]))) == ["a.png", None, "sub/b.png"]


@pytest.mark.parametrize("sep", [",", ";"])
def test_a_written_listing_is_a_filepath_parquet_that_reads_back_the_same(tmp_path: Path, sep: str) -> None:
    given = open_listing(_csv(tmp_path / "pool.csv", sep), "source", tmp_path / "images")
    kept = write_listing(given, tmp_path / "run" / "source_listing.parquet")
    assert (kept.path, kept.format, kept.table) == (tmp_path / "run" / "source_listing.parquet", "parquet", None)
    assert pq.read_table(kept.path).equals(given.table)  # every row and carried column, in file order
    assert _standard(kept) == _standard(given)  # relative filepaths still resolve where the CSV's did
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["source_listing.parquet"]  # no temp file left


@pytest.mark.parametrize("name", ["pool.parquet", "pool.csv"])
def test_a_file_without_a_filepath_column_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("path,label\na.png,ok\n")
    else:
        pq.write_table(pa.table({"path": ["a.png"], "label": ["ok"]}), path)
    with pytest.raises(DeftError) as exc:
        open_listing(path, "source")
    assert exc.value.code == "column_missing" and str(path) in exc.value.message
    assert exc.value.details["field"] == "source" and exc.value.details["missing"] == ["filepath"]


def test_numeric_looking_csv_filepaths_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "numbered.csv"
    path.write_text("filepath\n0001\n")
    assert list(open_listing(path, "source").filepaths()) == ["0001"]
