"""Encoders and their identity: SigLIP and CLIP (image and text towers), DINOv2, any HF vision model, the thumbnail."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from PIL import Image

from deft_mine.errors import DeftError
from deft_mine.schemas.results import EncoderIdentity
from deft_mine.schemas.specs import DEFAULT_POOLINGS, MODEL_POOLINGS

THUMBNAIL_SIDE = 16
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5"}
# Which transformers model_type each `model` value accepts: a SigLIP spec pointed at a CLIP folder is the
# silent "mined images look unrelated" failure, so it is refused. `hf` takes any vision model (None).
HF_MODEL_TYPES: dict[str, set[str] | None] = {
    "SigLIP": {"siglip", "siglip2"}, "CLIP": {"clip"},
    "DINOv2": {"dinov2", "dinov2_with_registers"}, "hf": None}
# The two-tower models use their projected image features; the others pool token outputs.
_FEATURE_MODELS = {"SigLIP", "CLIP"}


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
    """A transformers image model through AutoModel / AutoImageProcessor. SigLIP and CLIP give their
    projected image features (`get_image_features`); DINOv2 and `hf` give one token-level vector chosen
    by `pooling`: `cls` (first token of the last hidden state), `mean` (mean of the patch tokens: CLS,
    distillation and register tokens left out; a convolutional feature map is averaged over its
    positions) or `pooled` (the model's pooler output). The pooling is part of the identity, so two
    poolings never mix in a store or a mine."""

    def __init__(self, model: str, model_path: str, device: str = "auto", pooling: str | None = None) -> None:
        import torch  # here, not at module import: mining and the thumbnail never need torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # Our own progress and errors speak for the load; transformers' bars and notices
        # (e.g. the slow-processor fallback, the load report) would only drown them.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        self._torch = torch
        local = Path(model_path).expanduser()
        is_local = local.exists()
        source = str(local.resolve()) if is_local else model_path
        try:
            self.processor = load_image_processor(model_path)
            # Weights the checkpoint lacks are initialised at random: seeded, so that two loads of
            # one checkpoint always give the same vectors (the store trusts the identity).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                # float32 whatever the checkpoint's dtype: pixels go in as float32, and half
                # precision on a CPU is slow or unsupported.
                net, info = AutoModel.from_pretrained(source, local_files_only=is_local, dtype=torch.float32,
                                                      output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise _load_failed(model_path, f"cannot load a {model} model ({exc})",
                               "give a local folder saved with save_pretrained, or a hub id this machine can "
                               "download (set HF_HOME to a pre-filled cache when offline)") from exc
        model_type = getattr(net.config, "model_type", "?")
        accepted = HF_MODEL_TYPES[model]
        if accepted is not None and model_type not in accepted:
            raise _kind_mismatch(model, model_path, f"'{model_type}' checkpoint",
                                 "set model to match the checkpoint (model=hf takes any vision model), or point "
                                 f"model_path at a {model} checkpoint")
        if model not in _FEATURE_MODELS and hasattr(net, "get_image_features"):
            # A two-tower model's forward needs text too; its image side is what SigLIP/CLIP run.
            named = next((m for m in _FEATURE_MODELS if model_type in (HF_MODEL_TYPES[m] or ())), None)
            raise _kind_mismatch(model, model_path, f"'{model_type}' image-text model",
                                 f"use model={named} for this checkpoint" if named else
                                 "point model_path at a vision-only model (ViT, DINOv2, ConvNeXt, Swin, ResNet …)")
        if model in _FEATURE_MODELS and pooling is not None:
            raise DeftError("pooling_unsupported", f"pooling={pooling} does not fit model={model}: it has a fixed "
                            "output (its projected image features)", fix="leave pooling out, or use model=DINOv2/hf",
                            field="pooling", model=model, pooling=pooling, choices=[])
        self.device = _pick_device(torch, device)
        self.net = net.to(self.device).eval()
        # JSON-safe: tuples as lists, whatever else JSON cannot hold as text
        preprocessing = json.loads(json.dumps(self.processor.to_dict(),
                                              default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
        for volatile in ("processor_class", "_processor_class", "image_processor_type"):
            preprocessing.pop(volatile, None)
        self.pooling: str | None = None
        if model not in _FEATURE_MODELS:
            # Missing pooler weights mean a pooler initialised at random: never an embedding.
            untrained_pooler = any(k.split(".")[0] == "pooler" or ".pooler." in k
                                   for k in info.get("missing_keys", ()))
            self._prefix = _prefix_tokens(net)
            self.pooling = self._choose_pooling(model, model_path, pooling, untrained_pooler)
            preprocessing["pooling"] = self.pooling
        self.identity = EncoderIdentity(model=model, model_path=source, preprocessing=preprocessing,
                                        weights_digest=weights_digest(local) if is_local else None)
        probe = self.preprocess([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (200, 40, 90))])
        first = self.encode(probe)
        # (a tolerance, not equality: GPU kernels may sum in another order from pass to pass)
        if model not in _FEATURE_MODELS and not np.allclose(first, self.encode(probe), rtol=0, atol=1e-4):
            # e.g. a masked-autoencoder that masks at random: its vectors cannot be stored or compared
            raise _load_failed(model_path, f"the '{model_type}' model gives different vectors for the same "
                               "image on each pass (random masking or sampling at inference)",
                               "use an encoder whose forward pass is deterministic (ViT, DINOv2, ConvNeXt, Swin …)")
        self.dim = int(first.shape[1])

    def _choose_pooling(self, model: str, model_path: str, wanted: str | None, untrained_pooler: bool) -> str:
        """The pooling asked for, if this model's outputs allow it; else the model's default."""
        torch = self._torch
        try:
            with torch.inference_mode():
                out = self.net(pixel_values=torch.from_numpy(np.ascontiguousarray(
                    self.preprocess([Image.new("RGB", (8, 8))]), dtype=np.float32)).to(self.device))
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a forward that also needs text
            raise _load_failed(model_path, f"the model loads but cannot embed an image on its own ({exc})",
                               "point model_path at a vision backbone whose forward takes pixel_values alone "
                               "(ViT, DINOv2, ConvNeXt, Swin, ResNet …)") from exc
        hidden = getattr(out, "last_hidden_state", None)
        pooled = getattr(out, "pooler_output", None)
        fits = {
            "pooled": (pooled is not None and not untrained_pooler,
                       "the checkpoint has no pooler weights" if untrained_pooler and pooled is not None
                       else "the model has no pooler output"),
            "cls": (hidden is not None and hidden.ndim == 3 and self._prefix > 0,
                    "its last hidden state has no CLS token"),
            "mean": (hidden is not None and hidden.ndim in (3, 4), "it gives no last hidden state to average"),
        }
        allowed = MODEL_POOLINGS[model]  # DINOv2's pooler output is its CLS token: one name for it
        fits = {name: fit for name, fit in fits.items() if name in allowed}
        choices = [name for name, (ok, _) in fits.items() if ok]
        if not choices:
            raise _load_failed(model_path, "the model gives neither a pooler output nor a last hidden state",
                               "point model_path at a vision backbone (ViT, DINOv2, ConvNeXt, Swin, ResNet …)")
        if wanted is None:
            # A trained pooler, where there is one, is what the model was built to be summarised by.
            return DEFAULT_POOLINGS.get(model, choices[0])
        ok, why = fits.get(wanted, (False, f"model={model} takes {' or '.join(allowed)}"))
        if not ok:
            raise DeftError("pooling_unsupported", f"pooling={wanted} does not fit model_path {model_path!r}: {why}",
                            fix=f"use pooling={' or pooling='.join(choices)} (or leave pooling out for {choices[0]})",
                            field="pooling", model=model, pooling=wanted, choices=choices)
        return wanted

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return self.processor(images=images, return_tensors="np")["pixel_values"]

    def encode(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.pooling is None:
                out = self.net.get_image_features(pixel_values=pixels)
                # transformers 5 returns an output object (features in pooler_output), 4.x a tensor
                features = out if isinstance(out, torch.Tensor) else out.pooler_output
            else:
                features = self._pool(self.net(pixel_values=pixels))
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def _pool(self, out: Any) -> Any:
        if self.pooling == "pooled":
            return out.pooler_output.flatten(1)  # ResNet-like poolers keep (n, c, 1, 1)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if hidden.ndim == 4:  # a convolutional feature map (n, c, h, w): average its positions
            return hidden.mean(dim=(2, 3))
        return hidden[:, self._prefix:].mean(dim=1)


def _load_failed(model_path: str, why: str, fix: str) -> DeftError:
    return DeftError("model_load_failed", f"model_path {model_path!r}: {why}", fix=fix, field="model_path")


def _kind_mismatch(model: str, model_path: str, holds: str, fix: str) -> DeftError:
    return DeftError("model_kind_mismatch", f"model={model} but model_path {model_path!r} holds a {holds}",
                     fix=fix, field="model")


def _prefix_tokens(net: Any) -> int:
    """How many tokens precede the patch tokens (CLS, a distillation token, registers): the transformers
    ViT family keeps them as parameters of `embeddings`; a model without them (Swin, ConvNeXt) has none."""
    embeddings = getattr(net, "embeddings", None)
    count = sum(1 for name in ("cls_token", "distillation_token") if getattr(embeddings, name, None) is not None)
    registers = getattr(embeddings, "register_tokens", None)
    return count + (int(registers.shape[1]) if registers is not None else 0)


def _pick_device(torch: Any, wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return _check_gpu(torch, wanted) if wanted.startswith("cuda") else wanted


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


def load_image_processor(model_path: str) -> Any:
    """The checkpoint's AutoImageProcessor: a local folder (offline), else a hub id."""
    from transformers import AutoImageProcessor

    local = Path(model_path).expanduser()
    is_local = local.exists()
    return AutoImageProcessor.from_pretrained(str(local.resolve()) if is_local else model_path,
                                              local_files_only=is_local)


def build_preprocessor(model: str, model_path: str | None) -> Callable[[list[Image.Image]], np.ndarray]:
    """An encoder's CPU half without its weights (what a Ray read task runs): the very
    preprocessing the encoder itself applies, so stored vectors keep their identity."""
    if model == "thumbnail":
        return ThumbnailEncoder().preprocess
    processor = load_image_processor(str(model_path))
    return lambda images: processor(images=images, return_tensors="np")["pixel_values"]


def build_encoder(model: str, model_path: str | None, device: str = "auto", pooling: str | None = None) -> Encoder:
    """The encoder a validated EmbeddingSpec names (the local backend's set); `pooling` is the
    spec's (DINOv2 and hf only; None is the model's default)."""
    if model == "thumbnail":
        if device.startswith("cuda"):  # it computes on the CPU; a GPU asked for must still exist
            import torch

            _check_gpu(torch, device)
        return ThumbnailEncoder()
    if model not in HF_MODEL_TYPES or model_path is None:  # the embed tool refuses TAO kinds first
        raise ValueError(f"no local encoder for model={model}")
    return HuggingFaceEncoder(model, model_path, device, pooling)


# The models with a text tower beside the image one (their text vectors land in the image space).
TEXT_MODELS = ("SigLIP", "CLIP")
CLIP_TEXT_LENGTH = 77  # CLIP's text context, as the TAO container fixes it
FALLBACK_TEXT_LENGTH = 64  # a SigLIP checkpoint that states no length anywhere (the container's)


class TextEncoder:
    """The text tower of a SigLIP or CLIP encoder: texts tokenised as the TAO container tokenises them
    (padded to and truncated at one fixed length), `get_text_features`, L2-normalised like the image
    side. Its identity is the image encoder's (same weights, same vector space); the tokenizer
    settings, which the identity leaves out, are in `settings`."""

    def __init__(self, images: HuggingFaceEncoder, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.identity, self.device, self.net, self._torch = images.identity, images.device, images.net, images._torch
        source = images.identity.model_path or model_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=Path(source).exists())
        except (OSError, ValueError, TypeError) as exc:
            raise _load_failed(model_path, f"has no tokenizer for the {images.identity.model} text tower ({exc})",
                               "save the checkpoint's tokenizer into the folder (tokenizer.save_pretrained), "
                               "or give the hub id it came from") from exc
        self.max_length = text_max_length(self.tokenizer, self.net, images.identity.model)
        self.settings = {"tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length,
                         "padding": "max_length", "truncation": True, "normalised": True}
        self.dim = int(self.encode(["a"]).shape[1])

    @property
    def store_identity(self) -> EncoderIdentity:
        """The store's shelf for this tower's vectors: the identity with the tokenizer settings, so a
        text's vector is never looked up among images, nor under other settings."""
        return self.identity.model_copy(update={"preprocessing": {**self.identity.preprocessing,
                                                                  "text": self.settings}})

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors of `texts` (non-empty strings)."""
        torch = self._torch
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        tokens = self.tokenizer(text=texts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.net.get_text_features(**tokens)
            # transformers 5 returns an output object (features in pooler_output), 4.x a tensor
            features = out if isinstance(out, torch.Tensor) else out.pooler_output
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def _bounded(value: Any) -> int | None:
    """A usable length: transformers marks "no limit" with a huge sentinel, or leaves it unset."""
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 1_000_000 else None


def text_max_length(tokenizer: Any, net: Any, model: str) -> int:
    """The fixed token length texts are padded and cut to, found as the container finds it: CLIP 77;
    else the tokenizer's model_max_length, the text config's position limit, then 64."""
    if model == "CLIP":
        return CLIP_TEXT_LENGTH
    config = getattr(net, "config", None)
    candidates = [getattr(tokenizer, "model_max_length", None),
                  (getattr(tokenizer, "init_kwargs", None) or {}).get("model_max_length")]
    for cfg in (getattr(config, "text_config", None), config):
        candidates += [getattr(cfg, name, None) for name in ("max_position_embeddings", "max_sequence_length",
                                                               "seq_length")] if cfg is not None else []
    return next((n for n in map(_bounded, candidates) if n is not None), FALLBACK_TEXT_LENGTH)


def build_text_encoder(model: str, model_path: str | None, device: str = "auto") -> TextEncoder:
    """The text tower of the encoder a spec names; a model without one is refused (text_tower_missing)."""
    require_text_tower(model, model_path)
    assert model_path is not None  # refused just above
    return TextEncoder(HuggingFaceEncoder(model, model_path, device), model_path)


def require_text_tower(model: str, model_path: str | None) -> None:
    """Refuse, before any weights are read, a model with no text tower (text_tower_missing)."""
    if model not in TEXT_MODELS or model_path is None:
        raise DeftError("text_tower_missing", f"model={model} has no text tower: it embeds images only, so a "
                        "sentence cannot be put in its vector space",
                        fix=f"embed texts (and the images they are mined against) with model="
                            f"{' or model='.join(TEXT_MODELS)}", field="model", model=model,
                        text_models=list(TEXT_MODELS))
