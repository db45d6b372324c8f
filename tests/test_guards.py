"""The session's encoder lock and the allowed-roots policy, called directly."""

from __future__ import annotations

import os

import pytest

from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity
from deft_mine.schemas.specs import EmbeddingSpec, load_spec
from deft_mine.tools.guards import EncoderLock, PathPolicy

THUMB = load_spec(EmbeddingSpec, None, {"model": "thumbnail"})
CLIP = load_spec(EmbeddingSpec, None, {"model": "CLIP", "model_path": "org/clip"})


def test_a_second_encoder_is_refused_even_while_the_first_embed_is_running():
    lock = EncoderLock()
    with lock.bind(THUMB):
        with pytest.raises(DeftError) as exc, lock.bind(CLIP):
            pass
        assert exc.value.code == "encoder_mismatch"
        with lock.bind(THUMB.model_copy(update={"batch_size": 3})):  # batch_size is no part of it
            pass


def test_a_failed_first_embed_leaves_the_session_unbound():
    lock = EncoderLock()
    with pytest.raises(RuntimeError), lock.bind(THUMB):
        raise RuntimeError("embedding failed")
    with lock.bind(CLIP) as key:
        lock.record(EncoderIdentity(model="CLIP", model_path="org/clip"), key)
    with pytest.raises(DeftError) as exc, lock.bind(THUMB):
        pass
    assert exc.value.details["differing"] == ["model", "model_path"]
    assert exc.value.details["locked_encoder"]["model"] == "CLIP"


def test_a_concurrent_embed_that_outlives_a_failed_first_one_still_binds_the_session():
    """Embeds A and B of one encoder overlap; A (which claimed the session) fails, B succeeds:
    the session is bound to B's encoder, and another is refused."""
    lock = EncoderLock()
    first = lock.bind(THUMB)
    first.__enter__()
    with lock.bind(THUMB) as key:
        first.__exit__(RuntimeError, RuntimeError("A failed"), None)
        lock.record(EncoderIdentity(model="thumbnail", preprocessing={"side": 16}), key)
    with pytest.raises(DeftError) as exc, lock.bind(CLIP):
        pass
    assert exc.value.code == "encoder_mismatch"


def test_dinov2_without_pooling_is_dinov2_with_its_default_pooling():
    lock = EncoderLock()
    dino = load_spec(EmbeddingSpec, None, {"model": "DINOv2", "model_path": "org/dino"})
    with lock.bind(dino) as key:
        lock.record(EncoderIdentity(model="DINOv2", model_path="org/dino", preprocessing={"pooling": "cls"}), key)
    with lock.bind(dino.model_copy(update={"pooling": "cls"})):
        pass
    with pytest.raises(DeftError) as exc, lock.bind(dino.model_copy(update={"pooling": "mean"})):
        pass
    assert exc.value.details["differing"] == ["pooling"]


def test_path_policy_refuses_each_escape(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link_out")
    policy = PathPolicy([root])
    assert policy.check(root / "sub" / "new.parquet", "output_parquet") == (root / "sub" / "new.parquet").resolve()
    for attack in (root / ".." / "outside" / "x.parquet",  # traversal
                   outside / "x.parquet",  # absolute path outside
                   root / "link_out" / "x.parquet"):  # symlink pointing out
        with pytest.raises(DeftError) as exc:
            policy.check(attack, "output_parquet")
        assert exc.value.code == "path_outside_roots" and exc.value.details["field"] == "output_parquet"
        assert exc.value.details["resolved"].startswith(str(outside.resolve()))


def test_paths_inside_a_spec_pass_the_same_door_as_path_arguments(tmp_path):
    """Attack: smuggle a path outside the roots through overrides, a spec file or a mount,
    where no path argument names it. Each is refused before anything is read or written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deft_mine.tools import embed, mine

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    pq.write_table(pa.table({"filepath": ["a.png"]}), outside / "listing.parquet")
    policy = PathPolicy([root])
    spec = root / "spec.yaml"
    spec.write_text(f"model: thumbnail\ninput_parquet: {outside / 'listing.parquet'}\n")
    attempts = {
        "input_parquet": lambda: embed(output_parquet=root / "o.parquet", policy=policy,
                                       overrides={"model": "thumbnail", "input_parquet": str(outside / "listing.parquet")}),
        "image_root": lambda: embed(root / "x.parquet", root / "o.parquet", policy=policy,
                                    overrides={"model": "thumbnail", "image_root": str(outside)}),
        "input_parquet (spec file)": lambda: embed(output_parquet=root / "o.parquet", spec_path=spec, policy=policy),
        "output_parquet": lambda: mine(root / "s.parquet", root / "t.parquet", policy=policy,
                                       overrides=[f"output_parquet={outside / 'mined.parquet'}"]),
        "mounts": lambda: embed(root / "x.parquet", root / "o.parquet", mounts=[str(outside)], policy=policy),
        "spec_path": lambda: embed(root / "x.parquet", root / "o.parquet", spec_path=outside / "s.yaml", policy=policy),
    }
    for field, attempt in attempts.items():
        with pytest.raises(DeftError) as exc:
            attempt()
        assert (exc.value.code, exc.value.details["field"]) == ("path_outside_roots", field.split()[0]), field
    assert sorted(p.name for p in root.iterdir()) == ["spec.yaml"]  # nothing written


def test_images_a_listing_names_pass_the_door_too(tmp_path):
    """Attack: a pool parquet inside the roots that lists images outside them, by absolute
    path, by `../` and through a symlink. Refused, naming the rows, before any image is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from deft_mine.tools import embed

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "imgs").mkdir(parents=True), outside.mkdir()
    for folder in (root / "imgs", outside):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "a.png")
    os.symlink(outside, root / "imgs" / "link_out")
    policy = PathPolicy([root])
    listing = ["imgs/a.png", str(outside / "a.png"), "../outside/a.png", "imgs/link_out/a.png", "imgs/a.png"]
    pq.write_table(pa.table({"filepath": listing}), root / "pool.parquet")
    with pytest.raises(DeftError) as exc:
        embed(root / "pool.parquet", root / "emb.parquet", overrides={"model": "thumbnail"}, policy=policy)
    assert exc.value.code == "path_outside_roots" and exc.value.details["rows"] == [1, 2, 3]
    assert "row 1" in exc.value.message and not (root / "emb.parquet").exists()
    # the same listing without a policy (a person at a shell) embeds all five
    assert embed(root / "pool.parquet", root / "emb.parquet", overrides={"model": "thumbnail"}).rows == 5


def test_an_image_root_that_is_not_a_folder_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deft_mine.tools import embed

    pq.write_table(pa.table({"filepath": ["a.png"]}), tmp_path / "pool.parquet")
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "pool.parquet", tmp_path / "e.parquet",
              overrides={"model": "thumbnail", "image_root": str(tmp_path / "nope")})
    assert (exc.value.code, exc.value.details["field"]) == ("file_not_found", "image_root")
