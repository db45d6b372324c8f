"""What tools return: errors, encoder identity and one result model per tool, each with its text."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deft_mine.errors import DeftError
from deft_mine.schemas.artifacts import MiningSummary
from deft_mine.schemas.inputs import LedgerFormat
from deft_mine.schemas.warnings import ToolWarning


class ErrorInfo(BaseModel):
    """A refused request, as data: `code`, `message`, `fix` and the details (the fields, paths,
    rows involved) beside them. The MCP `_meta`, `--json` and deft-mine-task all carry this."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    fix: str | None = None

    @classmethod
    def of(cls, exc: DeftError) -> "ErrorInfo":
        details = json.loads(json.dumps(exc.details, default=str))
        return cls(code=exc.code, message=exc.message, **({"fix": exc.fix} if exc.fix else {}), **details)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"fix"} if self.fix is None else set())

    def text(self) -> str:
        return f"{self.code}: {self.message}" + (f"\nfix: {self.fix}" if self.fix else "")


class EncoderIdentity(BaseModel):
    """What makes two embeddings comparable; batch_size is deliberately not part of it."""

    model: str
    model_path: str | None = None
    model_config_path: str | None = None
    weights_digest: str | None = None
    preprocessing: dict[str, Any] = Field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """The part a spec fixes before any weights are read (`EmbeddingSpec.encoder_key`)."""
        return (self.model, self.model_path, self.model_config_path)

    def differing(self, other: "EncoderIdentity") -> list[str]:
        mine, theirs = self.model_dump(), other.model_dump()
        return sorted(k for k in mine if mine[k] != theirs[k])

    def short(self) -> str:
        return f"{self.model}:{self.model_path}" + (
            f"@{self.weights_digest[7:19]}" if self.weights_digest else "")


class _Result(BaseModel):
    warnings: list[ToolWarning] = Field(default_factory=list)

    def text(self) -> str:
        """What a person reads about this result (warnings apart): the CLI, the MCP text
        content and deft-mine-task all print this."""
        raise NotImplementedError


class ClusterFacts(BaseModel):
    """Where one step ran on a Ray cluster (the ray backend's steps only)."""

    address: str = Field(description="the cluster's address as given (host:port, ray://…, auto, or local)")
    ray_version: str
    nodes: int = Field(description="alive nodes in the cluster")
    cpus: float = Field(description="CPUs in the cluster")
    gpus: float = Field(description="GPUs in the cluster")
    workers: int = Field(description="encoder actors (embedding) or shard tasks (mining) the step ran")
    nodes_used: int = Field(description="nodes those workers ran on")
    gpus_used: float = Field(0.0, description="GPUs the workers held")


class EmbedResult(_Result):
    output_parquet: str
    rows: int = Field(description="rows written (input rows less skipped images)")
    input_rows: int
    columns: list[str]
    skipped: int = Field(description="rows left out because their image could not be read")
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)
    skipped_examples: list[str] = Field(default_factory=list)
    encoder: EncoderIdentity
    embedding_dim: int
    device: str
    backend: str = "local"
    store: str | None = Field(None, description="the embedding store used (None: off)")
    reused: int = Field(0, description="rows whose vector came from the store (same encoder, same bytes)")
    embedded: int = Field(0, description="rows the encoder ran on")
    seconds_saved: float = Field(0.0, description="what embedding the reused rows cost when they were embedded")
    corrupt_shards: list[str] = Field(default_factory=list, description="store shards set aside (checksum)")
    timings: dict[str, float] = Field(default_factory=dict)
    cluster: ClusterFacts | None = Field(None, description="where it ran (backend ray)")

    def text(self) -> str:
        return (f"embedded {self.rows} of {self.input_rows} rows ({self.skipped} skipped) with "
                f"{self.encoder.model} on {self.device} → {self.output_parquet}\n"
                + (f"store {self.store}: {self.reused} reused, {self.embedded} embedded, "
                   f"{self.seconds_saved:.1f}s saved\n" if self.store else "")
                + f"columns: {', '.join(self.columns)}")


