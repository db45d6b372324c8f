"""The docker backend against a real Docker engine, with a test image made by `docker import`.

No registry is reachable here: the image is a busybox root filesystem whose entrypoint is this
checkout's `deft-mine-task`; the host's Python, libraries and virtual environment are bind-mounted
read-only at their own paths (the backend's `mounts`). CI starts the engine (.ci/run); elsewhere
these tests skip, saying why, when no engine can be reached.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image
import deft_mine
from deft_mine.errors import DeftError
from deft_mine.events import RecordingEvents
from deft_mine.tools.embed import embed
from deft_mine.tools.mine import mine
from deft_mine.tools.preflight import preflight
from deft_mine.tools.run import run

TEST_IMAGE = "deft-mine-test:latest"
REPO = Path(__file__).resolve().parents[1]
# What the host's Python needs inside the container, mounted read-only at identical paths: the
# prefixes also as their real paths (a virtual environment may be a link to another checkout's), and
# the folder deft_mine is imported from here (PYTHONPATH, or an editable install of another checkout).
HOST_MOUNTS = sorted(p for p in {sys.base_prefix, sys.prefix, os.path.realpath(sys.prefix), str(REPO / "src"),
                                 str(Path(deft_mine.__file__).resolve().parents[1]), "/lib", "/lib64", "/usr/lib"}
                     if os.path.exists(p))
THUMB = {"model": "thumbnail"}


def _engine():
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine here"
        if os.environ.get("CI"):
            pytest.fail(f"CI must start a Docker engine (.ci/run does): {exc}")
        pytest.skip(f"no Docker engine reachable here ({exc}); .ci/run starts one")


@pytest.fixture(scope="session")
def docker_image() -> str:
    """Import a busybox root filesystem whose entrypoint is this venv's deft-mine-task."""
    client = _engine()
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("Debian's busybox-static is needed to build the test image (.ci/run installs it)")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for tool in ("sh", "cat", "ls"):
            link = tarfile.TarInfo(f"bin/{tool}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for folder in ("tmp", "etc"):
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777
            tar.addfile(entry)
    entrypoint = str(Path(sys.executable).parent / "deft-mine-task")
    subprocess.run(["docker", "import", "--change", f'ENTRYPOINT ["{entrypoint}"]', "-", TEST_IMAGE],
                   input=data.getvalue(), check=True, capture_output=True)
    client.images.get(TEST_IMAGE)
    return TEST_IMAGE


def docker_args(image: str) -> dict:
    return {"backend": "docker", "image": image, "mounts": HOST_MOUNTS}


@pytest.mark.e2e
def test_run_through_the_container_matches_the_local_backend(image_set, docker_image):
    local = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "local",
                overrides={**THUMB, "topn": 2, "filter_by_label": True})
    events = RecordingEvents()
    boxed = run(image_set / "targets.parquet", image_set / "pool.parquet", run_dir=image_set / "docker",
                overrides={**THUMB, "topn": 2, "filter_by_label": True}, events=events, **docker_args(docker_image))
    for name in ("target_embeddings.parquet", "source_embeddings.parquet", "mined.parquet"):
        ours, theirs = pq.read_table(image_set / "local" / name), pq.read_table(image_set / "docker" / name)
        assert ours.schema.names == theirs.schema.names
        assert ours.column("filepath").to_pylist() == theirs.column("filepath").to_pylist()
    np.testing.assert_allclose(
        np.array(pq.read_table(image_set / "local" / "source_embeddings.parquet").column("embedding").to_pylist()),
        np.array(pq.read_table(image_set / "docker" / "source_embeddings.parquet").column("embedding").to_pylist()))
    assert boxed.mine.summary == local.mine.summary
    assert boxed.target_embed.encoder == local.target_embed.encoder  # our image records it too
    assert boxed.source_embed.device.startswith(f"docker:{docker_image}@sha256:")  # the tag and what it was
    environment = json.loads((image_set / "docker" / "mining_config" / "environment.json").read_text())
    assert environment["backend"]["embed_source"]["device"] == boxed.source_embed.device
    # the container's own lines reached the caller while it ran
    lines = [message for _, message in events.logs]
    assert any("docker run deft-mine-test:latest embedding image_embeddings" in m for m in lines)
    assert any("embedded 4 of 4 rows" in m for m in lines)
    # our image's result JSON was read (the encoder identity above came from it) and removed
    assert not list((image_set / "docker").rglob("*.result.json"))  # deft-mine-task's own output
    assert ("embed source", 4, 4) in events.progress_events
    assert (image_set / "docker" / "Mining_Report.md").exists()
    assert not [c for c in __import__("docker").from_env().containers.list(all=True)
                if c.image.tags == [docker_image]]  # containers are removed afterwards


@pytest.mark.e2e
def test_filter_noop_in_the_container_is_a_structured_warning(image_set, docker_image):
    args = docker_args(docker_image)
    embed(image_set / "targets.parquet", image_set / "t.parquet", overrides=THUMB, **args)
    pq.write_table(pq.read_table(image_set / "pool.parquet").drop(["label"]), image_set / "nolabel.parquet")
    embed(image_set / "nolabel.parquet", image_set / "s.parquet", overrides=THUMB, **args)
    events = RecordingEvents()
    result = mine(image_set / "s.parquet", image_set / "t.parquet", image_set / "out" / "mined.parquet",
                  overrides={"filter_by_label": True, "topn": 1}, events=events, **args)
    (warning,) = [w for w in result.warnings if w.code == "filter_by_label_noop"]
    assert warning.details["sides_without_label"] == ["source"]
    assert result.label_filter == "noop"
    assert any("filter_by_label_noop" in m for _, m in events.logs)  # the container said so too


