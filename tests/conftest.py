"""Shared fixtures: real images on disk, real parquet files, tiny real HF checkpoints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deft_mine.engine import tables

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hubs are unreachable here; fail fast, not slow


@pytest.fixture(autouse=True, scope="session")
def _session_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One embedding store for the session (servers and CLIs spawned by tests inherit it), never
    the user's cache; tests about the store itself pass their own."""
    os.environ["DEFT_MINE_STORE"] = str(tmp_path_factory.mktemp("store"))


@pytest.fixture(autouse=True)
def _golden(request: pytest.FixtureRequest, tmp_path: Path):
    """With DEFT_MINE_GOLDEN=DIR, each test's outputs are recorded there (tests/golden.py)."""
    yield
    golden = os.environ.get("DEFT_MINE_GOLDEN")
    if golden:
        from golden import record

        record(tmp_path, Path(golden) / re.sub(r"[^\w.-]+", "_", request.node.nodeid))


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_embeddings(path: Path, vectors: np.ndarray, labels: list | None = None,
                     filepaths: list[str] | None = None, identity: dict | None = None,
                     column: str = "embedding", extra: dict | None = None) -> Path:
    """An embedding parquet as our embed step (or the TAO container, identity=None) writes it."""
    n = len(vectors)
    columns: dict[str, pa.Array] = {
        "filepath": pa.array(filepaths if filepaths is not None else [f"img_{path.stem}_{i}.png" for i in range(n)]),
        column: tables.vector_array(np.asarray(vectors, dtype=np.float32)),
    }
    if labels is not None:
        columns["label"] = pa.array(labels)
    for key, values in (extra or {}).items():
        columns[key] = pa.array(values)
    table = pa.table(columns)
    if identity is not None:
        import json

        table = table.replace_schema_metadata({tables.IDENTITY_KEY: json.dumps(identity, sort_keys=True)})
    pq.write_table(table, path)
    return path


THUMB_ID = {"model": "thumbnail", "model_path": None, "model_config_path": None,
            "weights_digest": None, "preprocessing": {"side": 16}}


@pytest.fixture
def image_set(tmp_path: Path) -> Path:
    """Six small PNGs and a targets/pool parquet pair listing them by relative path."""
    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(2)],
                             "label": ["a", "b"], "siamese_score": [0.1, 0.2]}), tmp_path / "targets.parquet")
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(2, 6)],
                             "label": ["a", "b", "a", "b"]}), tmp_path / "pool.parquet")
    return tmp_path


def _tiny_vision(**extra: int) -> dict:
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, **extra)


def _tiny_text() -> dict:
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_siglip")
    SiglipModel(SiglipConfig(text_config=_tiny_text(), vision_config=_tiny_vision())).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(CLIPConfig(text_config=_tiny_text(), vision_config=_tiny_vision(),
                         projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer DINOv2 (hidden 32, 28 px / patch 14: four patch tokens) with its processor."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer ViT with a (trained-as-saved) pooler, for `model=hf`."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny_vit")
    ViTModel(ViTConfig(**_tiny_vision(encoder_stride=8)), add_pooling_layer=True).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_convnext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-stage ConvNeXt (a feature map, a pooler, no CLS token), for `model=hf`."""
    import torch
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel

    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("tiny_convnext")
    ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                 patch_size=4)).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder
