"""The embedding store: reuse by encoder and bytes (never by path), resume after a crash with an
identical output, corrupt shards set aside, and what the store holds. Real images, real shards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
from deft_mine.engine import store as stores
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled, NullEvents
from deft_mine.tools import embed, store_info

THUMB = {"model": "thumbnail", "batch_size": 4}


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """20 distinct images listed by relative path, plus the folder for a private store."""
    for i in range(20):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=500 + i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(20)],
                             "label": [f"c{i % 3}" for i in range(20)]}), tmp_path / "pool.parquet")
    return tmp_path


def vectors(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path).column("embedding").to_pylist(), np.float32)


def same_output(a: Path, b: Path) -> bool:
    """Rows, order, columns and vectors bit for bit (the file metadata aside)."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    return ta.schema == tb.schema and ta.equals(tb) and vectors(a).tobytes() == vectors(b).tobytes()


def test_a_second_round_embeds_nothing_and_writes_the_same_file(pool: Path) -> None:
    store = pool / "store"
    first = embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)
    second = embed(pool / "pool.parquet", pool / "e2.parquet", overrides=THUMB, store=store)
    plain = embed(pool / "pool.parquet", pool / "e0.parquet", overrides=THUMB, no_store=True)
    assert (first.reused, first.embedded) == (0, 20)
    assert (second.reused, second.embedded) == (20, 0) and second.seconds_saved > 0
    assert (plain.store, plain.reused, plain.embedded) == (None, 0, 20)
    assert same_output(pool / "e1.parquet", pool / "e2.parquet")
    assert same_output(pool / "e0.parquet", pool / "e2.parquet")
    # the five batch shards of round 1 were compacted into one
    (shelf,) = stores.describe(store)
    assert (shelf.model, shelf.vectors, shelf.shards) == ("thumbnail", 20, 1)


def test_reuse_follows_the_bytes_not_the_path(pool: Path) -> None:
    store = pool / "store"
    embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)
    write_image(pool / "imgs" / "3.png", seed=9999)  # rewritten in place: new bytes, same path
    shutil.copy(pool / "imgs" / "5.png", pool / "imgs" / "copy_of_5.png")  # same bytes, new path
    os.rename(pool / "imgs" / "7.png", pool / "imgs" / "renamed_7.png")
    listing = [f"imgs/{i}.png" for i in range(20)]
    listing[7] = "imgs/renamed_7.png"
    pq.write_table(pa.table({"filepath": [*listing, "imgs/copy_of_5.png"]}), pool / "moved.parquet")
    again = embed(pool / "moved.parquet", pool / "e2.parquet", overrides=THUMB, store=store)
    assert (again.reused, again.embedded) == (20, 1)  # only the rewritten image ran the encoder
    old, new = vectors(pool / "e1.parquet"), vectors(pool / "e2.parquet")
    assert not np.array_equal(old[3], new[3])
    assert np.array_equal(old[7], new[7]) and np.array_equal(old[5], new[20])
    fresh = embed(pool / "moved.parquet", pool / "e3.parquet", overrides=THUMB, no_store=True)
    assert fresh.embedded == 21 and same_output(pool / "e2.parquet", pool / "e3.parquet")


def test_another_encoder_never_reuses_these_vectors(pool: Path, tiny_siglip: Path) -> None:
    store = pool / "store"
    embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)
    siglip = embed(pool / "pool.parquet", pool / "e2.parquet", store=store,
                   overrides={"model": "SigLIP", "model_path": str(tiny_siglip), "batch_size": 8})
    assert (siglip.reused, siglip.embedded) == (0, 20)
    assert sorted(info.model for info in stores.describe(store)) == ["SigLIP", "thumbnail"]


