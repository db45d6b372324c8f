"""The embed tool: one parquet (or CSV) of image paths, or a parquet of sentences, in; one embedding parquet out."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from deft_mine.backends import Backend, resolve
from deft_mine.backends.base import BackendEmbed
from deft_mine.engine import changenet as cn
from deft_mine.engine.encoders import require_text_tower
from deft_mine.engine.listings import Listing, open_listing, open_text_listing, write_listing
from deft_mine.errors import DeftError
from deft_mine.schemas import warnings
from deft_mine.schemas.inputs import ChangeNetOptions, EmbedInput
from deft_mine.schemas.results import EmbedResult
from deft_mine.schemas.specs import EmbeddingSpec
from deft_mine.tools._common import distinct_output, existing_input, required_path, spec_with_paths
from deft_mine.tools.registry import Tool, ToolContext, register

def embed_images(inputs: EmbedInput, ctx: ToolContext) -> EmbedResult:
    """Embed the images a parquet/CSV lists into an embedding parquet (filepath, embedding,
    every input column carried; a ChangeNet CSV gives one row per row and light). The first embed of a session fixes its encoder; a
    different model/model_path/model_config_path later is refused (encoder_mismatch).
    Unreadable images are skipped and reported (images_skipped). A parquet with a `text` column and
    no `filepath` is embedded by the text tower of the same SigLIP/CLIP model (text, embedding, every
    input column; null or blank texts skipped and counted): vectors a mine takes as targets against
    that model's image embeddings. Streams progress."""
    spec = spec_with_paths(EmbeddingSpec, inputs.spec_path, inputs.overrides,
                           input_parquet=inputs.input_parquet, output_parquet=inputs.output_parquet)
    return embed_spec(spec, resolve(inputs.backend_options()), ctx.store_for(inputs.store, inputs.no_store), ctx,
                      changenet=inputs.changenet_options())


def embed_sentences(inputs: EmbedInput, ctx: ToolContext) -> EmbedResult:
    """The container's `embedding text_embeddings`: the input read as a text parquet, by its `text`
    column whatever else it holds (a `filepath` beside it is carried, not embedded)."""
    ctx.check_paths(inputs)
    spec = spec_with_paths(EmbeddingSpec, inputs.spec_path, inputs.overrides,
                           input_parquet=inputs.input_parquet, output_parquet=inputs.output_parquet)
    ctx.check_paths(spec)
    listing = open_text_listing(existing_input(spec, "input_parquet"), "input_parquet")
    return embed_spec(spec, resolve(inputs.backend_options()), ctx.store_for(inputs.store, inputs.no_store), ctx,
                      listing=listing)


def embed_spec(spec: EmbeddingSpec, backend: Backend, store: Path | None, ctx: ToolContext,
               listing: Listing | None = None, changenet: ChangeNetOptions | None = None) -> EmbedResult:
    """Embed with an already-resolved spec and backend (what `run` calls for each side, with the
    side's listing already read and checked against the roots), reusing and filling `store` (None: off).
    `changenet`: how a ChangeNet CSV resolves, when the listing is read here."""
    ctx.check_paths(spec)
    source = existing_input(spec, "input_parquet")
    output = distinct_output(required_path(spec, "output_parquet"), "output_parquet", source)
    image_root = spec.images_root(source)
    if spec.image_root and not image_root.is_dir():
        raise DeftError("file_not_found", f"image_root {image_root} is not a folder", field="image_root",
                        fix="name the folder the listing's relative filepaths resolve against", path=str(image_root))
    if listing is None:
        changenet = changenet or ChangeNetOptions()
        cn.check_images_dir(changenet, spec.image_root)
        listing = open_listing(source, "input_parquet", image_root, changenet, texts=True)
        if ctx.policy is not None and listing.format != "text":  # sentences name no files
            ctx.policy.check_listing(listing)
    if listing.format == "text":
        return _embed_text(spec, backend, store, ctx, listing, output)
    if spec.is_tao_checkpoint and not backend.capabilities.runs_tao_checkpoints:
        raise DeftError("backend_unsupported", f"model={spec.model} (a TAO checkpoint) runs only in the TAO "
                        f"container, not on the {backend.name} backend", field="model",
                        fix="use backend=docker for TAO checkpoints, or model=SigLIP|CLIP|DINOv2|hf|thumbnail locally")
    with ctx.lock.bind(spec) if ctx.lock is not None else contextlib.nullcontext() as key, \
            _readable_by(backend, listing, output) as given:
        done = _result(backend.embed(spec, given, output, ctx.events, store), output, backend.name, store)
        if ctx.lock is not None:
            ctx.lock.record(done.encoder, key)
    _count_unresolved(done, listing)
    done.warnings = [warnings.store_shard_corrupt(done.store, done.corrupt_shards)] if done.corrupt_shards else []
    if not listing.rows and not listing.unresolved:
        done.warnings.append(warnings.listing_empty(str(source)))
    if done.skipped_by_reason:
        done.warnings.append(warnings.images_skipped(str(source), done.input_rows, done.skipped_by_reason,
                                                     done.skipped_examples, str(listing.images_root)))
    return done


