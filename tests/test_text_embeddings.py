"""Text embeddings (`embedding text_embeddings`): the text tower of tiny random SigLIP / CLIP
checkpoints saved to disk with a tiny tokenizer, loaded offline; vectors against a direct
`get_text_features` pass; the identity shared with the image side; skips, refusals, mining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deft_mine.engine import tables
from deft_mine.engine.embedding import TEXT_SETTINGS_KEY
from deft_mine.engine.encoders import build_encoder, build_text_encoder
from deft_mine.errors import DeftError

WORDS = "solder bridge between two pins scratch missing component on a the pad".split()
SENTENCES = ["solder bridge between two pins", "a scratch on the pad", "missing component"]


def _with_tokenizer(source: Path, folder: Path) -> Path:
    """A copy of a tiny two-tower checkpoint with a tiny word-level tokenizer saved beside it (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(source, folder)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_text(tiny_siglip, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_siglip, tmp_path_factory.mktemp("siglip_text") / "model")


@pytest.fixture(scope="module")
def clip_text(tiny_clip, tmp_path_factory) -> Path:
    return _with_tokenizer(tiny_clip, tmp_path_factory.mktemp("clip_text") / "model")


MODELS = [("SigLIP", "siglip_text", 64), ("CLIP", "clip_text", 77)]


def reference(folder: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The text tower's forward pass alone, tokenised as the container tokenises, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    net = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True)(
        text=texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = net.get_text_features(**tokens)
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def identity_fp(folder: Path, model: str) -> str:
    return build_encoder(model, str(folder)).identity.fingerprint


def write_texts(path: Path, texts: list, **extra: list) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), **extra}), path)
    return path


def vectors(path: Path) -> np.ndarray:
    return np.array(pq.read_table(path).column("embedding").to_pylist(), np.float32)


@pytest.mark.parametrize("model, fixture, length", MODELS)
def test_text_identity_is_the_image_identity(request, model, fixture, length):
    folder = request.getfixturevalue(fixture)
    text, image = build_text_encoder(model, str(folder)), build_encoder(model, str(folder))
    assert text.identity == image.identity and text.identity.fingerprint == image.identity.fingerprint
    assert text.dim == image.dim
    assert text.settings == {"tokenizer": text.settings["tokenizer"], "max_length": length,
                             "padding": "max_length", "truncation": True, "normalised": True}
    assert "text" not in text.identity.preprocessing  # the settings ride beside the identity, not in it
    assert text.store_identity.fingerprint != text.identity.fingerprint


@pytest.mark.parametrize("model, fixture, length", MODELS)
def test_embed_a_text_parquet_matches_the_text_tower(request, tmp_path, model, fixture, length):
    from deft_mine.tools import embed

    folder = request.getfixturevalue(fixture)
    source = write_texts(tmp_path / "texts.parquet", SENTENCES, label=["bridge", "scratch", "missing"])
    done = embed(source, tmp_path / "out.parquet", overrides={"model": model, "model_path": str(folder),
                                                              "batch_size": 2}, no_store=True)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["text", "embedding", "label"] == done.columns
    assert table.column("text").to_pylist() == SENTENCES and table.column("label").to_pylist()[0] == "bridge"
    np.testing.assert_allclose(vectors(tmp_path / "out.parquet"), reference(folder, SENTENCES, length),
                               rtol=1e-5, atol=1e-5)
    identity = json.loads(table.schema.metadata[tables.IDENTITY_KEY])
    assert identity == build_encoder(model, str(folder)).identity.model_dump(mode="json")
    assert json.loads(table.schema.metadata[TEXT_SETTINGS_KEY])["max_length"] == length
    assert (done.rows, done.input_rows, done.skipped) == (3, 3, 0) and done.encoder.fingerprint == identity_fp(folder, model)


def test_null_and_blank_texts_are_skipped_and_counted(tmp_path, siglip_text):
    from deft_mine.tools import embed

    texts = ["solder bridge", None, "", "   ", "missing component"]
    source = write_texts(tmp_path / "texts.parquet", texts, row=list(range(5)))
    done = embed(source, tmp_path / "out.parquet", overrides={"model": "SigLIP", "model_path": str(siglip_text),
                                                              "batch_size": 2}, no_store=True)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("row").to_pylist() == [0, 4]  # carried columns stay with their rows
    assert (done.input_rows, done.rows, done.skipped) == (5, 2, 3)
    assert done.skipped_by_reason == {"null text": 1, "empty text": 2}
    assert done.skipped_examples[0] == "row 1: null text"
    [warning] = [w for w in done.warnings if w.code == "texts_skipped"]
    assert warning.details["count"] == 3 and "3 of 5 rows" in warning.message
    np.testing.assert_allclose(vectors(tmp_path / "out.parquet"),
                               reference(siglip_text, ["solder bridge", "missing component"], 64), atol=1e-5)


def test_the_store_keys_texts_by_their_sha256(tmp_path, siglip_text):
    from deft_mine.tools import embed

    source = write_texts(tmp_path / "texts.parquet", SENTENCES)
    overrides = {"model": "SigLIP", "model_path": str(siglip_text)}
    first = embed(source, tmp_path / "a.parquet", overrides=overrides, store=str(tmp_path / "store"))
    again = embed(source, tmp_path / "b.parquet", overrides=overrides, store=str(tmp_path / "store"))
    assert (first.embedded, first.reused, again.embedded, again.reused) == (3, 0, 0, 3)
    np.testing.assert_array_equal(vectors(tmp_path / "a.parquet"), vectors(tmp_path / "b.parquet"))
    images = build_encoder("SigLIP", str(siglip_text)).identity.fingerprint
    assert not (tmp_path / "store" / images).exists()  # a shelf of its own: never mixed with image digests