class LeakFacts(BaseModel):
    """The leakage guard of a run: what it protected and which pool rows it left out (leaks.parquet)."""

    protected_listings: list[str] = Field(default_factory=list, description="the protect listings (the targets "
                                                                               "are protected besides)")
    protected_images: int = Field(0, description="protected images compared: the targets and the listings' "
                                                 "readable images")
    knn_metric: str = "cosine"
    threshold_key: str | None = Field(None, description="leak_similarity or leak_distance (None: bytes only)")
    threshold: float | None = None
    leaks_excluded: int = Field(0, description="pool rows left out as leaks (never mined)")
    by_kind: dict[str, int] = Field(default_factory=dict, description="identical_bytes, similar")
    pool: int = Field(0, description="pool rows the guard looked at")
    leaks_parquet: str | None = None
    nearest: dict[str, list[float]] | None = Field(
        None, description="with a threshold: the histogram (edges, counts) of each pool row's nearest protected score "
                          "(leak_scope=mined: of a fixed sample of pool rows)")
    scope: str = Field("pool", description="pool (every pool row judged) | mined (the rows the search would take, "
                                           "and what a leak among them pulled in: the same answer)")
    pool_rows: int | None = Field(None, description="leak_scope=mined: the pool rows the search could take")
    sample: int | None = Field(None, description="leak_scope=mined: the pool rows the histogram samples")


class MineResult(_Result):
    output_parquet: str
    summary_path: str
    mined: int
    summary: dict[str, int] = Field(description="the keys of mining_summary.txt")
    knn_metric: str
    topn: int
    filter_by_label: bool
    label_filter: str = Field(description="off | applied | noop (asked for, but a side has no label)")
    label_mode: str = Field("post_filter", description="post_filter (top-n over the pool, then cross-label pairs "
                            "dropped) | per_label (top-n among the pool rows of the target's label)")
    min_similarity: float | None = Field(None, description="the cosine floor pairs had to reach (None: off)")
    max_distance: float | None = Field(None, description="the euclidean/manhattan ceiling pairs had to stay "
                                       "within (None: off)")
    # written only when set, so a run without the collapse reads as it always has
    dedup_similarity: float | None = Field(None, exclude_if=lambda value: value is None, description=(
        "the cosine similarity at which a mined image was collapsed into one kept before it (None: off)"))
    dedup_distance: float | None = Field(None, exclude_if=lambda value: value is None, description=(
        "the euclidean/manhattan distance within which a mined image was collapsed into one kept before it"))
    near_duplicates_parquet: str | None = Field(None, exclude_if=lambda value: value is None, description=(
        "each collapsed image, the kept one it was collapsed into (duplicate_of), their similarity/distance"))
    leaks: LeakFacts | None = Field(None, exclude_if=lambda value: value is None, description=(
        "with protected_parquet: the leakage guard in the search, what it judged and left out (leaks.parquet)"))
    encoder: EncoderIdentity | None = Field(None, description="shared identity of both inputs, if recorded")
    backend: str = "local"
    timings: dict[str, float] = Field(default_factory=dict)
    cluster: ClusterFacts | None = Field(None, description="where it ran (backend ray)")

    def text(self) -> str:
        return "\n".join([f"mined {self.mined} unique images → {self.output_parquet}",
                          *(f"{key}: {value}" for key, value in self.summary.items())])


class MatchPass(BaseModel):
    """One pass of one subset, as summary.json records it."""

    subset: str = Field(description="global, a rare class, CLASS_fallback (from the non_rare pool) or non_rare")
    number: int = Field(description="the pass within its subset, from 1")
    topn: int = Field(description="each target's share this pass")
    candidates: int = Field(description="nearest free pool rows searched per target")
    targets: int = Field(description="targets searched")
    retry: int = Field(description="targets that could not fill their share (retried wider)")
    added: int = Field(description="files the budget kept")
    file: str = Field(description="the pass's parquet in output_dir")


