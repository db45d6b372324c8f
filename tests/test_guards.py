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
    with lock.bind(CLIP):
        lock.record(EncoderIdentity(model="CLIP", model_path="org/clip"))
    with pytest.raises(DeftError) as exc, lock.bind(THUMB):
        pass
    assert exc.value.details["differing"] == ["model", "model_path"]
    assert exc.value.details["locked_encoder"]["model"] == "CLIP"


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
