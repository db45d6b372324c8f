"""The run's leakage guard: protect listings checked at the door, protected images embedded, and either protected.parquet for the search to judge its candidates against or leaks.parquet of the whole pool, written before the search."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from deft_mine.backends import Backend
from deft_mine.engine import leaks, tables
from deft_mine.engine.leak_search import LeakOutcome, write_protected
from deft_mine.engine.images import file_sizes, resolve_image_path
from deft_mine.engine.listings import FILEPATH, Listing, open_listing
from deft_mine.engine.mining import pool_vectors
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts, warnings
from deft_mine.schemas.inputs import ChangeNetOptions, RunInput
from deft_mine.schemas.results import EmbedResult, LeakFacts
from deft_mine.schemas.specs import EmbeddingSpec, LeakScope, MiningSpec
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.tools.embed import embed_spec
from deft_mine.tools.guards import PathPolicy
from deft_mine.tools.registry import ToolContext

_EXAMPLES = 5


def asked(inputs: RunInput, mining: MiningSpec) -> bool:
    """Whether the guard was asked for (a protect listing, a leak threshold or a leak_scope), not just on by default."""
    return bool(inputs.protect) or mining.leak_threshold is not None or mining.leak_scope is not None


def applies(inputs: RunInput, mining: MiningSpec, backend: Backend, sentences: bool) -> bool:
    """Whether the guard runs: image targets, on a backend that can leave pool rows out of its search
    (mode=nearest: local, ray, and docker by mining on the host after the container's, as for the
    floor; mode=unique: deft-mine's matcher, local or ray). What was asked of it where it cannot run is
    refused, naming why."""
    ours = not mining.unique or backend.capabilities.guards_in_search  # mode=unique: deft-mine's matcher only
    if not asked(inputs, mining):
        return ours and backend.capabilities.leaves_rows_out and not sentences and mining.leaks_parquet is None
    field = "protect" if inputs.protect else "leak_similarity" if mining.leak_similarity is not None else \
        "leak_distance" if mining.leak_distance is not None else "leak_scope"
    if not ours:
        raise DeftError("backend_unsupported", f"{field}: with mode=unique the {backend.name} backend's matcher "
                        "cannot be told to leave the leak rows out", fix=f"use backend=local or backend=ray for a "
                        f"guarded mode=unique run, or leave {field} out", field=field, backend=backend.name)
    if not backend.capabilities.leaves_rows_out:
        raise DeftError("backend_unsupported", f"{field}: the {backend.name} backend's program searches the whole pool "
                        "and cannot be told to leave the leak rows out", fix=f"use backend=local or backend=ray "
                        f"for a guarded run, or leave {field} out", field=field, backend=backend.name)
    if sentences:
        raise DeftError("spec_invalid", f"{field}: the leakage guard compares images, and the targets are "
                        "sentences", fix=f"give the protected images with --protect and target images, or leave "
                        f"{field} out", field=field)
    if mining.leak_scope is LeakScope.mined and not backend.capabilities.guards_in_search:
        raise DeftError("backend_unsupported", f"leak_scope=mined: the {backend.name} backend's program searches "
                        "the whole pool, so its guard judges every pool row first", fix="leave leak_scope out (or "
                        "set leak_scope=pool) on this backend, or use backend=local or backend=ray",
                        field="leak_scope", backend=backend.name)
    return True


def open_protected(inputs: RunInput, embedding: EmbeddingSpec, changenet: ChangeNetOptions,
                   policy: PathPolicy | None) -> list[Listing]:
    """Each protect listing read at the door, its images checked against the server's roots before
    any is looked at; one that names no readable file at all is refused (a guard that guards
    nothing must not pass silently)."""
    listings = []
    for given in inputs.protect or ():
        path = tables.require_file(Path(given).expanduser().absolute(), "protect")
        listing = open_listing(path, "protect", embedding.images_root(path), changenet)
        if policy is not None:
            policy.check_listing(listing)
        resolved = [p for _, _, p in listing.resolved() if p is not None]
        if not (file_sizes(resolved) >= 0).any():
            raise DeftError("no_readable_images", f"protect: none of the {listing.rows} images {path} lists can be "
                            f"read (e.g. {resolved[0] if resolved else 'no filepath at all'}), so it would guard "
                            "nothing", fix="check the listing's paths and image_root (relative paths resolve "
                            "against it, else the listing's folder)", field="protect", path=str(path))
        listings.append(listing)
    return listings


def protected_listing(listings: list[Listing], path: Path) -> Path:
    """The protect listings as one filepath parquet (absolute paths; the path as written and the
    listing that named it beside), which the run embeds with its own encoder."""
    written, origin, absolute = [], [], []
    for listing in listings:
        for _, filepath, resolved in listing.resolved():
            if resolved is not None:
                written.append(filepath)
                origin.append(str(listing.path))
                absolute.append(str(resolved))
    tables.write_table_atomic(path, pa.table({FILEPATH: pa.array(absolute, pa.string()),
                                              "protected_filepath": pa.array(written, pa.string()),
                                              "protected_listing": pa.array(origin, pa.string())}))
    return path


def guard(inputs: RunInput, listings: list[Listing], folder: Path, mining: MiningSpec, embedding: EmbeddingSpec,
          backend: Backend, store: Path | None, ctx: ToolContext, targets: Listing, pool: Listing
          ) -> tuple[LeakFacts | None, list[ToolWarning], list[EmbedResult], MiningSpec]:
    """The protected images made ready, and the mining spec that guards them. leak_scope=mined (local,
    ray): protected.parquet, which the search judges its candidates against (the facts come with the
    mining). leak_scope=pool (or a backend whose search cannot judge): every pool row judged now and
    leaks.parquet written (when the guard was asked for, or found a leak), whose rows the search leaves out."""
    threshold = mining.leak_threshold
    embedded: list[EmbedResult] = []
    if listings:
        listed = protected_listing(listings, folder / artifacts.PROTECTED_LISTING)
        if threshold is not None:
            done = embed_spec(embedding.model_copy(update={
                "input_parquet": str(listed), "output_parquet": str(folder / artifacts.PROTECTED_EMBEDDINGS),
                "image_root": _common_folder(listings)}), backend, store, ctx.stage("embed protected"))
            if done.input_rows and not done.rows:
                raise DeftError("no_readable_images", f"protect: none of the {done.input_rows} protected images could "
                                "be embedded, so the similarity guard would guard nothing", field="protect",
                                fix="check the protect listings' images", skipped_by_reason=done.skipped_by_reason)
            embedded.append(done)
    protected = _protected(folder, mining, listings, threshold is not None, targets.images_root)
    if backend.capabilities.guards_in_search and mining.leak_scope is not LeakScope.pool and not (
            mining.unique and threshold is not None):  # unique: bytes as it claims; a threshold needs the scan
        write_protected(protected, folder / artifacts.PROTECTED)
        return None, [], embedded, mining.model_copy(update={"protected_parquet": str(folder / artifacts.PROTECTED)})
    pool_table = tables.read_columns(Path(str(mining.source_parquet)), [FILEPATH])
    found_pool = leaks.pool_of([str(p) for p in pool_table.column(FILEPATH).to_pylist()], pool.images_root,
                               protected.filepaths[:_count_targets(protected)])
    blocks = pool_vectors(Path(str(mining.source_parquet)), mining.source_embed_column_name, mining.block_rows) \
        if threshold is not None else ()
    found = leaks.find_leaks(found_pool, protected, mining.knn_metric, threshold, blocks)
    rows = len(found_pool.filepaths)
    outcome = LeakOutcome(found.table, rows, np.zeros(0) if found.nearest is None else found.nearest, rows,
                          len(protected.filepaths), [str(listing.path) for listing in listings], asked(inputs, mining))
    if not outcome.reported:
        return None, [], embedded, mining
    leaks_path = folder / artifacts.LEAKS
    tables.write_table_atomic(leaks_path, found.table)
    facts, raised = leak_facts(outcome, mining, leaks_path, LeakScope.pool)
    return facts, raised, embedded, mining.model_copy(update={"leaks_parquet": str(leaks_path)})


def leak_facts(outcome: LeakOutcome, mining: MiningSpec, path: Path,
               scope: LeakScope = LeakScope.mined) -> tuple[LeakFacts, list[ToolWarning]]:
    """What the guard judged and found (`scope` pool: every pool row, before the search; mined: the rows
    the search or the matcher met), as the result's facts, and its warning when it left a leak out."""
    table, threshold, mined = outcome.table, mining.leak_threshold, scope is LeakScope.mined
    counts = leaks.kind_counts(table)
    facts = LeakFacts(protected_listings=outcome.listings, protected_images=outcome.protected,
                      knn_metric=mining.knn_metric.value, threshold_key=None if threshold is None else
                      "leak_similarity" if mining.knn_metric.higher_is_nearer else "leak_distance",
                      threshold=threshold, leaks_excluded=table.num_rows, by_kind=counts, pool=outcome.judged,
                      leaks_parquet=str(path) if path.exists() else None, scope=scope.value,
                      pool_rows=outcome.pool if mined else None,
                      sample=len(outcome.sample_scores) if mined and threshold is not None else None,
                      nearest=None if threshold is None else leaks.histogram(outcome.sample_scores, mining.knn_metric,
                                                                             threshold))
    raised = [] if not table.num_rows else [warnings.leaks_excluded(
        counts, outcome.pool, table.column(FILEPATH).to_pylist()[:_EXAMPLES], judged=outcome.judged if mined else None)]
    return facts, raised


def _protected(folder: Path, mining: MiningSpec, listings: list[Listing], with_vectors: bool,
               target_root: Path) -> leaks.Protected:
    """The targets (as embedded: the readable ones), then the protect listings' images (as embedded
    with a threshold, else every one listed): paths, where they resolve, which listing, vectors."""
    target_path = Path(str(mining.target_parquet))
    columns = [FILEPATH] + ([mining.target_embed_column_name] if with_vectors else [])
    targets = tables.read_columns(target_path, columns)
    paths = [str(p) for p in targets.column(FILEPATH).to_pylist()]
    protected = leaks.Protected(paths, [resolve_image_path(p, target_root) for p in paths], [leaks.TARGETS] * len(paths))
    vectors = [_vectors(targets, mining.target_embed_column_name, target_path)] if with_vectors else []
    if listings:
        given = folder / (artifacts.PROTECTED_EMBEDDINGS if with_vectors else artifacts.PROTECTED_LISTING)
        table = tables.read_columns(given, [FILEPATH, "protected_filepath", "protected_listing"] +
                                    (["embedding"] if with_vectors else []))
        protected.filepaths += table.column("protected_filepath").to_pylist()
        protected.resolved += [Path(p) for p in table.column(FILEPATH).to_pylist()]
        protected.origins += table.column("protected_listing").to_pylist()
        if with_vectors:
            vectors.append(_vectors(table, "embedding", given))
    if with_vectors:
        protected.vectors = np.concatenate(vectors) if vectors else None
    return protected


def _common_folder(listings: list[Listing]) -> str:
    """The folder holding every protected image (their paths are absolute): what a container mounts
    to read them (docker's workspace spans the listing's folder and its image_root)."""
    folders = [str(p.parent) for listing in listings for _, _, p in listing.resolved() if p is not None]
    return os.path.commonpath(folders) if folders else str(listings[0].path.parent)


def _vectors(table: pa.Table, column: str, path: Path) -> np.ndarray:
    return tables.vectors_from_column(table.column(column), path=path, name=column, first_row=0, dim=None,
                                      field="protect")


def _count_targets(protected: leaks.Protected) -> int:
    return int(protected.is_target.sum())