class MatchShortfall(BaseModel):
    """A group that got fewer files than its quota, and why."""

    group: str = Field(description="global, a rare class, or non_rare")
    wanted: int
    got: int
    missing: int
    reason: str = Field(description="pool_spent | class_empty | excluded")


class MatchResult(_Result):
    """`tmm unique_neighbor_matching`: a budget of unique pool files, each claimed by one target."""

    output_dir: str
    final_parquet: str = Field(description="final_unique_files.parquet: each selected file once, sorted by filepath")
    summary_path: str = Field(description="summary.json: the container's keys, then ours")
    allocation_policy: str = Field(description="global | class_stratified")
    desired_unique_count: int
    retrieved_unique_count: int
    coverage_pct: float = Field(description="retrieved / desired × 100")
    per_class: dict[str, int] | None = Field(
        None, description="class_stratified: selected files per group (each rare class, non_rare)")
    passes: list[MatchPass] = Field(default_factory=list, description="empty when the image records none")
    shortfalls: list[MatchShortfall] = Field(default_factory=list)
    backend: str = "local"
    timings: dict[str, float] = Field(default_factory=dict)

    def text(self) -> str:
        lines = [f"matched {self.retrieved_unique_count}/{self.desired_unique_count} unique files "
                 f"({self.coverage_pct}% coverage, {self.allocation_policy}) in {len(self.passes)} passes "
                 f"→ {self.final_parquet}"]
        if self.per_class is not None:
            lines.append("per class: " + ", ".join(f"{name} {count}" for name, count in self.per_class.items()))
        lines += [f"short: {s.group} got {s.got} of {s.wanted} ({s.reason})" for s in self.shortfalls]
        return "\n".join(lines)


class SelectResult(_Result):
    """One DEFT iteration's history-aware selection, as recorded in the ledger."""

    output: str = Field(description="the selected rows (candidates' order and columns kept)")
    ledger: str
    iteration: int
    candidates: int = Field(description="candidate rows read")
    previously_selected: int = Field(description="candidates an earlier iteration already selected")
    duplicates_in_candidates: int = Field(description="repeats of a path earlier in the candidates")
    newly_selected: int = Field(description="rows written to output")
    cumulative_selected: int = Field(description="paths selected over all iterations so far")
    resumed: bool = Field(description="this iteration was already recorded: its files were re-verified")
    budget_excluded_count: int = Field(0, description="new candidates left out because all iterations together "
                                                      "reached max_cumulative_fraction × pool rows")
    ledger_format: LedgerFormat = Field(LedgerFormat.deft_mine, description="the ledger's format")
    history_summary: str | None = Field(None, description="mining_history_summary.json (the DEFT loop's keys), "
                                                          "beside output")

    def text(self) -> str:
        budget = f", {self.budget_excluded_count} left out by the budget" if self.budget_excluded_count else ""
        return (f"iteration {self.iteration}{' (resumed)' if self.resumed else ''}: {self.newly_selected} "
                f"of {self.candidates} candidates selected, {self.previously_selected} selected before, "
                f"{self.duplicates_in_candidates} repeated{budget}; {self.cumulative_selected} in all → {self.output}")


class TrainingRowsResult(BaseModel):
    """mined_training_rows.csv: a ChangeNet pool's mined components as ChangeNet training rows."""

    path: str = Field(description="the training CSV (input_path, golden_path, label, object_name, metadata)")
    rows: int = Field(description="training rows written")
    components: int = Field(description="mined components (a pool row's lights are one): rows + left_out + leaks")
    left_out: int = Field(description="components that could form no training row")
    left_out_by_reason: dict[str, int] = Field(default_factory=dict)
    leaks: int = Field(0, description="rows equal to a validation row on leak_keys, left out (train/val leaks)")
    leak_keys: list[str] = Field(default_factory=list, description="the validator's join keys both files have")
    validation_csv: str | None = None
    pass_golden: str = Field("none", description="none | self: what a PASS row without a golden got")
    images_dir: str = Field(description="the images root every row resolves under")
    lights: list[str] = Field(default_factory=list)
    image_ext: str = ".jpg"

    def text(self) -> str:
        out = ", ".join(f"{n} {r}" for r, n in self.left_out_by_reason.items())
        return (f"{self.rows} of {self.components} mined components → {self.path}"
                + (f"; left out {self.left_out} ({out})" if self.left_out else "")
                + (f"; {self.leaks} train/val leaks left out" if self.leaks else ""))


