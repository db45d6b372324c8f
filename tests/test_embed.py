"""The embed step on real image files: carried columns, CSV pools, skipped images, EXIF, roots."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_image
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.tools.embed import embed

THUMB = {"model": "thumbnail"}


def test_output_carries_every_column_in_order_with_identity(image_set):
    out = image_set / "emb" / "t.parquet"
    result = embed(image_set / "targets.parquet", out, overrides=THUMB)
    table = pq.read_table(out)
    assert table.schema.names == ["filepath", "label", "siamese_score", "embedding"]
    assert table.column("filepath").to_pylist() == ["imgs/0.png", "imgs/1.png"]
    assert table.column("siamese_score").to_pylist() == [0.1, 0.2]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert len(table.column("embedding")[0].as_py()) == 768
    assert result.rows == 2 and result.skipped == 0 and result.warnings == []
    assert result.columns == table.schema.names
    identity = json.loads(table.schema.metadata[tables.IDENTITY_KEY])
    assert identity == result.encoder.model_dump() and identity["model"] == "thumbnail"


def test_hf_encoder_embeds_and_records_its_identity(image_set, tiny_siglip):
    out = image_set / "t.parquet"
    result = embed(image_set / "pool.parquet", out,
                   overrides={"model": "SigLIP", "model_path": str(tiny_siglip), "batch_size": 3})
    table = pq.read_table(out)
    vectors = np.array(table.column("embedding").to_pylist())
    assert vectors.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert result.encoder.weights_digest and result.encoder.model_path == str(tiny_siglip.resolve())
    # batch_size is not part of the identity
    again = embed(image_set / "pool.parquet", image_set / "t2.parquet",
                  overrides={"model": "SigLIP", "model_path": str(tiny_siglip), "batch_size": 1})
    assert again.encoder == result.encoder
    np.testing.assert_allclose(np.array(pq.read_table(image_set / "t2.parquet").column("embedding").to_pylist()),
                               vectors, atol=1e-5)


def test_csv_pool_is_converted_keeping_all_columns(image_set):
    (image_set / "pool.csv").write_text("filepath,label,camera\nimgs/2.png,a,7\nimgs/3.png,b,8\n")
    out = image_set / "s.parquet"
    result = embed(image_set / "pool.csv", out, overrides=THUMB)
    table = pq.read_table(out)
    assert table.schema.names == ["filepath", "label", "camera", "embedding"]
    assert table.column("camera").to_pylist() == [7, 8] and result.rows == 2


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    good = [write_image(tmp_path / f"g{i}.png", seed=i) for i in range(3)]
    (tmp_path / "notes.png").write_text("this is not an image")
    full = (tmp_path / "g0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # truncated mid-stream
    (tmp_path / "adir.png").mkdir()
    paths = ["g0.png", "missing.png", "notes.png", "g1.png", "cut.png", "adir.png", "g2.png"]
    pq.write_table(pa.table({"filepath": paths, "row": list(range(7))}), tmp_path / "in.parquet")
    result = embed(tmp_path / "in.parquet", tmp_path / "out.parquet", overrides={**THUMB, "batch_size": 2})
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("filepath").to_pylist() == ["g0.png", "g1.png", "g2.png"]
    assert table.column("row").to_pylist() == [0, 3, 6]  # order kept
    assert result.skipped == 4 and result.rows == 3 and result.input_rows == 7
    assert result.skipped_by_reason == {"missing": 1, "not an image": 1, "unreadable": 1, "is a directory": 1}
    (warning,) = result.warnings
    assert warning.code == "images_skipped" and warning.details["count"] == 4
    assert warning.details["examples"][0] == "missing.png: missing"
    assert "4 of 7 rows" in warning.message
    assert len(good) == 3


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and the tag saying "rotate 90° clockwise to view"
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=100, subsampling=0)
    upright.save(tmp_path / "upright.jpg", quality=100, subsampling=0)
    pq.write_table(pa.table({"filepath": ["upright.jpg", "tagged.jpg"]}), tmp_path / "in.parquet")
    embed(tmp_path / "in.parquet", tmp_path / "out.parquet", overrides=THUMB)
    a, b = np.array(pq.read_table(tmp_path / "out.parquet").column("embedding").to_pylist())
    assert Image.open(tmp_path / "tagged.jpg").size == (24, 40)  # the pixels really are rotated
    assert float(a @ b) > 0.95  # same picture once the tag is honoured


def test_relative_paths_resolve_against_image_root_absolute_ones_stand(tmp_path):
    root = tmp_path / "images"
    write_image(root / "a.png", seed=1)
    absolute = write_image(tmp_path / "elsewhere" / "b.png", seed=2)
    listing = tmp_path / "lists" / "in.parquet"
    listing.parent.mkdir()
    pq.write_table(pa.table({"filepath": ["a.png", str(absolute)]}), listing)
    default = embed(listing, tmp_path / "o1.parquet", overrides=THUMB)
    assert default.rows == 1 and default.skipped_by_reason == {"missing": 1}  # a.png is not in lists/
    rooted = embed(listing, tmp_path / "o2.parquet", overrides={**THUMB, "image_root": str(root)})
    assert rooted.rows == 2 and rooted.skipped == 0


def test_input_without_filepath_names_its_columns_and_writes_nothing(tmp_path):
    pq.write_table(pa.table({"path": ["a.png"], "label": ["x"]}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "in.parquet", out, overrides=THUMB)
    assert exc.value.code == "column_missing" and "path, label" in exc.value.message
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "in.parquet"]


def test_missing_paths_and_refusals(tmp_path, image_set):
    with pytest.raises(DeftError) as exc:
        embed(None, tmp_path / "o.parquet", overrides=THUMB)
    assert exc.value.code == "spec_missing_value" and exc.value.details["field"] == "input_parquet"
    with pytest.raises(DeftError) as exc:
        embed(image_set / "pool.parquet", image_set / "pool.parquet", overrides=THUMB)
    assert exc.value.code == "output_is_input"
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "bad.parquet", tmp_path / "o.parquet", overrides=THUMB)
    assert exc.value.code == "parquet_invalid"


def test_an_existing_output_survives_a_failed_embed(tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"earlier result")
    pq.write_table(pa.table({"filepath": ["a.png"]}), tmp_path / "in.parquet")
    with pytest.raises(DeftError):
        embed(tmp_path / "in.parquet", out, overrides={"model": "CLIP", "model_path": str(tmp_path / "none")})
    assert out.read_bytes() == b"earlier result"


def test_progress_events_reach_the_caller(image_set):
    from deft_mine.events import RecordingEvents

    events = RecordingEvents()
    embed(image_set / "pool.parquet", image_set / "o.parquet", overrides={**THUMB, "batch_size": 2},
          events=events)
    assert events.progress_events == [("embed", 0, 4), ("embed", 2, 4), ("embed", 4, 4)]
