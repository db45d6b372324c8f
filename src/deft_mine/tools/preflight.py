"""The preflight tool: can this backend run here, which encoder is this session bound to, and
which warnings will the given inputs raise, all before any work."""

from __future__ import annotations

import platform
from pathlib import Path

import pyarrow as pa

from deft_mine import __version__, rules
from deft_mine.backends import resolve
from deft_mine.engine import tables
from deft_mine.engine.listings import Listing, open_listing
from deft_mine.engine.mining import label_keys, label_text, lexically_normal
from deft_mine.report.provenance import package_versions
from deft_mine.schemas import warnings
from deft_mine.schemas.inputs import PreflightInput, StoreInfoInput
from deft_mine.schemas.results import Check, PreflightResult
from deft_mine.schemas.specs import MiningSpec, Side, load_spec, split_overrides
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.tools.registry import Tool, ToolContext, register
from deft_mine.tools.store import describe_store

_IMAGE_SAMPLE = 500  # rows per side whose image files are checked for existence
_NODE_SAMPLE = 8  # rows per side whose images every node of a cluster must read


def check_before_mining(inputs: PreflightInput, ctx: ToolContext) -> PreflightResult:
    """Check that the backend can run here (torch, GPU), show the encoder this session is
    bound to, and predict the warnings the given inputs will raise (filter_by_label_noop,
    pool_exhausted, target_in_pool, images_skipped, provenance_unknown, label_missing_in_pool,
    listing_empty) before any work; a ChangeNet CSV is resolved (and refused) as run would.
    Reads only; refuses paths outside the allowed roots."""
    backend = resolve(inputs.backend_options())
    store = describe_store(StoreInfoInput(store=inputs.store), ctx)
    output_dir = Path(inputs.output_dir).expanduser().absolute() if inputs.output_dir else Path.cwd()
    checks, gpu = backend.check(output_dir, Path(store.store))
    _, mine_over = split_overrides(inputs.overrides or ())
    mining = load_spec(MiningSpec, inputs.mining_spec_path, mine_over)  # refused before the files are read
    sides = _listings(inputs)  # each given listing opened once (a CSV is parsed once, a ChangeNet CSV resolved)
    check_nodes = getattr(backend, "check_nodes", None)  # a backend whose work runs elsewhere checks from there
    if check_nodes is not None:
        checks += check_nodes(sample_images(sides), output_dir)
    roomy = store.free_bytes >= 5 * 2**30
    checks.append(Check.of("store", "ok" if roomy else "warn", store.summary(),
                           None if roomy else "free disk space, or prune the store (deft-mine store prune)"))
    versions = {"deft-mine": __version__, "python": platform.python_version(),
                **package_versions(("torch", "transformers", "faiss-cpu", "pyarrow", "pillow"))}
    return PreflightResult(ok=all(c.ok for c in checks), backend=backend.name, checks=checks,
                           versions=versions, gpu=gpu,
                           session_encoder=ctx.lock.identity if ctx.lock is not None else None,
                           warnings=predict_warnings(mining, sides))


def _listings(inputs: PreflightInput) -> dict[str, Listing]:
    changenet = inputs.changenet_options()
    return {name: open_listing(tables.require_file(Path(p).expanduser().absolute(), name), name, None, changenet)
            for name, p in (("targets", inputs.targets), ("source", inputs.source)) if p is not None}


def label_precheck(sides: dict[str, Listing], filter_by_label: bool | None) -> list[ToolWarning]:
    """The loop's pre-mine yield precheck on the two listings, before any embedding (run and
    preflight): target labels no pool row carries, in every label mode (rules decides)."""
    if set(sides) != {"targets", "source"} or any("label" not in s.schema.names for s in sides.values()):
        return []
    labels = {name: _labels(listing) for name, listing in sides.items()}
    missing = rules.labels_missing_in_pool(label_keys(labels["targets"]).to_pylist(),
                                           label_text(labels["targets"]).to_pylist(),
                                           label_keys(labels["source"]).to_pylist())
    ruling = rules.label_missing_in_pool(rules.Facts(labels_missing_in_pool=missing, filter_by_label=filter_by_label))
    return [] if ruling is None else [ruling.warning]


def _labels(listing: Listing) -> pa.Array:
    """A listing's `label` column, whole (labels are small beside images)."""
    column = pa.Table.from_batches(list(listing.batches(65536, ["label"])),
                                   pa.schema([listing.schema.field("label")])).column("label")
    return column.combine_chunks() if column.num_chunks else pa.array([], listing.schema.field("label").type)


def sample_images(sides: dict[str, Listing], per_side: int = _NODE_SAMPLE) -> list[Path]:
    """The first images each given listing names (resolved as embed resolves them)."""
    return [path for listing in sides.values() for _, filepath, path in listing.resolved(per_side) if filepath]


def predict_warnings(mining: MiningSpec, sides: dict[str, Listing]) -> list[ToolWarning]:
    """The warnings a run with this spec on these listings will raise that the files already show."""
    found: list[ToolWarning] = []
    filepaths = {name: list(listing.filepaths()) for name, listing in sides.items()}
    if len(sides) == 2:
        # the same comparison mining makes
        target_paths = {lexically_normal(str(p)) for p in filepaths["targets"] if p is not None}
        in_pool = sum(p is not None and lexically_normal(str(p)) in target_paths for p in filepaths["source"])
        found += [ruling.warning for ruling in rules.rule(rules.Facts(
            topn=mining.topn, queries=sides["targets"].rows,
            # the rows mining will search: exclude_targets takes the targets out of the pool first
            pool=sides["source"].rows - (in_pool if mining.exclude_targets else 0),
            filter_by_label=mining.filter_by_label,
            sides_without_label=tuple(side.input for side in Side if "label" not in sides[side.input].schema.names),
            target_in_pool=in_pool, distance_threshold=mining.distance_threshold,
            knn_metric=mining.knn_metric.value, predicted=True))]
        found += label_precheck(sides, mining.filter_by_label)
    found += [warnings.listing_empty(str(listing.path), name) for name, listing in sides.items()
              if not listing.rows and not listing.unresolved]
    found += [warnings.images_skipped(str(listing.path), listing.rows + listing.unresolved,
                                      {"unresolved": listing.unresolved}, list(listing.unresolved_examples[:5]),
                                      str(listing.images_root)).for_side(name)
              for name, listing in sides.items() if listing.unresolved]
    for name, listing in sides.items():
        sample = list(listing.resolved(_IMAGE_SAMPLE))
        missing_images = [filepath for _, filepath, path in sample if path is None or not path.is_file()]
        if missing_images:
            found.append(warnings.images_missing(name, missing_images, len(sample), str(listing.images_root)))
    for name, listing in sides.items():
        embedded = listing.format != "csv" and "embedding" in listing.schema.names
        if embedded and tables.read_identity(listing.path) is None:
            found += [r.warning for r in rules.rule(rules.Facts(sides_without_identity=(name,), predicted=True))]
    return found


preflight = register(Tool("preflight", "Check before mining",
                          "check this machine for a backend; predict input warnings",
                          PreflightInput, PreflightResult, check_before_mining, read_only=True))
