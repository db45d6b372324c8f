"""The label rule in one place: label_key on one label, label_keys on many, unique matching's classes."""

from __future__ import annotations

import pyarrow as pa

from deft_mine.engine import unique_matching
from deft_mine.engine.mining import label_key, label_keys


def test_one_label_and_many_follow_one_rule():
    labels = [" dent", "DENT ", "Straße", None]
    assert [label_key(v) for v in ["dent", " dent", "DENT ", "Straße", None]] == ["DENT", "DENT", "DENT", "STRASSE", None]
    assert label_keys(labels).to_pylist() == ["DENT", "DENT", "STRASSE", None]
    assert label_keys(pa.array([3])).to_pylist() == ["3"]  # a number compares as its text
    assert label_keys(pa.array(["a ", None])).to_pylist() == [label_key("a "), None]


def test_unique_matching_keeps_no_copy_of_the_rule():
    assert not hasattr(unique_matching, "_label_key")
    assert "labels" not in unique_matching._Side.__dataclass_fields__
