"""The leakage guard on the docker backend against the fake TAO image (tests/fake_tao.py): the image
knows no leaks_parquet, so the host mines with the leak rows left out after the container's step (as
it applies the floor), and the answer equals --backend local."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_docker_tao import NVIDIA, docker_args, fake_tao  # noqa: F401 - the fixture: the fake's images
from test_leaks import guarded_set  # noqa: F401 - the fixture: targets, a protect listing, a pool of copies
from deft_mine.schemas import artifacts
from deft_mine.tools.run import run

pytestmark = pytest.mark.e2e
THUMB = {"model": "thumbnail", "topn": 3}


def _leaks(folder: Path) -> list[tuple]:
    table = pq.read_table(folder / artifacts.LEAKS)
    return list(zip(*(table.column(c).to_pylist() for c in ("filepath", "protected_filepath", "kind"))))


def _both(folder: Path, flavour: str, **given) -> tuple:
    found = []
    for backend, args in (("local", {}), ("docker", docker_args(flavour))):
        found.append(run(folder / "targets.parquet", folder / "pool.parquet", run_dir=folder / backend,
                         no_store=True, **given, **args))
    return tuple(found)


@pytest.mark.parametrize("flavour", NVIDIA)
def test_a_guarded_run_on_nvidias_image_equals_local(fake_tao, guarded_set, flavour):
    """A protect listing and leak_similarity: the protected images embedded in the container, the
    leaks found on the host, the container's whole-pool answer kept as mined_raw.parquet and the
    host's (the leak rows left out) the run's."""
    local, boxed = _both(guarded_set, flavour, protect=[str(guarded_set / "val.parquet")],
                         overrides={**THUMB, "leak_similarity": 0.9, "leak_scope": "pool"})
    assert local.leaks.by_kind == boxed.leaks.by_kind == {"identical_bytes": 2, "similar": 2}
    assert boxed.leaks.scope == "pool"  # docker judges the whole pool whatever leak_scope says
    assert _leaks(guarded_set / "docker") == _leaks(guarded_set / "local")
    mined = [pq.read_table(guarded_set / b / artifacts.MINED).column("filepath").to_pylist() for b in ("local", "docker")]
    assert mined[0] == mined[1] and not set(mined[1]) & {row[0] for row in _leaks(guarded_set / "docker")}
    raw = pq.read_table(guarded_set / "docker" / artifacts.MINED_RAW).column("filepath").to_pylist()
    assert "pool/copy_t0.png" in raw  # the image searched the whole pool: the host's answer stands
    assert boxed.mine.summary["pool"] == local.mine.summary["pool"] == 6
    assert "leaks_excluded" in [w.code for w in boxed.warnings]


def test_a_byte_copy_of_a_target_is_left_out_on_docker_by_default(fake_tao, guarded_set):
    """No guard asked: the always-on byte check still keeps a target's copy out, as locally."""
    local, boxed = _both(guarded_set, "main", overrides=THUMB)
    # local judges the search's candidates (leak_scope=mined), docker the whole pool: here the same copy
    assert _leaks(guarded_set / "docker") == _leaks(guarded_set / "local") == [
        ("pool/copy_t0.png", "sets/t0.png", "identical_bytes")]
    assert boxed.mined == local.mined
    assert pq.read_table(guarded_set / "docker" / artifacts.MINED).equals(
        pq.read_table(guarded_set / "local" / artifacts.MINED))


@pytest.mark.parametrize("flavour", NVIDIA)
def test_mined_files_with_identical_bytes_are_mined_once_on_nvidias_image(fake_tao, guarded_set, flavour):
    """identical_images is always on: NVIDIA's image mines both byte-identical files, the host (which
    recomputes the pairs anyway) mines each once, as locally, and keeps the image's answer as a record."""
    import shutil

    import pyarrow as pa

    shutil.copyfile(guarded_set / "pool" / "p0.png", guarded_set / "pool" / "p0_again.png")
    paths = pq.read_table(guarded_set / "pool.parquet").column("filepath").to_pylist()
    pq.write_table(pa.table({"filepath": paths + ["pool/p0_again.png"]}), guarded_set / "pool.parquet")
    local, boxed = _both(guarded_set, flavour, overrides={**THUMB, "topn": 11})
    assert boxed.mine.summary["identical_images"] == local.mine.summary["identical_images"] >= 1
    assert pq.read_table(guarded_set / "docker" / artifacts.MINED).equals(
        pq.read_table(guarded_set / "local" / artifacts.MINED))
    raw = pq.read_table(guarded_set / "docker" / artifacts.MINED_RAW).column("filepath").to_pylist()
    assert {"pool/p0.png", "pool/p0_again.png"} <= set(raw)  # the image mined both