class ReportResult(_Result):
    """What `report` wrote: Mining_Report.md, its pictures, and what it could not state."""

    report_path: str
    words: int = Field(description="words in the report (tokens holding a letter or digit)")
    verdict: Literal["ok", "attention", "failed"]
    pictures: list[str] = Field(default_factory=list, description="PNG file names in the run folder")
    missing_facts: list[str] = Field(default_factory=list,
                                     description="facts the folder did not record (e.g. no run.json)")
    provenance_unavailable: list[str] = Field(
        default_factory=list, description="what mining_config/ could not say of an older run folder "
                                          "(e.g. the call that made it)")

    def text(self) -> str:
        return (f"{self.verdict.upper()}: {self.report_path} ({self.words} words; pictures: "
                f"{', '.join(self.pictures) or 'none'})"
                + (f"\nfacts unavailable: {', '.join(self.missing_facts)}" if self.missing_facts else "")
                + (f"\nprovenance unavailable: {'; '.join(self.provenance_unavailable)}"
                   if self.provenance_unavailable else ""))


class RunResult(_Result):
    run_dir: str
    mined: int
    mined_parquet: str
    target_embed: EmbedResult
    source_embed: EmbedResult
    mine: MineResult | None = Field(description="the nearest-neighbour mining (mode=nearest; None with mode=unique)")
    # only a run with mode=unique matches to a budget; other runs' results read as before
    match: MatchResult | None = Field(
        None, description="the budgeted unique matching (mode=unique)", exclude_if=lambda match: match is None)
    select: SelectResult | None = Field(None, description="the history-aware selection (runs with a ledger)")
    # only a run whose pool is a ChangeNet CSV has training rows; other runs' results read as before
    training_rows: TrainingRowsResult | None = Field(
        None, description="mined_training_rows.csv (a ChangeNet pool)", exclude_if=lambda rows: rows is None)
    # only a run whose guard found or looked for leaks has them; other runs' results read as before
    leaks: LeakFacts | None = Field(
        None, description="the leakage guard (run --protect, leak_similarity / leak_distance, or a byte copy of a "
                          "target in the pool)", exclude_if=lambda leaks: leaks is None)
    report: ReportResult
    timings: dict[str, float] = Field(default_factory=dict)

    def text(self) -> str:
        report = f"report {self.report.verdict.upper()}: {self.report.report_path}"
        if self.match is not None:
            lines = [f"run folder {self.run_dir}: mined {self.mined} unique images in "
                     f"{self.timings.get('total', 0):.1f}s; {report}", f"budget: {self.match.text()}"]
        else:
            summary = MiningSummary.of(self.mine.summary if self.mine is not None else {})
            lines = [f"run folder {self.run_dir}: mined {self.mined} unique images ({summary.pairs or 0} "
                     f"pairs for {summary.queries or 0} targets) in {self.timings.get('total', 0):.1f}s; {report}",
                     "summary: " + ", ".join(f"{key}={value}" for key, value in summary.as_dict().items())]
        t, p = self.target_embed, self.source_embed
        if t.store:
            lines.append(f"store {t.store}: targets {t.reused} reused / {t.embedded} embedded, pool {p.reused} "
                         f"reused / {p.embedded} embedded, {t.seconds_saved + p.seconds_saved:.1f}s saved")
        if self.select is not None:
            lines.append(f"history: {self.select.text()}")
        if self.training_rows is not None:
            lines.append(f"training rows: {self.training_rows.text()}")
        return "\n".join(lines)


