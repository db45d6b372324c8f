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