@pytest.mark.parametrize("model", ["thumbnail", "DINOv2", "hf"])
def test_models_without_a_text_tower_are_refused(tmp_path, tiny_dinov2, model):
    from deft_mine.tools import embed

    source = write_texts(tmp_path / "texts.parquet", SENTENCES)
    overrides = {"model": model} | ({} if model == "thumbnail" else {"model_path": str(tiny_dinov2)})
    with pytest.raises(DeftError) as exc:
        embed(source, tmp_path / "out.parquet", overrides=overrides, no_store=True)
    assert exc.value.code == "text_tower_missing" and model in exc.value.message
    assert exc.value.details["text_models"] == ["SigLIP", "CLIP"] and "SigLIP" in exc.value.fix
    assert not (tmp_path / "out.parquet").exists()


def test_a_parquet_with_neither_filepath_nor_text_is_refused(tmp_path):
    from deft_mine.tools import embed

    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "in.parquet", tmp_path / "out.parquet", overrides={"model": "thumbnail"}, no_store=True)
    assert exc.value.code == "column_missing" and exc.value.details["missing"] == ["filepath", "text"]
    assert "'filepath'" in exc.value.message and "'text'" in exc.value.message


def test_a_text_column_of_numbers_is_refused(tmp_path, siglip_text):
    from deft_mine.tools import embed

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "in.parquet")
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "in.parquet", tmp_path / "out.parquet",
              overrides={"model": "SigLIP", "model_path": str(siglip_text)}, no_store=True)
    assert exc.value.code == "column_invalid" and exc.value.details["column"] == "text"


def test_a_filepath_parquet_with_text_still_embeds_its_images(image_set):
    """The image path is untouched: with `filepath` present, embed embeds the images (text carried)."""
    from deft_mine.tools import embed

    table = pq.read_table(image_set / "pool.parquet").append_column("text", pa.array(["a", "b", "c", "d"]))
    pq.write_table(table, image_set / "both.parquet")
    done = embed(image_set / "both.parquet", image_set / "out.parquet", overrides={"model": "thumbnail"},
                 no_store=True)
    assert done.columns == ["filepath", "label", "text", "embedding"] and done.rows == 4


@pytest.mark.parametrize("model, fixture, length", MODELS)
def test_mine_takes_a_text_parquet_as_targets_against_an_image_pool(request, image_set, model, fixture, length):
    from deft_mine.tools import embed, mine

    folder = request.getfixturevalue(fixture)
    overrides = {"model": model, "model_path": str(folder)}
    embed(image_set / "pool.parquet", image_set / "pool_emb.parquet", overrides=overrides, no_store=True)
    write_texts(image_set / "texts.parquet", SENTENCES[:2], label=["a", "b"])
    embed(image_set / "texts.parquet", image_set / "text_emb.parquet", overrides=overrides, no_store=True)
    done = mine(image_set / "pool_emb.parquet", image_set / "text_emb.parquet", image_set / "mined.parquet",
                overrides={"topn": 2})
    assert not [w for w in done.warnings if w.code == "provenance_unknown"]
    pool, texts = vectors(image_set / "pool_emb.parquet"), vectors(image_set / "text_emb.parquet")
    paths = pq.read_table(image_set / "pool_emb.parquet").column("filepath").to_pylist()
    order = np.argsort(-(texts @ pool.T), axis=1, kind="stable")[:, :2]  # brute force: cosine of unit vectors
    expected = list(dict.fromkeys(paths[j] for row in order for j in row))
    assert pq.read_table(image_set / "mined.parquet").column("filepath").to_pylist() == expected


def test_mine_refuses_a_text_parquet_from_another_model(image_set, siglip_text, tmp_path):
    from deft_mine.tools import embed, mine

    other = tmp_path / "other"
    shutil.copytree(siglip_text, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same architecture and dimension, other weights
    weights.write_bytes(bytes(data))
    embed(image_set / "pool.parquet", image_set / "pool_emb.parquet",
          overrides={"model": "SigLIP", "model_path": str(siglip_text)}, no_store=True)
    write_texts(image_set / "texts.parquet", SENTENCES[:2])
    embed(image_set / "texts.parquet", image_set / "text_emb.parquet",
          overrides={"model": "SigLIP", "model_path": str(other)}, no_store=True)
    with pytest.raises(DeftError) as exc:
        mine(image_set / "pool_emb.parquet", image_set / "text_emb.parquet", image_set / "mined.parquet")
    assert exc.value.code == "encoder_mismatch"
    assert {"model_path", "weights_digest"} <= set(exc.value.details["differing"])
    assert not (image_set / "mined.parquet").exists()


def test_task_text_embeddings_prints_the_container_status(tmp_path, siglip_text, capsys):
    from deft_mine.task import main

    source = write_texts(tmp_path / "texts.parquet", SENTENCES, filepath=["x.png", "y.png", "z.png"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"input_parquet: ???\noutput_parquet: ???\nmodel: SigLIP\nmodel_path: {siglip_text}\n"
                    "batch_size: 64\n")
    out = tmp_path / "out.parquet"
    assert main(["embedding", "text_embeddings", "-e", str(spec), f"input_parquet={source}",
                 f"output_parquet={out}"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Execution status: PASS")
    # read by its text column, even beside a filepath column (carried)
    assert pq.read_table(out).column_names == ["text", "embedding", "filepath"]
    assert main(["embedding", "text_embeddings", "-e", str(spec), f"input_parquet={source}",
                 f"output_parquet={out}", "model=thumbnail"]) == 2
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("Execution status: FAIL") and "text_tower_missing" in captured.err