class StoreShelf(BaseModel):
    """One encoder's vectors in the store."""

    fingerprint: str = Field(description="the encoder identity's fingerprint (the shelf's folder)")
    model: str | None
    model_path: str | None
    shards: int
    vectors: int
    bytes: int
    oldest: float | None = Field(description="mtime of the oldest shard (seconds since the epoch)")
    newest: float | None
    corrupt: int = Field(description="shards set aside after failing their checksum")


class StoreInfoResult(_Result):
    store: str
    bytes: int = Field(description="size of the store on disk")
    free_bytes: int = Field(description="free space on the store's disk")
    encoders: list[StoreShelf]

    def summary(self) -> str:
        return (f"{self.store}: {self.bytes / 2**20:.1f} MiB in {len(self.encoders)} encoder(s), "
                f"{self.free_bytes / 2**30:.1f} GiB free")

    def text(self) -> str:
        return "\n".join([f"store {self.summary()}", *(
                              f"  {e.fingerprint} {e.model} {e.model_path or ''}: {e.vectors} vectors in "
                              f"{e.shards} shard(s), {e.bytes / 2**20:.1f} MiB" + (f", {e.corrupt} set aside"
                                                                                  if e.corrupt else "")
                              for e in self.encoders)])


class StorePruneResult(_Result):
    store: str
    removed_shards: int
    freed_bytes: int

    def text(self) -> str:
        return f"store {self.store}: removed {self.removed_shards} shard(s), freed {self.freed_bytes / 2**20:.1f} MiB"


class Check(BaseModel):
    name: str
    ok: bool = Field(description="false only for status fail")
    status: Literal["ok", "warn", "fail"] = "ok"
    detail: str = Field(description="what was found")
    fix: str | None = Field(None, description="the exact fix, when not ok")

    @classmethod
    def of(cls, name: str, status: Literal["ok", "warn", "fail"], detail: str, fix: str | None = None) -> "Check":
        return cls(name=name, ok=status != "fail", status=status, detail=detail, fix=fix)


class PreflightResult(_Result):
    ok: bool = Field(description="every check passed: the backend can run here")
    backend: str
    checks: list[Check]
    versions: dict[str, str]
    gpu: list[str] = Field(default_factory=list, description="CUDA devices torch sees")
    session_encoder: EncoderIdentity | None = Field(
        None, description="the encoder this session is bound to (set by its first embed or run)")
    warnings: list[ToolWarning] = Field(default_factory=list,
                                        description="warnings the given inputs will raise")

    def text(self) -> str:
        lines = [("ready" if self.ok else "NOT ready") + f" ({self.backend}): "
                 + "; ".join(f"{c.name}: {c.detail}" for c in self.checks),
                 *(f"{c.status} {c.name}: {c.fix}" for c in self.checks if c.fix)]
        if self.session_encoder:
            lines.append(f"session encoder: {self.session_encoder.model} {self.session_encoder.model_path}")
        return "\n".join(lines)


