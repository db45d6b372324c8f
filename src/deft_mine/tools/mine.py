"""The mine tool: two embedding parquets in, unique mined paths and mining_summary.txt out."""

from __future__ import annotations

from pathlib import Path

from deft_mine.schemas import artifacts
from deft_mine.backends import get_backend
from deft_mine.engine import store
from deft_mine.errors import DeftError
from deft_mine.events import Events, NullEvents
from deft_mine.schemas.results import EncoderIdentity, MineResult, ToolWarning
from deft_mine.schemas.specs import MiningSpec
from deft_mine.tools._common import Overrides, distinct_output, existing_input, required_path, spec_with_paths
from deft_mine.tools.guards import PathPolicy, check_paths



def mine(
    source_parquet: str | Path | None = None,
    target_parquet: str | Path | None = None,
    output_parquet: str | Path | None = None,
    spec_path: str | Path | None = None,
    overrides: Overrides = None,
    backend: str = "local",
    events: Events | None = None,
    policy: PathPolicy | None = None,
    image: str | None = None,
    mounts: list[str] | None = None,
) -> MineResult:
    """Mine the pool for each target's nearest images. `policy` limits the paths it may touch."""
    check_paths(policy, spec_path=spec_path)
    spec = spec_with_paths(MiningSpec, spec_path, overrides, source_parquet=source_parquet,
                           target_parquet=target_parquet, output_parquet=output_parquet)
    return mine_spec(spec, backend=backend, events=events, policy=policy, image=image, mounts=mounts)


def mine_spec(spec: MiningSpec, backend: str = "local", events: Events | None = None,
              policy: PathPolicy | None = None, pairs_path: Path | None = None,
              image: str | None = None, mounts: list[str] | None = None) -> MineResult:
    events = events or NullEvents()
    check_paths(policy, source_parquet=spec.source_parquet, target_parquet=spec.target_parquet,
                output_parquet=spec.output_parquet)
    source = existing_input(spec, "source_parquet")
    target = existing_input(spec, "target_parquet")
    output = distinct_output(required_path(spec, "output_parquet"), "output_parquet", source, target)
    summary_path = output.parent / artifacts.SUMMARY
    warnings: list[ToolWarning] = []
    identity = check_same_encoder(source, target, warnings)

    if spec.filter_by_label:  # say it before the work, not only in the result
        lacking = [side for side, path in (("source", source), ("target", target))
                   if "label" not in store.schema_of(path).names]
        if lacking:
            events.log("warning", f"filter_by_label=true will do nothing: the {' and '.join(lacking)} "
                                  "parquet has no 'label' column; mining unfiltered")
    done = get_backend(backend, image, mounts).mine(spec, source, target, output, summary_path, events,
                                                    pairs_path)

    if done.label_filter == "noop":
        sides = " and ".join(done.label_missing)
        warnings.append(ToolWarning(
            code="filter_by_label_noop",
            message=f"filter_by_label=true did nothing: the {sides} parquet has no 'label' column, "
                    "so mining ran unfiltered",
            fields=["filter_by_label", "label"],
            details={"sides_without_label": done.label_missing},
        ))
    queries, searched = done.summary.get("queries", 0), done.searched_rows
    if queries and spec.topn * queries > searched:
        warnings.append(ToolWarning(
            code="pool_exhausted",
            message=f"topn × targets = {spec.topn} × {queries} = {spec.topn * queries} is more than "
                    f"the {searched} pool rows searched"
                    + (f"; topn exceeds the pool, so each target got the whole pool" if spec.topn > searched else "")
                    + f"; {done.summary['mined']} unique images were mined",
            fields=["topn"],
            details={"topn": spec.topn, "queries": queries, "pool": searched},
        ))
    if done.target_in_pool:
        action = "were removed from the pool (exclude_targets=true)" if spec.exclude_targets else \
            "were searched like any other pool row; set exclude_targets=true to drop them"
        warnings.append(ToolWarning(
            code="target_in_pool",
            message=f"{done.target_in_pool} pool rows have a filepath that is also a target and {action}",
            fields=["filepath", "exclude_targets"],
            details={"count": done.target_in_pool, "excluded": spec.exclude_targets},
        ))
    return MineResult(
        output_parquet=str(output), summary_path=str(summary_path), mined=done.summary["mined"],
        summary=done.summary, knn_metric=spec.knn_metric.value, topn=spec.topn,
        filter_by_label=spec.filter_by_label, label_filter=done.label_filter, encoder=identity,
        backend=backend, timings=done.timings, warnings=warnings,
    )


def check_same_encoder(source: Path, target: Path, warnings: list[ToolWarning]) -> EncoderIdentity | None:
    """Refuse two embedding files made by different encoders; warn when that can't be known."""
    ids = {side: (None if store.is_csv(path) else store.read_identity(path))
           for side, path in (("source", source), ("target", target))}
    unknown = [side for side, ident in ids.items() if ident is None]
    if unknown:
        warnings.append(ToolWarning(
            code="provenance_unknown",
            message=f"the {' and '.join(unknown)} parquet records no encoder identity (written by "
                    "another tool, e.g. the TAO container): cannot check both sides used the same "
                    "encoder",
            fields=[f"{side}_parquet" for side in unknown],
            details={"sides": unknown},
        ))
        return None
    if ids["source"] != ids["target"]:
        differing = sorted(k for k in set(ids["source"]) | set(ids["target"])
                           if ids["source"].get(k) != ids["target"].get(k))
        raise DeftError(
            "encoder_mismatch",
            f"source_parquet {source} and target_parquet {target} were embedded with different "
            f"encoders (they differ in {', '.join(differing)}): source "
            f"{_short(ids['source'])} vs target {_short(ids['target'])}",
            fix="re-embed one side with the other's embedding spec, so both use the same encoder",
            source_encoder=ids["source"], target_encoder=ids["target"], differing=differing,
        )
    return EncoderIdentity(**ids["source"])


def _short(identity: dict) -> str:
    return f"{identity.get('model')}:{identity.get('model_path')}" + (
        f"@{str(identity.get('weights_digest'))[7:19]}" if identity.get("weights_digest") else "")
