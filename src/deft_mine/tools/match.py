"""The match tool: `tmm unique_neighbor_matching` — a budget of unique pool files, one target each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from deft_mine.backends import Backend, resolve
from deft_mine.backends.base import match_unsupported
from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.report.match_pictures import draw_match_pictures
from deft_mine.schemas import artifacts
from deft_mine.schemas.inputs import MatchInput
from deft_mine.schemas.results import MatchPass, MatchResult, MatchShortfall
from deft_mine.schemas.specs import AllocationPolicy, UniqueMatchingSpec
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.tools._common import spec_with_paths
from deft_mine.tools.registry import Tool, ToolContext, register


def match_unique(inputs: MatchInput, ctx: ToolContext) -> MatchResult:
    """Select desired_unique_count unique pool images for the targets, each pool file claimed by
    one target (the TAO `tmm unique_neighbor_matching` contract): in passes, each target takes
    its share (ceil(budget / targets)) of the nearest free files, a target that cannot fill it
    releases them and is retried wider, and the budget keeps the nearest. allocation_policy
    global, or class_stratified (the budget split over rare_class_list and non_rare by the
    targets' classes: each row's `label`, or COCO/KITTI files via source_detection_file,
    target_detection_file and detection_format; a rare class filled from the non_rare pool
    when its own runs dry). Writes output_dir/final_unique_files.parquet, summary.json and one
    parquet per pass (visualize=true: a viz_class_<group>.png contact sheet per group).
    Spec keys: source_path, target_path (a parquet or a folder of them), output_dir,
    desired_unique_count, allocation_policy, distance_metric, rare_class_list, exclude_path, …
    Warning: unique_count_short."""
    spec = spec_with_paths(UniqueMatchingSpec, inputs.spec_path, inputs.overrides)
    return match_spec(spec, resolve(inputs.backend_options()), ctx)


def match_spec(spec: UniqueMatchingSpec, backend: Backend, ctx: ToolContext) -> MatchResult:
    """Match with an already-resolved spec and backend: refused before any work where the backend
    cannot run it or output_dir cannot be a folder."""
    ctx.check_paths(spec)
    if not backend.capabilities.runs_unique_matching:
        raise match_unsupported(backend.name, "its one-to-one passes need a backend that runs them (local, ray, "
                                "or docker with an image that has the action)")
    out = Path(spec.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise DeftError("output_not_writable", f"output_dir {out} is a file, not a folder",
                        fix="choose a folder for output_dir", field="output_dir", path=str(out))
    done = backend.match(spec, ctx.events)
    if spec.visualize:  # ours, from the files written (an image that drew its own wrote none of our columns)
        done.warnings += draw_match_pictures(spec, out, ctx.image_allowed)[1]
    return _result(spec, out, done.summary, backend.name, done.warnings, done.timings)


def _result(spec: UniqueMatchingSpec, out: Path, summary: dict[str, Any], backend: str, found: list[ToolWarning],
            timings: dict[str, float]) -> MatchResult:
    final = out / artifacts.UNIQUE_FINAL
    retrieved = int(summary.get("retrieved_unique_count", tables.num_rows(final)))
    desired = int(summary.get("desired_unique_count", spec.desired_unique_count))
    return MatchResult(
        output_dir=str(out), final_parquet=str(final), summary_path=str(out / artifacts.UNIQUE_SUMMARY),
        allocation_policy=spec.allocation_policy.value, desired_unique_count=desired,
        retrieved_unique_count=retrieved,
        coverage_pct=float(summary.get("coverage_pct", round(retrieved / desired * 100, 2))),
        per_class=_per_class(spec, final),
        passes=[MatchPass(number=p["pass"], **{k: v for k, v in p.items() if k != "pass"})
                for p in summary.get("passes", [])],
        shortfalls=[MatchShortfall(**s) for s in (summary.get("shortfall") or {}).get("groups", [])],
        backend=backend, timings=timings, warnings=found)


def _per_class(spec: UniqueMatchingSpec, final: Path) -> dict[str, int] | None:
    """class_stratified: the selected files per group, from final_unique_files' `class` column
    (None where the image wrote none)."""
    if spec.allocation_policy is not AllocationPolicy.class_stratified:
        return None
    if "class" not in tables.schema_of(final).names:
        return None
    counts = pc.value_counts(tables.read_columns(final, ["class"]).column("class")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: str(c["values"]))
            if c["values"] is not None}


match = register(Tool("match", "Match targets to a budget of unique pool images",
                      "select a budget of unique pool images, one target each (tmm unique_neighbor_matching)",
                      MatchInput, MatchResult, match_unique))
