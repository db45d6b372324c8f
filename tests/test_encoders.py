"""Encoders on real tiny checkpoints saved with save_pretrained: forward passes, identity."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

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