@pytest.mark.e2e
def test_a_failing_container_gives_a_structured_error_with_its_log_tail(image_set, docker_image):
    args = docker_args(docker_image)
    embed(image_set / "targets.parquet", image_set / "t.parquet", overrides=THUMB, **args)
    embed(image_set / "pool.parquet", image_set / "s.parquet", overrides=THUMB, **args)
    with pytest.raises(DeftError) as exc:
        mine(image_set / "s.parquet", image_set / "t.parquet", image_set / "m.parquet",
             overrides={"source_embed_column_name": "features"}, **args)
    assert exc.value.code == "container_failed" and exc.value.details["exit_code"] == 2
    assert any("column_missing" in line and "features" in line for line in exc.value.details["log_tail"])
    assert not (image_set / "m.parquet").exists()


@pytest.mark.e2e
def test_an_image_outside_the_workspace_is_refused_before_the_container_starts(image_set, tmp_path_factory, docker_image):
    elsewhere = write_image(tmp_path_factory.mktemp("elsewhere") / "x.png", seed=9)
    pq.write_table(pa.table({"filepath": ["imgs/0.png", str(elsewhere)]}), image_set / "mixed.parquet")
    events = RecordingEvents()
    with pytest.raises(DeftError) as exc:
        embed(image_set / "mixed.parquet", image_set / "o.parquet", overrides=THUMB, events=events,
              **docker_args(docker_image))
    assert exc.value.code == "path_outside_workspace" and str(elsewhere) in exc.value.message
    assert not any("docker run" in m for _, m in events.logs) and not (image_set / "o.parquet").exists()
    # ...and an extra read-only mount makes it reachable
    embed(image_set / "mixed.parquet", image_set / "o.parquet", overrides=THUMB,
          backend="docker", image=docker_image, mounts=[*HOST_MOUNTS, str(elsewhere.parent)])
    assert pq.read_table(image_set / "o.parquet").num_rows == 2


@pytest.mark.e2e
def test_preflight_names_a_missing_image_and_a_stopped_daemon(monkeypatch, docker_image, tmp_path):
    result = preflight("docker", image="deft-mine-absent:0", output_dir=tmp_path)
    (image,) = [c for c in result.checks if c.name == "image"]
    assert image.status == "fail" and image.fix.startswith("docker pull deft-mine-absent:0")
    assert not result.ok
    present = {c.name: c for c in preflight("docker", image=docker_image).checks}
    assert present["image"].status == "ok"
    # our image's entrypoint is deft-mine-task: it can use the embedding store
    assert present["store in container"].status == "ok" and "read-write" in present["store in container"].detail
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    stopped = preflight("docker", image=docker_image)
    daemon, store = stopped.checks
    assert daemon.name == "docker daemon" and daemon.status == "fail" and "dockerd" in daemon.fix
    assert store.name == "store" and store.status == "ok"


def test_the_image_comes_from_the_flag_then_tao_versions_then_ours(monkeypatch, tmp_path):
    from deft_mine.backends.docker import DEFAULT_IMAGE, resolve_image

    monkeypatch.delenv("TAO_SKILL_BANK_PATH", raising=False)
    assert resolve_image(None) == DEFAULT_IMAGE == "deft-mine:latest"
    (tmp_path / "versions.yaml").write_text(
        "images:\n  tao_toolkit:\n    data_services: nvcr.io/nvidia/tao/tao-toolkit:6.0.0-data-services\n")
    monkeypatch.setenv("TAO_SKILL_BANK_PATH", str(tmp_path))
    assert resolve_image(None) == "nvcr.io/nvidia/tao/tao-toolkit:6.0.0-data-services"
    assert resolve_image("mine:1") == "mine:1"


@pytest.mark.e2e
def test_cancelling_stops_and_removes_the_container(image_set, docker_image):
    import docker

    from deft_mine.events import Cancelled

    class CancelOnFirstImage(RecordingEvents):
        def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
            super().progress(stage, done, total)
            if done >= 1:
                raise Cancelled("cancelled by the test")

    events = CancelOnFirstImage()
    with pytest.raises(Cancelled):
        embed(image_set / "pool.parquet", image_set / "o.parquet", overrides={**THUMB, "batch_size": 1},
              events=events, **docker_args(docker_image))
    assert events.progress_events[-1][1] >= 1
    assert not [c for c in docker.from_env().containers.list(all=True) if c.image.tags == [docker_image]]


@pytest.mark.e2e
def test_skipped_images_keep_their_reason_through_our_image(image_set, docker_image):
    """Our image records what it did (deft-mine-task's result JSON): the caller gets each
    skipped image's reason and example, as from the local backend, not a bare count."""
    pq.write_table(pa.table({"filepath": ["imgs/0.png", "imgs/absent.png"]}), image_set / "gappy.parquet")
    local = embed(image_set / "gappy.parquet", image_set / "gl.parquet", overrides=THUMB)
    boxed = embed(image_set / "gappy.parquet", image_set / "gd.parquet", overrides=THUMB, **docker_args(docker_image))
    assert boxed.skipped_by_reason == local.skipped_by_reason and sum(boxed.skipped_by_reason.values()) == 1
    assert boxed.skipped_examples == local.skipped_examples
    assert [w.code for w in boxed.warnings] == ["images_skipped"]
    assert not list(image_set.glob(".gd.parquet.result.json"))
