"""Image encoders (SigLIP, CLIP via transformers; the weight-free thumbnail) and their identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity

THUMBNAIL_SIDE = 16
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5"}
# Which transformers model_type each `model` value accepts: a SigLIP spec pointed at a CLIP
# folder is exactly the silent "mined images look unrelated" failure, so it is refused.
HF_MODEL_TYPES = {"SigLIP": {"siglip", "siglip2"}, "CLIP": {"clip"}}


class Encoder(Protocol):
    identity: EncoderIdentity
    dim: int
    device: str

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        """CPU work on decoded images, safe to run in loader threads; results of several
        calls concatenate along axis 0 into one batch."""

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(n, dim) float32 embeddings of a preprocessed batch."""


class ThumbnailEncoder:
    """A fixed-size RGB thumbnail (box filter), standardised and L2-normalised: no weights."""

    device = "cpu"
    dim = THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3

    def __init__(self) -> None:
        self.identity = EncoderIdentity(
            model="thumbnail", preprocessing={"side": THUMBNAIL_SIDE, "resample": "box", "standardise": True})

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        pixels = [np.asarray(im.resize(side, Image.Resampling.BOX), dtype=np.float32) for im in images]
        return np.stack(pixels).reshape(len(images), -1) if pixels else np.zeros((0, self.dim), np.float32)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        centred = batch - batch.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        # A flat image has no texture to compare: it becomes the zero vector, not NaN.
        return (centred / np.maximum(norms, 1e-12)).astype(np.float32)


class HuggingFaceEncoder:
    """SigLIP or CLIP image tower through transformers' AutoModel / AutoImageProcessor."""

    def __init__(self, model: str, model_path: str, device: str = "auto") -> None:
        import torch  # here, not at module import: mining and the thumbnail never need torch
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        # Our own progress and errors speak for the load; transformers' bars and notices
        # (e.g. the slow-processor fallback) would only drown them.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        self._torch = torch
        local = Path(model_path).expanduser()
        is_local = local.exists()
        source = str(local.resolve()) if is_local else model_path
        try:
            self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=is_local)
            net = AutoModel.from_pretrained(source, local_files_only=is_local)
        except (OSError, ValueError) as exc:
            raise DeftError(
                "model_load_failed",
                f"model_path {model_path!r}: cannot load a {model} model ({exc})".strip(),
                fix="give a local folder saved with save_pretrained, or a hub id this machine can "
                "download (set HF_HOME to a pre-filled cache when offline)",
                field="model_path",
            ) from exc
        model_type = getattr(net.config, "model_type", "?")
        if model_type not in HF_MODEL_TYPES[model]:
            raise DeftError(
                "model_kind_mismatch",
                f"model={model} but model_path {model_path!r} holds a '{model_type}' checkpoint",
                fix=f"set model to match the checkpoint, or point model_path at a {model} checkpoint",
                field="model",
            )
        self.device = _pick_device(torch, device)
        self.net = net.to(self.device).eval()
        preprocessing = _json_safe(self.processor.to_dict())
        for volatile in ("processor_class", "_processor_class", "image_processor_type"):
            preprocessing.pop(volatile, None)
        self.identity = EncoderIdentity(model=model, model_path=source, preprocessing=preprocessing,
                                        weights_digest=weights_digest(local) if is_local else None)
        with torch.inference_mode():
            probe = self.preprocess([Image.new("RGB", (8, 8))])
            self.dim = int(self.encode(probe).shape[1])

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return self.processor(images=images, return_tensors="np")["pixel_values"]

    def encode(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            out = self.net.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output object (features in pooler_output), 4.x a tensor
            features = out if isinstance(out, torch.Tensor) else out.pooler_output
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)


def _pick_device(torch: Any, wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        return _check_gpu(torch, wanted)
    return wanted


def _check_gpu(torch: Any, wanted: str) -> str:
    """Refuse a GPU torch cannot see rather than let torch fail mid-batch (or fall back silently)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(wanted.partition(":")[2] or 0)
    if index >= count:
        seen = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s): " + ", ".join(f"cuda:{i}" for i in range(count))
        raise DeftError("no_gpu", f"device={wanted} but torch sees {seen}",
                        fix="use device=auto, cpu" + "".join(f" or cuda:{i}" for i in range(count)),
                        field="device", device=wanted, gpus=count)
    return wanted


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


_DIGESTS: dict[tuple, str] = {}


def weights_digest(folder: Path) -> str | None:
    """SHA-256 over the weight files of a local checkpoint (name and bytes), cached per mtime."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES) \
        if folder.is_dir() else [folder]
    if not files:
        return None
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(folder).as_posix().encode() if folder.is_dir() else b"")
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        _DIGESTS[key] = "sha256:" + digest.hexdigest()
    return _DIGESTS[key]


def build_encoder(model: str, model_path: str | None, device: str = "auto") -> Encoder:
    """The encoder a validated EmbeddingSpec names (the local backend's set)."""
    if model == "thumbnail":
        if device.startswith("cuda"):  # it computes on the CPU; a GPU asked for must still exist
            import torch

            _check_gpu(torch, device)
        return ThumbnailEncoder()
    if model not in HF_MODEL_TYPES or model_path is None:  # the embed tool refuses TAO kinds first
        raise ValueError(f"no local encoder for model={model}")
    return HuggingFaceEncoder(model, model_path, device)