class EncoderScore(BaseModel):
    """One candidate encoder of `choose`: whether it loaded here, and its label agreement on the sample."""

    name: str = Field(description="how the report names it, e.g. 'DINOv2 (mean)'")
    spec: dict[str, Any] = Field(description="its embedding spec keys (model, model_path, pooling)")
    available: bool
    error: ErrorInfo | None = Field(None, description="why it is unavailable (it could not be built or run here)")
    cost_rank: int = Field(description="the cost order ties fall back on: thumbnail 0 < DINOv2 1 < CLIP 2 < SigLIP 3 "
                                       "< hf 4")
    agreement: list[float] = Field(default_factory=list, description="macro label agreement at k = 1 … k_max")
    standard_error: list[float] = Field(default_factory=list, description="its binomial standard error at each k")
    at_topn: float | None = Field(None, description="macro label agreement at the intended topn")
    at_topn_se: float | None = None
    per_label: dict[str, list[float]] = Field(default_factory=dict, description="each scored label's agreement "
                                              "at k = 1 … k_max")
    images: dict[str, int] = Field(default_factory=dict, description="the images each scored label's agreement "
                                   "rests on: its sampled images that this encoder embedded (an unreadable one "
                                   "is skipped)")
    target_agreement: float | None = Field(None, description="with targets: the mean share of each target's topn "
                                           "sample neighbours sharing its label")
    target_per_label: dict[str, float] = Field(default_factory=dict)
    targets_scored: int = 0
    same_label_similarity: dict[str, float] = Field(default_factory=dict, description="quantiles (p05 … p95) of "
                                                    "the k_max neighbours' cosine similarity where labels agree")
    cross_label_similarity: dict[str, float] = Field(default_factory=dict, description="… and where they differ")
    seconds_per_image: float | None = Field(None, description="measured embedding time per embedded image "
                                            "(None: every vector came from the store)")
    embedded: int = 0
    reused: int = 0
    embeddings_parquet: str | None = None


class FloorSuggestion(BaseModel):
    """The suggested `min_similarity`: below it, the pick's neighbours are mostly cross-label."""

    min_similarity: float | None = Field(description="None: no floor helps (see reason)")
    reason: str
    pairs: int = Field(description="neighbour pairs judged: each scored image's k_max nearest")
    below: int = Field(0, description="pairs below the floor")
    below_cross_label_share: float | None = None
    above: int = Field(0, description="pairs at or above the floor")
    above_same_label_share: float | None = None


class ChooseResult(_Result):
    output_dir: str
    choice_json: str
    embedding_spec: str = Field(description="the pick's embedding spec, for `run -e`")
    mining_spec: str = Field(description="the suggested topn and floor, for `run -m`")
    report: str = Field(description="Encoder_Choice.md")
    plot: str
    metric: str = Field("cosine", description="the neighbours' metric (cosine similarity, exact, float64)")
    sample: int = Field(description="images sampled (every labelled image when fewer than asked)")
    listing_rows: int
    unlabelled: int = Field(description="listing rows with a null or blank label, never sampled")
    sampled_per_label: dict[str, int]
    scored_images: int = Field(description="the images the pick's score rests on: sampled images it embedded whose "
                                           "label has two or more of them")
    unscored_labels: list[str] = Field(description="sampled labels with fewer than two images the pick embedded: "
                                                   "reported, not scored")
    k_max: int
    topn: int
    seed: int
    encoders: list[EncoderScore]
    pick: str = Field(description="the encoder with the best agreement at topn (exact ties: the cheaper)")
    clear_winner: bool = Field(description="false: the runner-up lies within two standard errors of the pick")
    runner_up: str | None = None
    margin: float | None = Field(None, description="the pick's agreement at topn less the runner-up's")
    noise: float | None = Field(None, description="the standard error of that difference")
    suggested_topn: int
    tolerance: float
    floor: FloorSuggestion
    timings: dict[str, float] = Field(default_factory=dict)

    def text(self) -> str:
        rows = [f"{e.name}: {e.at_topn:.3f} ± {e.at_topn_se:.3f}" if e.available and e.at_topn is not None
                else f"{e.name}: unavailable ({e.error.code if e.error else '?'})" for e in self.encoders]
        verdict = "" if self.clear_winner else f" (no clear winner: {self.runner_up} is within the noise)"
        floor = (f"min_similarity={self.floor.min_similarity:.4f}" if self.floor.min_similarity is not None
                 else "no floor")
        return (f"label agreement at topn={self.topn} on {self.scored_images} of {self.sample} sampled images:\n  "
                + "\n  ".join(rows)
                + f"\npick: {self.pick}{verdict}; suggested topn={self.suggested_topn}, {floor}\n"
                f"→ {self.report}")
