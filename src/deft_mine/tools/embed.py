"""The embed tool: one parquet (or CSV) of image paths in, one embedding parquet out."""

from __future__ import annotations

import contextlib
from pathlib import Path

from deft_mine.backends import get_backend
from deft_mine.events import Events, NullEvents
from deft_mine.schemas.results import EmbedResult, EncoderIdentity, ToolWarning
from deft_mine.schemas.specs import EmbeddingSpec
from deft_mine.tools._common import Overrides, distinct_output, existing_input, required_path, spec_with_paths
from deft_mine.tools.guards import EncoderLock, PathPolicy, check_paths


def embed(
    input_parquet: str | Path | None = None,
    output_parquet: str | Path | None = None,
    spec_path: str | Path | None = None,
    overrides: Overrides = None,
    backend: str = "local",
    events: Events | None = None,
    policy: PathPolicy | None = None,
    lock: EncoderLock | None = None,
    image: str | None = None,
    mounts: list[str] | None = None,
) -> EmbedResult:
    """Embed the images a parquet/CSV lists. `policy` limits the paths it may touch; `lock`
    (one per MCP session) refuses an encoder other than the session's first."""
    check_paths(policy, spec_path=spec_path)
    spec = spec_with_paths(EmbeddingSpec, spec_path, overrides,
                           input_parquet=input_parquet, output_parquet=output_parquet)
    return embed_spec(spec, backend=backend, events=events, policy=policy, lock=lock, image=image,
                      mounts=mounts)


def embed_spec(spec: EmbeddingSpec, backend: str = "local", events: Events | None = None,
               policy: PathPolicy | None = None, lock: EncoderLock | None = None,
               image: str | None = None, mounts: list[str] | None = None) -> EmbedResult:
    """Embed with an already-resolved spec (what `run` calls for each side)."""
    events = events or NullEvents()
    check_paths(policy, input_parquet=spec.input_parquet, output_parquet=spec.output_parquet,
                image_root=spec.image_root)
    for mount in mounts or []:
        check_paths(policy, mounts=mount)
    source = existing_input(spec, "input_parquet")
    output = distinct_output(required_path(spec, "output_parquet"), "output_parquet", source)
    image_root = Path(spec.image_root).expanduser().absolute() if spec.image_root else source.parent
    with lock.bind(spec) if lock is not None else contextlib.nullcontext():
        done = get_backend(backend, image, mounts).embed(spec, source, output, image_root, events)
        encoder = EncoderIdentity(**done.identity)
        if lock is not None:
            lock.record(encoder)
    warnings = []
    if done.skipped_by_reason:
        skipped = sum(done.skipped_by_reason.values())
        by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(done.skipped_by_reason.items()))
        warnings.append(ToolWarning(
            code="images_skipped",
            message=f"{skipped} of {done.input_rows} rows of {source} were left out because their "
                    f"image could not be read ({by_reason}); e.g. {done.skipped_examples[0]}",
            fields=["filepath"],
            details={"count": skipped, "by_reason": done.skipped_by_reason,
                     "examples": done.skipped_examples, "image_root": str(image_root)},
        ))
    return EmbedResult(
        output_parquet=str(output), rows=done.rows, input_rows=done.input_rows, columns=done.columns,
        skipped=done.input_rows - done.rows, skipped_by_reason=done.skipped_by_reason,
        skipped_examples=done.skipped_examples, encoder=encoder,
        embedding_dim=done.dim, device=done.device, backend=backend, timings=done.timings,
        warnings=warnings,
    )
