"""Encoders on real tiny checkpoints saved with save_pretrained: forward passes, identity."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deft_mine.engine import tables
from deft_mine.engine.encoders import ThumbnailEncoder, build_encoder, weights_digest
from deft_mine.errors import DeftError


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30 + i, 45, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("model, fixture, dim", [("SigLIP", "tiny_siglip", 32), ("CLIP", "tiny_clip", 16)])
def test_hf_encoders_run_real_forward_passes(request, model, fixture, dim):
    folder = request.getfixturevalue(fixture)
    encoder = build_encoder(model, str(folder), "auto")
    batch = encoder.preprocess(images(5))
    vectors = encoder.encode(batch)
    assert vectors.shape == (5, dim) and vectors.dtype == np.float32 and encoder.dim == dim
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # different images, different vectors
    again = build_encoder(model, str(folder), "cpu").encode(encoder.preprocess(images(5)))
    np.testing.assert_allclose(again, vectors, rtol=1e-5, atol=1e-6)  # deterministic
    assert encoder.device == "cpu"  # no GPU here; "auto" must fall back


def test_identity_names_model_folder_weights_and_preprocessing(tiny_siglip):
    identity = build_encoder("SigLIP", str(tiny_siglip)).identity
    assert identity.model == "SigLIP"
    assert identity.model_path == str(tiny_siglip.resolve())
    assert identity.weights_digest.startswith("sha256:")
    assert identity.preprocessing["size"] == {"height": 32, "width": 32}
    assert list(identity.preprocessing["image_mean"]) == [0.5, 0.5, 0.5]


def test_weights_digest_changes_with_the_weights(tmp_path, tiny_siglip):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_siglip, copy)
    assert weights_digest(copy) == weights_digest(tiny_siglip)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_digest(copy) != weights_digest(tiny_siglip)


def test_a_clip_folder_under_model_siglip_is_refused(tiny_clip):
    with pytest.raises(DeftError) as exc:
        build_encoder("SigLIP", str(tiny_clip))
    assert exc.value.code == "model_kind_mismatch" and "'clip'" in exc.value.message


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(DeftError) as exc:
        build_encoder("SigLIP", "no-such-org/no-such-model-xyz")
    assert exc.value.code == "model_load_failed" and "no-such-org/no-such-model-xyz" in exc.value.message


def test_tao_checkpoints_are_not_run_locally(tmp_path):
    """The local backend declares it runs no TAO checkpoint: embed refuses before any work."""
    from deft_mine.tools import embed

    pq.write_table(pa.table({"filepath": ["a.png"]}), tmp_path / "in.parquet")
    with pytest.raises(DeftError) as exc:
        embed(tmp_path / "in.parquet", tmp_path / "out.parquet", overrides={
            "model": "changenet", "model_path": "/w/model.pth", "model_config_path": "/w/spec.yaml"})
    assert exc.value.code == "backend_unsupported" and "docker" in exc.value.fix
    assert not (tmp_path / "out.parquet").exists()


def test_thumbnail_is_deterministic_standardised_and_needs_no_torch():
    encoder = ThumbnailEncoder()
    ims = images(3)
    vectors = encoder.encode(encoder.preprocess(ims))
    assert vectors.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(vectors, encoder.encode(encoder.preprocess(ims)))
    # brightness/contrast changes do not move a standardised thumbnail
    brighter = [Image.fromarray(np.clip(np.asarray(im, np.float32) * 0.5 + 20, 0, 255).astype(np.uint8)) for im in ims]
    np.testing.assert_allclose(encoder.encode(encoder.preprocess(brighter)), vectors, atol=0.02)
    flat = encoder.encode(encoder.preprocess([Image.new("RGB", (20, 20), (90, 90, 90))]))
    assert np.all(flat == 0)  # a flat image is the zero vector, never NaN


# ---------------------------------------------------------------- DINOv2 and any HF vision model

@pytest.mark.parametrize("model, fixture, pooling, dim, resolved", [
    ("DINOv2", "tiny_dinov2", None, 32, "cls"),
    ("DINOv2", "tiny_dinov2", "mean", 32, "mean"),
    ("hf", "tiny_vit", None, 32, "pooled"),  # a trained pooler: the model's own summary
    ("hf", "tiny_vit", "cls", 32, "cls"),
    ("hf", "tiny_vit", "mean", 32, "mean"),
    ("hf", "tiny_convnext", None, 16, "pooled"),
    ("hf", "tiny_convnext", "mean", 16, "mean"),  # a feature map averaged over its positions
])
def test_token_encoders_run_real_forward_passes(request, model, fixture, pooling, dim, resolved):
    folder = request.getfixturevalue(fixture)
    encoder = build_encoder(model, str(folder), "cpu", pooling)
    vectors = encoder.encode(encoder.preprocess(images(4)))
    assert vectors.shape == (4, dim) and vectors.dtype == np.float32 and encoder.dim == dim
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    again = build_encoder(model, str(folder), "cpu", pooling)
    np.testing.assert_array_equal(again.encode(again.preprocess(images(4))), vectors)
    identity = encoder.identity
    assert identity == again.identity and identity.preprocessing["pooling"] == resolved
    assert identity.model == model and identity.model_path == str(folder.resolve())
    assert identity.weights_digest == weights_digest(folder)


def test_dinov2_mean_is_the_mean_of_the_patch_tokens_not_the_cls(tiny_dinov2):
    import torch

    cls, mean = (build_encoder("DINOv2", str(tiny_dinov2), "cpu", p) for p in ("cls", "mean"))
    batch = cls.preprocess(images(2))
    with torch.inference_mode():
        hidden = cls.net(pixel_values=torch.from_numpy(batch)).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 1:].mean(dim=1), dim=-1).numpy()
    np.testing.assert_allclose(mean.encode(batch), expected, atol=1e-6)
    np.testing.assert_allclose(cls.encode(batch), torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy(),
                               atol=1e-6)
    assert cls.identity != mean.identity and cls.identity.fingerprint != mean.identity.fingerprint


def test_a_pooling_the_checkpoint_cannot_give_is_refused_with_the_choices(tiny_convnext, tmp_path):
    with pytest.raises(DeftError) as exc:
        build_encoder("hf", str(tiny_convnext), "cpu", "cls")
    assert exc.value.code == "pooling_unsupported" and "no CLS token" in exc.value.message
    assert exc.value.details["choices"] == ["pooled", "mean"] and "pooling=mean" in exc.value.fix

    # A ViT saved without its pooler would get one initialised at random: never an embedding.
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "vit_no_pooler"
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    assert build_encoder("hf", str(folder), "cpu").identity.preprocessing["pooling"] == "cls"
    with pytest.raises(DeftError) as exc:
        build_encoder("hf", str(folder), "cpu", "pooled")
    assert exc.value.code == "pooling_unsupported" and "no pooler weights" in exc.value.message


def test_wrong_checkpoint_kinds_are_refused(tiny_vit, tiny_siglip, tiny_dinov2):
    with pytest.raises(DeftError) as exc:
        build_encoder("DINOv2", str(tiny_vit))
    assert exc.value.code == "model_kind_mismatch" and "'vit'" in exc.value.message
    with pytest.raises(DeftError) as exc:  # a two-tower model needs text in its forward
        build_encoder("hf", str(tiny_siglip))
    assert exc.value.code == "model_kind_mismatch" and exc.value.fix == "use model=SigLIP for this checkpoint"
    with pytest.raises(DeftError) as exc:
        build_encoder("SigLIP", str(tiny_dinov2))
    assert exc.value.code == "model_kind_mismatch"


def test_unreachable_hf_hub_id_is_model_load_failed():
    with pytest.raises(DeftError) as exc:
        build_encoder("hf", "no-such-org/no-such-vision-model-xyz")
    assert exc.value.code == "model_load_failed" and "HF_HOME" in exc.value.fix


def test_spec_defaults_and_refusals_for_the_new_models():
    from deft_mine.schemas.specs import EmbeddingSpec, load_spec

    assert load_spec(EmbeddingSpec, None, ["model=dinov2"]).model_path == "facebook/dinov2-base"
    assert load_spec(EmbeddingSpec, None, ["model=DINOv2", "model_path=/m/dino", "pooling=Mean"]).pooling == "mean"
    assert load_spec(EmbeddingSpec, None, []).pooling is None  # the default changes nothing
    with pytest.raises(DeftError) as exc:
        load_spec(EmbeddingSpec, None, ["model=hf"])
    assert (exc.value.code, exc.value.details["field"]) == ("spec_missing_value", "model_path")
    for bad in (["model=SigLIP", "pooling=mean"], ["model=thumbnail", "pooling=cls"],
                ["model=DINOv2", "pooling=pooled"], ["model=DINOv2", "pooling=max"]):
        with pytest.raises(DeftError) as exc:
            load_spec(EmbeddingSpec, None, bad)
        assert exc.value.code == "pooling_unsupported" and exc.value.details["field"] == "pooling", bad
        assert exc.value.fix


# ---------------------------------------------------------------- through the tools, on real PNGs

def _vectors(path) -> np.ndarray:
    return np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("fixture, overrides, dim", [
    ("tiny_dinov2", {"model": "DINOv2"}, 32),
    ("tiny_dinov2", {"model": "DINOv2", "pooling": "mean"}, 32),
    ("tiny_vit", {"model": "hf"}, 32),
    ("tiny_convnext", {"model": "hf", "pooling": "mean"}, 16),
])
def test_embed_tool_with_the_new_models(request, image_set, fixture, overrides, dim):
    from deft_mine.tools import embed

    over = {**overrides, "model_path": str(request.getfixturevalue(fixture)), "batch_size": 3}
    first = embed(image_set / "pool.parquet", image_set / "a.parquet", overrides=over, no_store=True)
    second = embed(image_set / "pool.parquet", image_set / "b.parquet", overrides=over, no_store=True)
    vectors = _vectors(image_set / "a.parquet")
    assert vectors.shape == (4, dim) and first.embedding_dim == dim and first.rows == 4
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(_vectors(image_set / "b.parquet"), vectors)  # deterministic
    assert first.encoder == second.encoder and first.encoder.model == overrides["model"]
    assert first.encoder.preprocessing["pooling"] == overrides.get("pooling", "cls" if fixture == "tiny_dinov2"
                                                                   else "pooled")
    assert tables.read_identity(image_set / "a.parquet") == first.encoder


def test_cls_and_mean_are_different_encoders_and_never_mined_together(image_set, tiny_dinov2):
    from deft_mine.tools import embed, mine

    base = {"model": "DINOv2", "model_path": str(tiny_dinov2)}
    cls = embed(image_set / "targets.parquet", image_set / "t_cls.parquet", overrides=base, no_store=True)
    mean = embed(image_set / "targets.parquet", image_set / "t_mean.parquet",
                 overrides={**base, "pooling": "mean"}, no_store=True)
    assert cls.encoder != mean.encoder and cls.encoder.fingerprint != mean.encoder.fingerprint
    assert not np.allclose(_vectors(image_set / "t_cls.parquet"), _vectors(image_set / "t_mean.parquet"))
    embed(image_set / "pool.parquet", image_set / "s_mean.parquet", overrides={**base, "pooling": "mean"},
          no_store=True)
    with pytest.raises(DeftError) as exc:
        mine(image_set / "s_mean.parquet", image_set / "t_cls.parquet", image_set / "mined.parquet")
    assert exc.value.code == "encoder_mismatch" and exc.value.details["differing"] == ["preprocessing"]
    assert not (image_set / "mined.parquet").exists()
    done = mine(image_set / "s_mean.parquet", image_set / "t_mean.parquet", image_set / "mined.parquet")
    assert done.mined > 0


def test_siglip_and_dinov2_parquets_are_refused_when_mining(image_set, tiny_siglip, tiny_dinov2):
    from deft_mine.tools import embed, mine

    embed(image_set / "targets.parquet", image_set / "t.parquet",
          overrides={"model": "SigLIP", "model_path": str(tiny_siglip)}, no_store=True)
    embed(image_set / "pool.parquet", image_set / "s.parquet",
          overrides={"model": "DINOv2", "model_path": str(tiny_dinov2)}, no_store=True)
    assert _vectors(image_set / "t.parquet").shape[1] == _vectors(image_set / "s.parquet").shape[1] == 32
    with pytest.raises(DeftError) as exc:  # same dimension: only the identity tells them apart
        mine(image_set / "s.parquet", image_set / "t.parquet", image_set / "mined.parquet")
    assert exc.value.code == "encoder_mismatch"
    assert {"model", "model_path", "preprocessing"} <= set(exc.value.details["differing"])
    assert exc.value.details["source_encoder"]["model"] == "DINOv2"
    assert exc.value.details["target_encoder"]["model"] == "SigLIP"


def test_two_hf_models_are_different_encoders(image_set, tiny_vit, tiny_convnext):
    from deft_mine.tools import embed

    vit = embed(image_set / "pool.parquet", image_set / "v.parquet",
                overrides={"model": "hf", "model_path": str(tiny_vit), "pooling": "mean"}, no_store=True)
    cnx = embed(image_set / "pool.parquet", image_set / "c.parquet",
                overrides={"model": "hf", "model_path": str(tiny_convnext), "pooling": "mean"}, no_store=True)
    assert vit.encoder.fingerprint != cnx.encoder.fingerprint
    assert {"model_path", "weights_digest"} <= set(vit.encoder.differing(cnx.encoder))


def test_a_wrong_pooling_is_refused_by_the_embed_tool_before_any_output(image_set, tiny_convnext, tiny_dinov2):
    from deft_mine.tools import embed

    out = image_set / "e.parquet"
    for overrides in ({"model": "hf", "model_path": str(tiny_convnext), "pooling": "cls"},
                      {"model": "DINOv2", "model_path": str(tiny_dinov2), "pooling": "pooled"},
                      {"model": "SigLIP", "pooling": "mean"}):
        with pytest.raises(DeftError) as exc:
            embed(image_set / "pool.parquet", out, overrides=overrides, no_store=True)
        assert exc.value.code == "pooling_unsupported" and exc.value.fix, overrides
        assert not out.exists()


def test_the_store_reuses_dinov2_vectors(image_set, tiny_dinov2, tmp_path):
    from deft_mine.tools import embed

    store = tmp_path / "store"
    over = {"model": "DINOv2", "model_path": str(tiny_dinov2), "pooling": "mean"}
    first = embed(image_set / "pool.parquet", image_set / "e1.parquet", overrides=over, store=store)
    second = embed(image_set / "pool.parquet", image_set / "e2.parquet", overrides=over, store=store)
    assert (first.reused, first.embedded) == (0, 4) and (second.reused, second.embedded) == (4, 0)
    np.testing.assert_array_equal(_vectors(image_set / "e2.parquet"), _vectors(image_set / "e1.parquet"))
    # the other pooling is another encoder: nothing of the mean vectors is reused for it
    cls = embed(image_set / "pool.parquet", image_set / "e3.parquet", overrides={**over, "pooling": "cls"},
                store=store)
    assert (cls.reused, cls.embedded) == (0, 4)


def test_hf_loads_offline_from_a_local_folder(image_set, tiny_vit, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest sets it) and a folder: no network is ever asked."""
    import os

    from deft_mine.tools import embed

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    result = embed(image_set / "targets.parquet", image_set / "o.parquet",
                   overrides={"model": "hf", "model_path": str(tiny_vit)}, no_store=True)
    assert result.rows == 2 and result.encoder.weights_digest.startswith("sha256:")
