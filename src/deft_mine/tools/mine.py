"""The mine tool: two embedding parquets in, unique mined paths and mining_summary.txt out."""

from __future__ import annotations

from pathlib import Path

from deft_mine import rules
from deft_mine.backends import Backend, resolve
from deft_mine.backends.base import MineOutputs
from deft_mine.engine import tables
from deft_mine.engine.listings import open_listing
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import MineInput
from deft_mine.schemas.results import EncoderIdentity, MineResult
from deft_mine.schemas.specs import MiningSpec, Side
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.tools import run_leaks
from deft_mine.tools._common import distinct_output, existing_input, required_path, spec_with_paths
from deft_mine.tools.registry import Tool, ToolContext, register


def mine_pool(inputs: MineInput, ctx: ToolContext) -> MineResult:
    """For each target take the topn nearest pool images (exact; cosine, euclidean or
    manhattan), optionally drop pairs beyond a floor (min_similarity for cosine, max_distance
    otherwise) and keep only label-agreeing pairs (label_mode post_filter, or per_label: each
    target searched among its own label's pool rows), de-duplicate, optionally collapse near
    duplicates (dedup_similarity / dedup_distance: a mined image within it of one kept before it
    is dropped, listed in near_duplicates.parquet), and write the unique mined filepaths plus
    mining_summary.txt. Refuses two parquets embedded with different
    encoders (encoder_mismatch). Warnings: filter_by_label_noop, provenance_unknown,
    pool_exhausted, target_in_pool, targets_without_neighbours, floor_removed_all,
    label_missing_in_pool."""
    spec = spec_with_paths(MiningSpec, inputs.spec_path, inputs.overrides, source_parquet=inputs.source_parquet,
                           target_parquet=inputs.target_parquet, output_parquet=inputs.output_parquet)
    return mine_spec(spec, resolve(inputs.backend_options()), ctx)


def mine_spec(spec: MiningSpec, backend: Backend, ctx: ToolContext, pairs_path: Path | None = None,
              loop_files: bool = False) -> MineResult:
    """Mine with an already-resolved spec and backend (what `run` calls; `loop_files`: a run
    folder's, which also gets the DEFT loop's floor-stage files when a floor is set)."""
    ctx.check_paths(spec)
    if spec.unique:  # mining it as nearest would answer another question than the one asked
        raise DeftError("spec_invalid", "mode=unique is a budgeted one-to-one matching, not `tmm nearest_neighbors`",
                        fix="use `deft-mine match` (tmm unique_neighbor_matching) on these parquets, or `deft-mine "
                            "run ... mode=unique`; for nearest mining leave mode out", field="mode")
    source = existing_input(spec, "source_parquet")
    target = existing_input(spec, "target_parquet")
    if ctx.policy is not None and not loop_files:  # run checked its listings at the door
        # the byte check (identical_images) opens the mined pool images: they must lie under the roots
        ctx.policy.check_listing(open_listing(source, "source_parquet", spec.pool_root(source)))
    output = distinct_output(required_path(spec, "output_parquet"), "output_parquet", source, target)
    outputs = MineOutputs(output, pairs_path if backend.capabilities.writes_pairs else None, loop_files)
    found: list[ToolWarning] = []
    identity = check_same_encoder(source, target, found)
    backend.accepts(spec)
    done = backend.mine(spec, source, target, outputs, ctx.events)
    found.extend(done.warnings)
    leaks = None
    if done.leaks is not None and done.leaks.reported:  # the guard in the search
        leaks, raised = run_leaks.leak_facts(done.leaks, spec, outputs.leaks)
        found.extend(raised)
    summary = done.summary
    found += [ruling.warning for ruling in rules.rule(rules.Facts(
        topn=spec.topn, queries=summary.queries or 0, pool=done.searched_rows, mined=summary.mined,
        filter_by_label=spec.filter_by_label, label_filter=summary.label_filter,
        sides_without_label=tuple(done.label_missing), target_in_pool=summary.target_in_pool,
        exclude_targets=spec.exclude_targets, distance_threshold=spec.distance_threshold,
        knn_metric=spec.knn_metric.value))]
    return MineResult(
        output_parquet=str(output), summary_path=str(outputs.summary), mined=summary.mined,
        summary=summary.as_dict(), knn_metric=spec.knn_metric.value, topn=spec.topn,
        filter_by_label=spec.filter_by_label, label_filter=summary.label_filter, label_mode=spec.label_mode,
        min_similarity=spec.min_similarity, max_distance=spec.max_distance, dedup_similarity=spec.dedup_similarity,
        dedup_distance=spec.dedup_distance,
        near_duplicates_parquet=None if spec.dedup is None and not summary.identical_images else
        str(outputs.near_duplicates), leaks=leaks, encoder=identity,
        backend=backend.name, timings=done.timings, cluster=done.cluster, warnings=found,
    )


def check_same_encoder(source: Path, target: Path, found: list[ToolWarning]) -> EncoderIdentity | None:
    """Refuse two embedding files made by different encoders; warn when that can't be known."""
    ids = {side: (None if tables.is_csv(path) else tables.read_identity(path))
           for side, path in ((Side.source, source), (Side.target, target))}
    src, tgt = ids[Side.source], ids[Side.target]
    if src is None or tgt is None:
        unknown = tuple(side for side, ident in ids.items() if ident is None)
        found += [r.warning for r in rules.rule(rules.Facts(sides_without_identity=unknown))]
        return None
    if src != tgt:
        differing = src.differing(tgt)
        raise DeftError(
            "encoder_mismatch",
            f"source_parquet {source} and target_parquet {target} were embedded with different "
            f"encoders (they differ in {', '.join(differing)}): source {src.short()} vs target {tgt.short()}",
            fix="re-embed one side with the other's embedding spec, so both use the same encoder",
            source_encoder=src.model_dump(), target_encoder=tgt.model_dump(), differing=differing,
        )
    return src


mine = register(Tool("mine", "Mine nearest images", "find each target's topn nearest pool images",
                     MineInput, MineResult, mine_pool))