def _embed_text(spec: EmbeddingSpec, backend: Backend, store: Path | None, ctx: ToolContext, listing: Listing,
                output: Path) -> EmbedResult:
    """A text listing through the backend's text tower (local: this process; ray: a task; docker: the
    image's `embedding text_embeddings`); the session's encoder lock as for images (one model, one identity)."""
    require_text_embedding(spec, backend)
    with ctx.lock.bind(spec) if ctx.lock is not None else contextlib.nullcontext() as key:
        embedded = backend.embed_text(spec, listing, output, ctx.events, store)
        done = _result(embedded, output, backend.name, store)
        if ctx.lock is not None:
            ctx.lock.record(done.encoder, key)
    done.warnings = [warnings.store_shard_corrupt(done.store, done.corrupt_shards)] if done.corrupt_shards else []
    if not listing.rows:
        done.warnings.append(warnings.listing_empty(str(listing.path)))
    if done.skipped_by_reason:
        done.warnings.append(warnings.texts_skipped(str(listing.path), done.input_rows, done.skipped_by_reason,
                                                    done.skipped_examples))
    return done


def require_text_embedding(spec: EmbeddingSpec, backend: Backend) -> None:
    """Refuse, before any work (`run`: before its folder exists), sentences a backend cannot embed
    (by its declared capability; docker: an image whose schema lacks `embedding text_embeddings`)
    or a model with no text tower (text_tower_missing)."""
    if not backend.capabilities.runs_text_embeddings:
        raise DeftError("backend_unsupported", f"text embedding (sentences as targets) runs on the local and ray "
                        f"backends, not on {backend.name}", field="backend",
                        fix="use backend=local (the default) for text targets", backend=backend.name)
    require_text_tower(spec.model, spec.encoder_key()[1])
    backend.accepts_text()  # docker: the image's schema is asked for the action


@contextlib.contextmanager
def _readable_by(backend: Backend, listing: Listing, output: Path) -> Iterator[Listing]:
    """The listing as the backend can read it. The container reads a parquet only: a CSV listing (a
    ChangeNet one resolved row by row and light by light) is written beside the output as a hidden
    parquet for it, as `run` writes each side's listing into its folder, and removed afterwards."""
    if not backend.capabilities.reads_parquet_only or listing.format == "parquet":
        yield listing
        return
    path = output.with_name(f".{output.name}.listing.parquet")
    try:
        yield write_listing(listing, path)
    finally:
        path.unlink(missing_ok=True)


def _count_unresolved(done: EmbedResult, listing: Listing) -> None:
    """Rows the listing left out before embedding (skip_unresolved) are input rows skipped, like any."""
    if listing.unresolved:
        done.input_rows += listing.unresolved
        done.skipped += listing.unresolved
        done.skipped_by_reason = {**done.skipped_by_reason, "unresolved": listing.unresolved}
        done.skipped_examples = [*listing.unresolved_examples[:5], *done.skipped_examples]


def _result(done: BackendEmbed, output: Path, backend: str, store: Path | None) -> EmbedResult:
    """What an embedding step reports, from what the backend did."""
    stats = done.stats
    return EmbedResult(
        output_parquet=str(output), input_rows=stats.rows_in, rows=stats.rows_out,
        skipped=stats.rows_in - stats.rows_out, columns=stats.columns,
        skipped_by_reason=dict(stats.skipped_by_reason), skipped_examples=stats.skipped_examples,
        encoder=done.encoder, embedding_dim=done.dim, device=done.device, backend=backend,
        store=str(store) if store else None, reused=stats.reused, embedded=stats.embedded,
        seconds_saved=stats.seconds_saved, corrupt_shards=stats.corrupt_shards, timings=done.timings,
        cluster=done.cluster)


embed = register(Tool("embed", "Embed images", "embed the images of a parquet/CSV into an embedding parquet",
                      EmbedInput, EmbedResult, embed_images))
