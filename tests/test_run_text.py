"""`run` with sentences as targets (`--text`, or a targets parquet of `text`): a tiny random SigLIP
with its tokenizer saved to disk, a small image pool; the run folder, run.json, the mined parquet
against a direct mine of the embedded sentences, the report; the refusals at the door."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from deft_mine.errors import DeftError
from deft_mine.report.pictures import GAP, SENTENCE_BACK, TILE, _sentence_tile
from test_text_embeddings import SENTENCES, _with_tokenizer, write_texts

TEXTS = SENTENCES[:2]


@pytest.fixture(scope="module")
def siglip(tiny_siglip, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_siglip, tmp_path_factory.mktemp("run_text") / "model")


def encoder(model_path: Path) -> dict:
    return {"model": "SigLIP", "model_path": str(model_path), "batch_size": 2}


def overrides(model_path: Path) -> dict:
    return {**encoder(model_path), "topn": 2}


def test_run_with_text_mines_the_pool_from_the_sentences(image_set, siglip):
    from deft_mine.tools import embed, mine, run

    done = run(text=TEXTS, source=image_set / "pool.parquet", run_dir=image_set / "run",
               overrides=overrides(siglip), no_store=True)
    folder = Path(done.run_dir)
    assert {"target_listing.parquet", "target_embeddings.parquet", "source_embeddings.parquet", "mined.parquet",
            "mined_pairs.parquet", "run.json", "Mining_Report.md", "contact_sheet.png"} <= {p.name for p in folder.iterdir()}
    listing = pq.read_table(folder / "target_listing.parquet")
    assert listing.column_names == ["text"] and listing.column("text").to_pylist() == TEXTS
    manifest = json.loads((folder / "run.json").read_text())
    targets = manifest["inputs"]["targets"]
    assert manifest["status"] == "finished"
    assert (targets["format"], targets["rows"], targets["columns"], targets["has_label"]) == ("text", 2, ["text"], False)
    assert targets["path"] == str(folder / "target_listing.parquet")
    assert manifest["encoder"]["match"] and manifest["encoder"]["target"]["model"] == "SigLIP"
    assert done.target_embed.rows == 2 and done.target_embed.columns[:2] == ["text", "embedding"]

    # the same mine, step by step: the sentences embedded on their own, mined against the pool's vectors
    write_texts(image_set / "texts.parquet", TEXTS)
    embed(image_set / "texts.parquet", image_set / "text_emb.parquet", overrides=encoder(siglip), no_store=True)
    mine(folder / "source_embeddings.parquet", image_set / "text_emb.parquet", image_set / "mined.parquet",
         overrides={"topn": 2})
    assert pq.read_table(folder / "mined.parquet").equals(pq.read_table(image_set / "mined.parquet"))

    report = (folder / "Mining_Report.md").read_text()
    assert "2 sentences" in report and all(f"“{t}”" in report for t in TEXTS)
    assert "contact_sheet.png" in report and "sentence" in report.split("## Output Sanity")[1]
    sheet = Image.open(folder / "contact_sheet.png").convert("RGB")
    corner = (GAP + TILE - 8, 36 + TILE - 8)  # the first row's target tile, below its words
    assert sheet.getpixel(corner) == SENTENCE_BACK  # the sentence drawn as text, not a "missing" image


def test_a_long_sentence_is_wrapped_and_cut_in_its_tile():
    tile = _sentence_tile(" ".join(["solder bridge between two pins"] * 20))
    assert tile.size == (TILE, TILE)
    ink = sum(1 for x in range(TILE) for y in range(TILE) if tile.getpixel((x, y)) != SENTENCE_BACK)
    assert ink > 0 and tile.getpixel((TILE - 2, TILE - 2)) == SENTENCE_BACK  # words inside, the padding kept


def test_a_targets_parquet_of_sentences_runs_like_text(image_set, siglip):
    from deft_mine.tools import run

    source = write_texts(image_set / "texts.parquet", [TEXTS[0], "  ", TEXTS[1]], weak=[1, 2, 3])
    done = run(source, image_set / "pool.parquet", run_dir=image_set / "run", overrides=overrides(siglip),
               no_store=True)
    folder = Path(done.run_dir)
    assert json.loads((folder / "run.json").read_text())["inputs"]["targets"]["format"] == "text"
    assert (done.target_embed.input_rows, done.target_embed.rows, done.target_embed.skipped) == (3, 2, 1)
    assert [w.code for w in done.warnings if w.code == "texts_skipped"] == ["texts_skipped"]
    assert pq.read_table(folder / "target_embeddings.parquet").column_names == ["text", "embedding", "weak"]
    assert "2 sentences" in (folder / "Mining_Report.md").read_text()


@pytest.mark.parametrize("given, words", [({"text": TEXTS, "targets": "targets.parquet"}, "both"),
                                          ({}, "neither")])
def test_text_and_targets_are_exactly_one(image_set, siglip, given, words):
    from deft_mine.tools import run

    given = {k: str(image_set / v) if k == "targets" else v for k, v in given.items()}
    with pytest.raises(DeftError) as exc:
        run(source=image_set / "pool.parquet", run_dir=image_set / "run", overrides=overrides(siglip), **given)
    assert exc.value.code == "spec_invalid" and exc.value.details["field"] == "text"
    assert "targets" in exc.value.message and "text" in exc.value.message and words in exc.value.message
    assert not (image_set / "run").exists()


def test_an_empty_sentence_is_refused_naming_it(image_set, siglip):
    from deft_mine.tools import run

    with pytest.raises(DeftError) as exc:
        run(text=[TEXTS[0], "   "], source=image_set / "pool.parquet", run_dir=image_set / "run",
            overrides=overrides(siglip))
    assert exc.value.code == "spec_invalid" and "text[1]" in exc.value.message
    assert exc.value.details["blank"] == [1] and not (image_set / "run").exists()


def test_a_model_without_a_text_tower_is_refused_before_the_run_folder(image_set):
    from deft_mine.tools import run

    with pytest.raises(DeftError) as exc:
        run(text=TEXTS, source=image_set / "pool.parquet", run_dir=image_set / "run", overrides={"model": "thumbnail"})
    assert exc.value.code == "text_tower_missing" and exc.value.details["text_models"] == ["SigLIP", "CLIP"]
    assert not (image_set / "run").exists()


def test_the_docker_backend_asks_its_image_for_text_before_the_run_folder(image_set, siglip):
    """Text goes to the image's `embedding text_embeddings` (tests/test_docker_actions.py): an image
    that cannot be asked stops the run before its folder exists."""
    from deft_mine.backends import resolve
    from deft_mine.schemas.inputs import BackendOptions
    from deft_mine.tools import run

    capabilities = resolve(BackendOptions(backend="docker", image="deft-mine:none")).capabilities
    assert capabilities.runs_text_embeddings
    with pytest.raises(DeftError) as exc:
        run(text=TEXTS, source=image_set / "pool.parquet", run_dir=image_set / "run", overrides=overrides(siglip),
            backend="docker", image="deft-mine:none")
    assert exc.value.code in ("image_missing", "docker_unavailable") and not (image_set / "run").exists()


def test_the_ray_backend_embeds_text_in_a_task_not_in_this_process():
    """Ray runs the text tower in a task on the cluster (tests/test_ray_backend.py compares it with local)."""
    from deft_mine.backends.local import LocalBackend
    from deft_mine.backends.ray import RayBackend

    assert LocalBackend.capabilities.runs_text_embeddings and RayBackend.capabilities.runs_text_embeddings


@pytest.mark.e2e
def test_cli_run_with_text(image_set, siglip):
    """`deft-mine run --text … --text …` as a process (this checkout's source)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", "import sys; from deft_mine.cli import main; sys.exit(main())", "run", "--text", TEXTS[0], "--text", TEXTS[1],
                           "--source", str(image_set / "pool.parquet"), "--run-dir", str(image_set / "run"),
                           "--no-store", "model=SigLIP", f"model_path={siglip}", "topn=2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder == image_set / "run"
    assert pq.read_table(folder / "target_listing.parquet").column("text").to_pylist() == TEXTS
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"
    assert pq.read_table(folder / "mined.parquet").num_rows >= 2