class CrashAfter(NullEvents):
    """Stands in for a crash: the embed stops for good after `rows` rows were done."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        if done >= self.rows:
            raise Cancelled("crash")


def test_a_crashed_embed_resumes_with_only_what_was_missing(pool: Path) -> None:
    store = pool / "store"
    with pytest.raises(Cancelled):
        embed(pool / "pool.parquet", pool / "e.parquet", overrides=THUMB, store=store, events=CrashAfter(12))
    assert not (pool / "e.parquet").exists()  # the output is written whole or not at all...
    kept = sum(pq.ParquetFile(p).metadata.num_rows for p in (store / next(iter(
        p.name for p in store.iterdir() if p.is_dir()))).glob("*.parquet"))
    assert kept == 12  # ...but every finished batch is in the store
    resumed = embed(pool / "pool.parquet", pool / "e.parquet", overrides=THUMB, store=store)
    assert (resumed.reused, resumed.embedded) == (12, 8)
    embed(pool / "pool.parquet", pool / "whole.parquet", overrides=THUMB, no_store=True)
    assert same_output(pool / "e.parquet", pool / "whole.parquet")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_corrupt_shard_is_set_aside_and_its_images_embedded_again(pool: Path, damage: str) -> None:
    store = pool / "store"
    embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)
    (shard,) = list(store.glob("*/*.parquet"))
    raw = bytearray(shard.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 2] ^= 0xFF  # inside the vectors
    else:
        raw = raw[: len(raw) // 2]
    shard.write_bytes(bytes(raw))
    again = embed(pool / "pool.parquet", pool / "e2.parquet", overrides=THUMB, store=store)
    assert (again.reused, again.embedded) == (0, 20)
    assert [w.code for w in again.warnings] == ["store_shard_corrupt"]
    assert again.warnings[0].details["shards"] == [shard.name]
    assert (shard.parent / f".corrupt-{shard.name}").exists() and not shard.exists()
    assert same_output(pool / "e1.parquet", pool / "e2.parquet")
    third = embed(pool / "pool.parquet", pool / "e3.parquet", overrides=THUMB, store=store)
    assert (third.reused, third.warnings) == (20, [])


def test_unreadable_images_are_skipped_not_stored(pool: Path) -> None:
    store = pool / "store"
    (pool / "imgs" / "bad.png").write_bytes(b"not a png")
    pq.write_table(pa.table({"filepath": ["imgs/0.png", "imgs/bad.png", "imgs/absent.png"]}), pool / "odd.parquet")
    for round_ in range(2):
        result = embed(pool / "odd.parquet", pool / f"o{round_}.parquet", overrides=THUMB, store=store)
        assert (result.rows, result.skipped) == (1, 2)
        assert (result.reused, result.embedded) == ((0, 1) if round_ == 0 else (1, 0))
        assert result.skipped_by_reason == {"missing": 1, "not an image": 1}


def test_prune_by_encoder_and_by_age(pool: Path) -> None:
    store = pool / "store"
    embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)
    assert stores.prune(store, older_than_seconds=3600) == (0, 0)  # nothing that old
    (shard,) = list(store.glob("*/*.parquet"))
    os.utime(shard, (0, 0))
    removed, freed = stores.prune(store, older_than_seconds=3600)
    assert removed == 1 and freed > 0 and stores.describe(store)[0].vectors == 0
    embed(pool / "pool.parquet", pool / "e2.parquet", overrides=THUMB, store=store)
    assert stores.prune(store, encoder="thumbnail")[0] == 1
    (shelf,) = stores.describe(store)  # the shelf stays (an embed may be writing to it), empty
    assert (shelf.model, shelf.shards, shelf.vectors) == ("thumbnail", 0, 0)
    with pytest.raises(DeftError) as exc:
        stores.prune(store)
    assert exc.value.code == "spec_invalid"


def test_a_folder_of_other_files_is_not_taken_for_a_store(pool: Path) -> None:
    with pytest.raises(DeftError) as exc:
        embed(pool / "pool.parquet", pool / "e.parquet", overrides=THUMB, store=pool / "imgs")
    assert exc.value.code == "store_invalid" and not (pool / "e.parquet").exists()


def test_a_passing_system_error_does_not_cost_a_healthy_shard(pool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many open files (an errno) is not corruption: the shard is left where it is, its
    rows embedded this time, and no corruption is reported."""
    import errno

    store = pool / "store"
    embed(pool / "pool.parquet", pool / "e1.parquet", overrides=THUMB, store=store)

    def no_files_left(self: stores.Shelf, shard_index: int, group: int) -> np.ndarray:
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(stores.Shelf, "_group", no_files_left)
        again = embed(pool / "pool.parquet", pool / "e2.parquet", overrides=THUMB, store=store)
    assert (again.reused, again.embedded, again.warnings) == (0, 20, [])
    assert not list(store.glob("*/.corrupt-*"))
    assert embed(pool / "pool.parquet", pool / "e3.parquet", overrides=THUMB, store=store).reused == 20


def test_a_file_is_not_taken_for_a_store(pool: Path) -> None:
    (pool / "notes.txt").write_text("x")
    for call in (lambda: embed(pool / "pool.parquet", pool / "e.parquet", overrides=THUMB, store=pool / "notes.txt"),
                 lambda: store_info(store=pool / "notes.txt")):
        with pytest.raises(DeftError) as exc:
            call()
        assert exc.value.code == "store_invalid"


def test_many_first_openers_of_a_new_store_all_succeed(tmp_path: Path) -> None:
    """Eight runs starting at once on a new store: one writes the marker, then its encoder's
    folder; the others must not take that folder for "other files" (the server's load test did)."""
    from concurrent.futures import ThreadPoolExecutor

    from deft_mine.schemas.results import EncoderIdentity

    identity = EncoderIdentity(model="thumbnail", preprocessing={"side": 8})
    for attempt in range(15):
        root = tmp_path / f"store{attempt}"
        with ThreadPoolExecutor(8) as pool:
            shelves = list(pool.map(lambda _: stores.Shelf(root, identity), range(8)))
        assert {s.folder for s in shelves} == {root / identity.fingerprint}
