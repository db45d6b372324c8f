"""EmbeddingSpec, MiningSpec and UniqueMatchingSpec, and loading them from a YAML file plus key=value overrides."""

from __future__ import annotations

import difflib
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializationInfo, ValidationError,
                      model_serializer, model_validator)

from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import PathField

#: `model` values the local backend runs; anything else must be a TAO checkpoint.
LOCAL_MODELS = ("SigLIP", "CLIP", "thumbnail", "DINOv2", "hf")
TAO_CHECKPOINT_SUFFIXES = (".pth", ".ckpt")
#: Where each model's vector comes from (`pooling`): `cls` the first token of the last hidden
#: state, `mean` the mean of the patch tokens, `pooled` the model's own pooler output. SigLIP
#: and CLIP always use their projected image features and the thumbnail has no tokens, so they
#: take none; for `hf` the checkpoint decides what fits (checked when it is loaded).
POOLINGS = ("cls", "mean", "pooled")
MODEL_POOLINGS: dict[str, tuple[str, ...]] = {"DINOv2": ("cls", "mean"), "hf": POOLINGS}
#: The pooling a model uses when the spec names none, where that is known without its weights
#: (DINOv2's pooler output *is* its CLS token); `hf`'s depends on the checkpoint.
DEFAULT_POOLINGS = {"DINOv2": "cls"}
#: model_path when the spec names none; `hf` has no sensible default and must be told.
DEFAULT_MODEL_PATHS = {"DINOv2": "facebook/dinov2-base"}


class Metric(StrEnum):
    """The k-NN metrics: cosine compares directions (higher is nearer), the others distances."""

    cosine = "cosine"
    euclidean = "euclidean"
    manhattan = "manhattan"

    @property
    def higher_is_nearer(self) -> bool:
        return self is Metric.cosine


class FloorRule(StrEnum):
    """How the floor judges: `pair` each (target, neighbour) pair on its own score (ours, the
    container's distance_threshold); `best_target` each mined image on its best cosine similarity
    over all targets (the same-label ones under the label filter), the DEFT loop's cosine filter."""

    pair = "pair"
    best_target = "best_target"


class LabelFilter(StrEnum):
    """What filter_by_label did: `off`, `applied`, or `noop` (asked for, but a side has no label)."""

    off = "off"
    applied = "applied"
    noop = "noop"


class Side(StrEnum):
    """One side of a mining job: the pool (`source`) or the queries (`target`)."""

    source = "source"
    target = "target"

    @property
    def input(self) -> str:
        """The side as a run's input is named (`targets`, `source`): per-side counts use it too."""
        return "targets" if self is Side.target else "source"


def _canonical_model(value: Any) -> Any:
    """A local model's name as we spell it (`siglip`, `dinov2`, `HF` are accepted)."""
    if isinstance(value, str):
        for name in LOCAL_MODELS:
            if value.lower() == name.lower():
                return name
    return value


def _choice(choices: tuple[str, ...], field: str, code: str, fix: str) -> BeforeValidator:
    """A word from `choices`, whatever its case (`per-label` is `per_label`); any other word is
    refused naming the choices."""
    def word(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        lowered = value.strip().lower().replace("-", "_")
        if lowered not in choices:
            raise DeftError(code, f"{field} must be one of {', '.join(choices)}; got {value!r}", fix=fix, field=field)
        return lowered
    return BeforeValidator(word)


_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _bool_word(value: Any) -> Any:
    """The container reads filter_by_label as a string, `true`/`1`/`yes` (any case) on and anything
    else off; we take its three words for on, their opposites for off, and refuse the rest."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _WORDS:
            return _WORDS[lowered]
        raise ValueError(f"must be one of true, 1, yes (on) or false, 0, no (off), got {value!r}")
    return value


BoolWord = Annotated[bool, BeforeValidator(_bool_word)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EmbeddingSpec(_Spec):
    """How to embed images: the TAO `embedding image_embeddings` spec, plus per-run paths."""

    model: Annotated[str, BeforeValidator(_canonical_model)] = Field(
        "SigLIP", description="SigLIP | CLIP | DINOv2 | hf | thumbnail | a TAO checkpoint kind")
    model_path: str = Field("google/siglip-base-patch16-224",
                            description="hub id, local folder, or .pth/.ckpt (TAO); DINOv2's default "
                                        "is facebook/dinov2-base, hf needs one")
    pooling: Annotated[Literal["cls", "mean", "pooled"] | None, _choice(
        POOLINGS, "pooling", "pooling_unsupported",
        "set pooling to cls, mean or pooled (or leave it out for the model's default)")] = Field(
        None, description="DINOv2: cls (default) | mean; hf: pooled (default when the model has a "
                          "trained pooler, else cls) | cls | mean; not for SigLIP, CLIP, thumbnail")
    model_config_path: str | None = Field(None, description="required only for TAO checkpoints")
    batch_size: int = Field(64, ge=1, le=65536)
    workers: int | None = Field(None, ge=1, le=4096, description="ray backend: encoder actors (default: one per "
                                "GPU, else half the CPUs, always leaving the reads a CPU); not part of the identity")
    input_parquet: Annotated[str | None, PathField()] = None
    output_parquet: Annotated[str | None, PathField()] = None
    image_root: Annotated[str | None, PathField()] = Field(
        None, description="folder relative filepaths resolve against (default: the input's folder)")
    device: str = Field("auto", description="auto | cpu | cuda[:N]", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")

    @model_validator(mode="before")
    @classmethod
    def _model_default_path(cls, data: Any) -> Any:
        # The field default is SigLIP's checkpoint; a DINOv2 spec that names none means DINOv2's
        # (judged before validation, where "not given" can still be told from "given").
        if isinstance(data, Mapping) and data.get("model_path") is None:
            model = _canonical_model(data.get("model"))
            if model in DEFAULT_MODEL_PATHS:
                return {**data, "model_path": DEFAULT_MODEL_PATHS[model]}
            if model == "hf":
                raise DeftError("spec_missing_value", "model=hf needs model_path: the Hugging Face "
                                "vision model's hub id or a local folder saved with save_pretrained",
                                fix="pass model_path=ORG/NAME or model_path=/path/to/folder", field="model_path")
        return data

    @model_validator(mode="after")
    def _pooling_fits_model(self) -> "EmbeddingSpec":
        if self.pooling is None:
            return self
        fits = MODEL_POOLINGS.get(self.model, ())
        if self.pooling not in fits:
            why = (f"it takes {' or '.join(fits)} (DINOv2's pooler output is its CLS token)" if fits else
                   "it has a fixed output and takes no pooling")
            raise DeftError("pooling_unsupported", f"pooling={self.pooling} does not fit model={self.model}: {why}",
                            fix=f"use pooling={' or pooling='.join(fits)}" if fits else
                            "leave pooling out, or use model=DINOv2 or model=hf", field="pooling",
                            model=self.model, pooling=self.pooling, choices=list(fits))
        return self

    @model_validator(mode="after")
    def _tao_needs_config(self) -> "EmbeddingSpec":
        if self.model not in LOCAL_MODELS:
            if not self.model_path.endswith(TAO_CHECKPOINT_SUFFIXES):
                raise ValueError(
                    f"model must be one of {', '.join(LOCAL_MODELS)} or a TAO checkpoint kind "
                    f"with a .pth/.ckpt model_path; got model={self.model!r}")
            if not self.model_config_path:
                raise ValueError("model_config_path is required for a TAO checkpoint")
        return self

    @property
    def is_tao_checkpoint(self) -> bool:
        return self.model not in LOCAL_MODELS

    def images_root(self, listing: Path) -> Path:
        """Where the listing's relative filepaths resolve: image_root, else the listing's folder."""
        return Path(self.image_root).expanduser().absolute() if self.image_root else listing.parent

    @property
    def asked_pooling(self) -> str | None:
        """The pooling asked for, the model's known default filled in (None: none, or `hf`'s
        checkpoint decides when it loads)."""
        return self.pooling or DEFAULT_POOLINGS.get(self.model)

    def encoder_key(self) -> tuple[str, str | None, str | None]:
        """(model, model_path, model_config_path) as the encoder's identity will record them,
        known before any weights are read: the session lock and the encoder cache use it."""
        if self.model == "thumbnail":
            return ("thumbnail", None, None)
        local = Path(self.model_path).expanduser()
        return (self.model, str(local.resolve()) if local.exists() else self.model_path,
                self.model_config_path)


class ExcludeBy(StrEnum):
    """How exclude_path's rows name pool files: `path_or_name` (the container's: the full path, or
    the file name either way) or `path` (the full path only: a history of one board's
    `C1_SolderLight.jpg` must not exclude every other board's)."""

    path_or_name = "path_or_name"
    path = "path"


class AllocationPolicy(StrEnum):
    """How `tmm unique_neighbor_matching` spends its budget: `global` over every target at once;
    `class_stratified` split over the rare classes and `non_rare` by the targets' class ratio."""

    global_ = "global"
    class_stratified = "class_stratified"


def _class_names(value: Any) -> Any:
    """rare_class_list as the container reads it (a comma-separated string, each name stripped
    and lower-cased, blanks dropped); a YAML list is taken too. Sorted and unique."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return value
    return sorted({str(item).strip().lower() for item in items if str(item).strip()})


class LeakScope(StrEnum):
    """Which pool rows the leakage guard judges: `mined` those the search would take (each target's
    topn and what a leak among them pulls in: the same answer as judging every row, at a fraction of
    the cost); `pool` every row, so leaks.parquet lists every leak in the pool (an audit)."""

    mined = "mined"
    pool = "pool"


class MiningMode(StrEnum):
    """What `run` mines: `nearest` each target's topn nearest pool images (`tmm nearest_neighbors`);
    `unique` a budget of unique pool images, each claimed by one target (`tmm unique_neighbor_matching`)."""

    nearest = "nearest"
    unique = "unique"


# The budgeted matcher's keys, one type each wherever they are read (UniqueMatchingSpec, MiningSpec's unique mode).
DesiredUniqueCount = Annotated[int, Field(gt=0, description="how many unique pool images to select")]
AllocationPolicyChoice = Annotated[AllocationPolicy, _choice(
    tuple(AllocationPolicy), "allocation_policy", "spec_invalid",
    "set allocation_policy=global or allocation_policy=class_stratified")]
ExpansionFactor = Annotated[int, Field(ge=1, le=100_000, description="candidates per target = factor x share x pass "
                                                                      "number")]
RareClassList = Annotated[list[str], BeforeValidator(_class_names)]


# Keys only one mode reads: the other refuses them rather than ignore them.
UNIQUE_KEYS = ("desired_unique_count", "allocation_policy", "rare_class_list", "candidate_expansion_factor")
# the near-duplicate rule: collapse (nearest), claiming (unique); the leak rows: never mined, nor claimed
BOTH_MODES_KEYS = ("dedup_similarity", "dedup_distance", "leaks_parquet", "protected_parquet", "pool_image_root")
NEAREST_KEYS = frozenset({"topn", "filter_by_label", "exclude_targets", "min_similarity", "max_distance",
                          "distance_threshold", "floor_rule", "label_mode"})
LEAK_KEYS = ("leak_similarity", "leak_distance", "leaks_parquet", "leak_scope", "protected_parquet")  # the leakage guard's
# Keys on one metric's scale, as (cosine key, its noun; distance key, its noun): each refused under the other metric.
SCALED_KEYS = (("min_similarity", "similarity floor", "max_distance", "distance ceiling"),
               ("dedup_similarity", "similarity threshold", "dedup_distance", "distance threshold"),
               ("leak_similarity", "similarity threshold", "leak_distance", "distance threshold"))
# Keys written into a spec only when set: a spec without them reads as it did before they existed.
_OMITTED_WHEN_OFF = ("dedup_similarity", "dedup_distance", "pool_image_root", *LEAK_KEYS)


# A threshold on a metric's scale: a cosine similarity, or a distance (euclidean, manhattan); None off.
Similarity = Annotated[float | None, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
Distance = Annotated[float | None, Field(ge=0.0, allow_inf_nan=False)]


class MiningSpec(_Spec):
    """How to mine: the TAO `tmm nearest_neighbors` spec, plus per-run paths."""

    topn: int = Field(5, ge=1, le=100_000)
    knn_metric: Annotated[Metric, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = Metric.cosine
    filter_by_label: BoolWord = False
    source_embed_column_name: str = "embedding"
    target_embed_column_name: str = "embedding"
    source_parquet: Annotated[str | None, PathField()] = None
    target_parquet: Annotated[str | None, PathField()] = None
    output_parquet: Annotated[str | None, PathField()] = None
    exclude_targets: BoolWord = Field(False, description="drop pool rows that are also targets")
    block_rows: int = Field(32768, ge=1, description="pool rows searched at a time (memory ~ 2-3 blocks)")
    min_similarity: Similarity = Field(
        None, description="cosine only: drop pairs whose similarity is below it, before de-duplication (default off)")
    max_distance: Distance = Field(
        None, description="euclidean / manhattan only: drop pairs farther than it, before de-duplication (default off)")
    dedup_similarity: Similarity = Field(
        None, description="cosine only: drop a mined image whose similarity to one kept before it (target order, then "
                    "rank) reaches it, listed in near_duplicates.parquet (default off)")
    dedup_distance: Distance = Field(
        None, description="euclidean / manhattan only: drop a mined image within this distance of one kept before it "
                    "(default off)")
    distance_threshold: float = Field(
        -1.0, allow_inf_nan=False,
        description="the TAO container's (main): the largest distance a kept pair may have, in the metric's own "
                    "distance (cosine: 1 - similarity), after the label filter; -1 off (the same floor as "
                    "min_similarity / max_distance)")
    floor_rule: Annotated[FloorRule, _choice(
        tuple(FloorRule), "floor_rule", "spec_invalid",
        "set floor_rule=pair (each pair judged on its own score) or floor_rule=best_target")] = Field(
        FloorRule.pair, description="with a floor: pair (each pair on its own score) | best_target (cosine only: an "
                                    "image is kept when its best similarity over all (same-label) targets reaches "
                                    "it, the DEFT loop's rule)")
    label_mode: Annotated[Literal["post_filter", "per_label"], _choice(
        ("post_filter", "per_label"), "label_mode", "spec_invalid",
        "set label_mode=post_filter (the TAO container's) or label_mode=per_label")] = Field(
        "post_filter", description="with filter_by_label=true: post_filter (the TAO container's: top-n over the "
                                   "whole pool, then cross-label pairs dropped) | per_label (top-n among the pool "
                                   "rows of the target's own label)")
    # The leakage guard (run --protect): pool rows near a protected image, left out before the search.
    leak_similarity: Similarity = Field(
        None, description="cosine only: a pool image whose similarity to a protected image (a target, or one listed by "
                    "run --protect) reaches it is a leak, never mined (default off)")
    leak_distance: Distance = Field(
        None, description="euclidean / manhattan only: a pool image within this distance of a protected image is a "
                    "leak, never mined (default off)")
    leaks_parquet: Annotated[str | None, PathField()] = Field(
        None, description="per-run: a parquet whose `filepath`s (pool rows) are left out of the search (run's "
                          "leakage guard writes it: leaks.parquet)")
    leak_scope: Annotated[LeakScope | None, _choice(
        tuple(LeakScope), "leak_scope", "spec_invalid",
        "set leak_scope=mined (judge the rows the search would take) or leak_scope=pool (every pool row)")] = Field(
        None, description="the leakage guard judges: mined (default: the rows the search would take; the same "
                          "answer, at a fraction of the cost) | pool (every pool row: leaks.parquet lists every leak)")
    protected_parquet: Annotated[str | None, PathField()] = Field(
        None, description="per-run: the protected images (the targets, then run --protect's; with a leak threshold "
                          "their vectors), which the search judges its candidates against (run writes it)")
    pool_image_root: Annotated[str | None, PathField()] = Field(
        None, description="per-run: where the pool's relative filepaths resolve, for telling mined images with "
                          "identical bytes apart (run sets it; default: the source parquet's folder)")
    # mode=unique: `tmm unique_neighbor_matching` in `run`, scored by knn_metric; None: the matcher's default.
    mode: Annotated[MiningMode, _choice(tuple(MiningMode), "mode", "spec_invalid", "set mode=nearest (each target's "
                    "topn nearest) or mode=unique (a budget of unique images)")] = Field(
        MiningMode.nearest, description="nearest (each target's topn nearest pool images) | unique (a budget of "
                                        "desired_unique_count unique pool images, one target each)")
    desired_unique_count: DesiredUniqueCount | None = Field(None, description="mode=unique (required): the budget")
    allocation_policy: AllocationPolicyChoice | None = Field(
        None, description="mode=unique: global (default) | class_stratified (split over rare_class_list and non_rare)")
    rare_class_list: RareClassList | None = Field(
        None, description="mode=unique, class_stratified: comma-separated rare classes, compared with `label`")
    candidate_expansion_factor: ExpansionFactor | None = Field(
        None, description="mode=unique: candidates per target = factor x share x pass number (default 5)")

    @model_validator(mode="after")
    def _mode_fits(self) -> "MiningSpec":
        """Each mode takes its own keys: one the mode would ignore is refused, naming it."""
        if self.mode is MiningMode.nearest:
            for key in UNIQUE_KEYS:
                if getattr(self, key) not in (None, []):  # a YAML `null` list reads as []
                    raise DeftError("spec_invalid", f"{key} applies to mode=unique (a budget of unique images), and "
                                    "this spec mines each target's topn nearest (mode=nearest)",
                                    fix=f"add mode=unique (with desired_unique_count=N), or leave {key} out",
                                    field=key, mode=self.mode.value)
            return self
        if self.desired_unique_count is None:
            raise DeftError("spec_missing_value", "mode=unique needs desired_unique_count: how many unique pool "
                            "images to select", fix="pass desired_unique_count=N", field="desired_unique_count")
        for key in NEAREST_KEYS:
            default = type(self).model_fields[key].default
            if key in self.model_fields_set and (key == "topn" or getattr(self, key) != default):
                raise DeftError("spec_invalid", f"{key}={getattr(self, key)} applies to mode=nearest; mode=unique "
                                "spends a budget of desired_unique_count unique images, one target each, and would "
                                "ignore it", fix=f"leave {key} out with mode=unique, or use mode=nearest",
                                field=key, mode=self.mode.value)
        if self.leak_scope is LeakScope.mined:
            raise DeftError("spec_invalid", "leak_scope=mined judges the candidates of a nearest search; mode=unique "
                            "claims in passes: its guard checks each candidate's bytes as it claims, and with a leak "
                            "threshold judges every pool row first", fix="leave leak_scope out (or set "
                            "leak_scope=pool) with mode=unique", field="leak_scope", mode=self.mode.value)
        self.unique_spec("", "", "")  # the matcher's own rules judge its keys (class_stratified needs classes)
        return self

    def unique_spec(self, source_path: str, target_path: str, output_dir: str, exclude_path: str | None = None,
                    exclude_by: ExcludeBy = ExcludeBy.path_or_name) -> "UniqueMatchingSpec":
        """mode=unique as the `tmm unique_neighbor_matching` spec it runs (knn_metric is its distance_metric)."""
        given = {key: getattr(self, key) for key in (*UNIQUE_KEYS, *BOTH_MODES_KEYS) if getattr(self, key) is not None}
        return UniqueMatchingSpec(
            source_path=source_path, target_path=target_path, output_dir=output_dir, exclude_path=exclude_path,
            exclude_by=exclude_by, distance_metric=self.knn_metric, source_embedding_column=self.source_embed_column_name,
            target_embedding_column=self.target_embed_column_name, block_rows=self.block_rows, **given)

    @model_serializer(mode="wrap")
    def _mode_keys(self, handler: Any) -> Any:
        """A spec records its mode's keys only: a nearest one reads as before there was a mode, and a
        unique one loads back (it names no key that mode refuses)."""
        data = handler(self)
        drop = {"mode", *UNIQUE_KEYS} if self.mode is MiningMode.nearest else NEAREST_KEYS
        drop = drop | {key for key in _OMITTED_WHEN_OFF if getattr(self, key) is None}
        return {key: value for key, value in data.items() if key not in drop} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_leak_scope(self) -> "MiningSpec":
        """protected_parquet is the guard in the search (leak_scope=mined); a spec asking for the whole
        pool to be judged is refused rather than guarded the other way."""
        if self.protected_parquet is not None and self.leak_scope is LeakScope.pool:
            raise DeftError("spec_invalid", "leak_scope=pool judges every pool row before the search (run writes "
                            "leaks_parquet for that), while protected_parquet has the search judge its own "
                            "candidates", fix="leave leak_scope out with protected_parquet, or give leaks_parquet "
                            "instead", field="leak_scope")
        return self

    @model_validator(mode="after")
    def _controls_fit(self) -> "MiningSpec":
        """A floor on the wrong scale, or a label mode without labels to search by, is refused:
        silently ignoring it would mine something other than what was asked."""
        for keys in SCALED_KEYS:
            self._on_its_scale(*keys)
        ours = "min_similarity" if self.knn_metric is Metric.cosine else "max_distance"
        if self.distance_threshold >= 0 and getattr(self, ours) is not None and not math.isclose(
                getattr(self, ours), self._threshold_floor, abs_tol=1e-12):
            raise DeftError(
                "spec_invalid", f"distance_threshold={self.distance_threshold} and {ours}={getattr(self, ours)} are "
                f"two different floors (distance_threshold means {ours}={self._threshold_floor:g} here)",
                fix=f"give one of them: distance_threshold (the container's key) or {ours}",
                field="distance_threshold", knn_metric=self.knn_metric.value)
        if self.floor_rule is FloorRule.best_target and self.knn_metric is not Metric.cosine:
            raise DeftError(
                "spec_invalid", f"floor_rule=best_target judges each image by its best cosine similarity to the "
                f"targets, but knn_metric={self.knn_metric.value} scores distances",
                fix="use knn_metric=cosine with floor_rule=best_target, or floor_rule=pair with "
                    f"knn_metric={self.knn_metric.value}", field="floor_rule", knn_metric=self.knn_metric.value)
        if self.label_mode == "per_label" and not self.filter_by_label:
            raise DeftError(
                "spec_invalid", "label_mode=per_label searches each target among the pool rows of its own label, "
                "which needs filter_by_label=true",
                fix="add filter_by_label=true, or leave label_mode out", field="label_mode")
        return self

    def _on_its_scale(self, similar: str, similar_noun: str, distant: str, distant_noun: str) -> None:
        """A cosine key under a distance metric, or a distance key under cosine, is refused naming the other."""
        metric = self.knn_metric.value
        if getattr(self, similar) is not None and self.knn_metric is not Metric.cosine:
            raise DeftError(
                "spec_invalid", f"{similar} is a cosine {similar_noun}, but knn_metric={metric} "
                "scores distances (lower is nearer)",
                fix=f"use {distant}=D with knn_metric={metric}, or knn_metric=cosine with {similar}",
                field=similar, knn_metric=metric)
        if getattr(self, distant) is not None and self.knn_metric is Metric.cosine:
            raise DeftError(
                "spec_invalid", f"{distant} is a {distant_noun} (euclidean, manhattan), but knn_metric=cosine "
                "scores similarities (higher is nearer)",
                fix=f"use {similar}=S (between -1 and 1) with knn_metric=cosine, or knn_metric=euclidean "
                    f"or manhattan with {distant}", field=distant, knn_metric=metric)

    @property
    def leak_threshold(self) -> float | None:
        """The similarity guard's limit on the metric's scale (None: off)."""
        return self.leak_similarity if self.knn_metric is Metric.cosine else self.leak_distance

    @property
    def dedup(self) -> float | None:
        """The near-duplicate threshold on the metric's own scale (dedup_similarity or
        dedup_distance), None when off."""
        return self.dedup_similarity if self.knn_metric is Metric.cosine else self.dedup_distance

    def pool_root(self, source_path: Path) -> Path:
        """Where the pool's relative filepaths resolve: pool_image_root, else the source parquet's folder."""
        return Path(self.pool_image_root).expanduser().absolute() if self.pool_image_root else source_path.parent

    @property
    def unique(self) -> bool:
        return self.mode is MiningMode.unique

    @property
    def _threshold_floor(self) -> float:
        """distance_threshold as our score limit: a cosine distance d is the similarity 1 - d."""
        return 1.0 - self.distance_threshold if self.knn_metric is Metric.cosine else self.distance_threshold

    @property
    def floor(self) -> float | None:
        """The score limit a kept pair must reach (min_similarity or max_distance, or
        distance_threshold in their terms), None when off: one floor, however it was given."""
        if self.distance_threshold >= 0:
            return self._threshold_floor
        return self.min_similarity if self.knn_metric is Metric.cosine else self.max_distance

    @property
    def threshold(self) -> float | None:
        """The floor as the container states it: the largest distance kept (None when off)."""
        floor = self.floor
        return None if floor is None else 1.0 - floor if self.knn_metric is Metric.cosine else floor


class UniqueMatchingSpec(_Spec):
    """How to match one-to-one to a budget: the TAO `tmm unique_neighbor_matching` spec."""

    source_path: Annotated[str, PathField()] = Field(description="the pool: a parquet, or a folder of parquets")
    target_path: Annotated[str, PathField()] = Field(description="the targets: a parquet, or a folder of parquets")
    output_dir: Annotated[str, PathField()] = Field(
        description="folder for final_unique_files.parquet, summary.json and the per-pass parquets")
    desired_unique_count: DesiredUniqueCount
    allocation_policy: AllocationPolicyChoice = AllocationPolicy.global_
    distance_metric: Annotated[Metric, _choice(
        tuple(Metric), "distance_metric", "spec_invalid",
        "set distance_metric to euclidean, cosine or manhattan")] = Field(
        Metric.euclidean, description="euclidean | cosine | manhattan, on L2-normalised vectors (the container's)")
    candidate_expansion_factor: ExpansionFactor = 5
    source_embedding_column: str = "embedding"
    target_embedding_column: str = "embedding"
    source_filepath_column: str = Field("filepath", description="also the first column of final_unique_files")
    target_filepath_column: str = "filepath"
    exclude_path: Annotated[str | None, PathField()] = Field(
        None, description="a parquet whose `filepath` rows (full path or file name) are never selected")
    exclude_by: Annotated[ExcludeBy, _choice(
        tuple(ExcludeBy), "exclude_by", "spec_invalid", "set exclude_by=path_or_name or exclude_by=path")] = Field(
        ExcludeBy.path_or_name, description="path_or_name (the container's: an exclude row's full path or file "
                                            "name) | path (ours: its full path only)")
    leaks_parquet: Annotated[str | None, PathField()] = Field(
        None, description="ours, per-run: a parquet whose `filepath`s (pool rows, by full path) are never selected "
                          "(run's leakage guard writes it: leaks.parquet)")
    protected_parquet: Annotated[str | None, PathField()] = Field(
        None, description="ours, per-run: the protected images (run writes protected.parquet); a candidate whose file "
                          "repeats one's bytes is never claimed, and is listed in output_dir's leaks.parquet")
    pool_image_root: Annotated[str | None, PathField()] = Field(
        None, description="ours: where the pool's relative filepaths resolve, for telling files with identical bytes "
                          "apart while claiming (run sets it; default: source_path's folder)")
    source_detection_file: Annotated[str | None, PathField()] = Field(
        None, description="the pool's classes: a COCO json or a KITTI label folder (detection_format); an image "
                          "matched by full path, file name or stem (KITTI: stem); without it, each row's `label`")
    target_detection_file: Annotated[str | None, PathField()] = Field(
        None, description="the targets' classes, as source_detection_file; without it, each row's `label`")
    detection_format: Annotated[Literal["coco", "kitti"] | None, _choice(
        ("coco", "kitti"), "detection_format", "spec_invalid",
        "set detection_format=coco (a COCO json) or detection_format=kitti (a folder of .txt labels)")] = Field(
        None, description="coco | kitti: how the detection files are read; required with either file")
    rare_class_list: RareClassList = Field(
        default_factory=list, description="comma-separated rare classes (class_stratified), compared with each "
                                          "image's classes (detection file, else `label`); any case")
    save_embeddings: BoolWord = Field(False, description="add the vectors to the per-pass parquets")
    visualize: BoolWord = Field(False, description="draw viz_class_<group>.png into output_dir per group (a rare "
                                                   "class, non_rare, or global): each target, then the pool "
                                                   "images it claimed with their distances")
    block_rows: int = Field(32768, ge=1, description="pool rows searched at a time")
    # ours: the near-duplicate rule while claiming, on the matcher's L2-normalised vectors
    dedup_similarity: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False,
        description="cosine only (ours): a pool file within this similarity of a file already held is never "
                    "claimed, listed in near_duplicates.parquet (default off)")
    dedup_distance: float | None = Field(
        None, ge=0.0, allow_inf_nan=False,
        description="euclidean / manhattan only (ours): a pool file within this distance of a file already held "
                    "is never claimed (default off)")

    @property
    def dedup(self) -> float | None:
        """The near-duplicate threshold on the metric's own scale, None when off."""
        return self.dedup_similarity if self.distance_metric is Metric.cosine else self.dedup_distance

    @model_serializer(mode="wrap")
    def _omit_off(self, handler: Any, info: SerializationInfo) -> Any:
        """A spec without the collapse reads as it did before the keys existed (but a schema asked for
        every key, context all_keys: --cfg=job's blank spec, lists them)."""
        data = handler(self)
        if (info.context or {}).get("all_keys"):
            return data
        drop = {key for key in ("dedup_similarity", "dedup_distance", "leaks_parquet", "protected_parquet",
                                "pool_image_root") if getattr(self, key) is None}
        return {key: value for key, value in data.items() if key not in drop} if isinstance(data, dict) else data

    def pool_root(self) -> Path:
        """Where the pool's relative filepaths resolve: pool_image_root, else source_path's folder (or
        source_path itself, a folder of parquets)."""
        if self.pool_image_root:
            return Path(self.pool_image_root).expanduser().absolute()
        source = Path(self.source_path).expanduser().absolute()
        return source if source.is_dir() else source.parent

    @model_validator(mode="after")
    def _dedup_on_its_scale(self) -> "UniqueMatchingSpec":
        if self.dedup_similarity is not None and self.distance_metric is not Metric.cosine:
            raise DeftError("spec_invalid", f"dedup_similarity is a cosine similarity threshold, but distance_metric="
                            f"{self.distance_metric.value} scores distances", field="dedup_similarity",
                            fix=f"use dedup_distance=D with distance_metric={self.distance_metric.value}")
        if self.dedup_distance is not None and self.distance_metric is Metric.cosine:
            raise DeftError("spec_invalid", "dedup_distance is a distance threshold, but distance_metric=cosine "
                            "scores similarities", field="dedup_distance",
                            fix="use dedup_similarity=S (between -1 and 1) with distance_metric=cosine")
        return self

    @model_validator(mode="after")
    def _policy_has_classes(self) -> "UniqueMatchingSpec":
        if self.allocation_policy is AllocationPolicy.class_stratified and not self.rare_class_list:
            raise DeftError("spec_invalid", "allocation_policy=class_stratified needs rare_class_list: the classes "
                            "the budget is split over", fix="pass rare_class_list=CLASS_A,CLASS_B (the `label` "
                            "values of the rare classes), or allocation_policy=global", field="rare_class_list")
        given = [key for key in ("source_detection_file", "target_detection_file") if getattr(self, key)]
        if given and self.detection_format is None:
            raise DeftError("spec_invalid", f"{given[0]} is given but detection_format is not: the format is "
                            "declared, never guessed from the path (the container's rule)",
                            fix="set detection_format=coco (a COCO json) or detection_format=kitti (a folder of "
                                ".txt labels)", field="detection_format")
        return self


def recorded_floor(spec: Mapping[str, Any], metric: str | None) -> tuple[str, float] | None:
    """A recorded mining spec's floor (run.json, a run folder's YAML) in our terms: `min_similarity`
    for cosine, else `max_distance`, however it was given (ours, or the container's
    distance_threshold, a cosine distance being 1 - similarity); None when off."""
    for key in ("min_similarity", "max_distance"):
        if spec.get(key) is not None:
            return key, spec[key]
    threshold = spec.get("distance_threshold")
    if threshold is None or threshold < 0:
        return None
    return ("min_similarity", 1 - threshold) if metric == "cosine" else ("max_distance", threshold)


SpecT = TypeVar("SpecT", bound=_Spec)


def load_spec(
    cls: type[SpecT],
    spec_path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> SpecT:
    """The spec from a YAML file with overrides on top (a mapping, or `key=value` strings)."""
    config = OmegaConf.create({}) if spec_path is None else _load_yaml(Path(spec_path))
    try:
        over = OmegaConf.create(dict(overrides) if isinstance(overrides, Mapping) else _dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise DeftError("spec_invalid", f"cannot parse overrides {list(overrides)}: {exc}",
                        fix="write each override as key=value") from exc
    merged = OmegaConf.merge(config, over)
    where = f"{spec_path}" if spec_path else "overrides"
    for key in merged.keys():
        if key not in cls.model_fields:
            raise _unknown_key(str(key), list(cls.model_fields), f"{where}: unknown key '{key}' for {cls.__name__}")
    for key in merged.keys():
        if OmegaConf.is_missing(merged, key):
            raise DeftError(
                "spec_missing_value",
                f"{where}: '{key}' is required but set to ??? (not set)",
                fix=f"set it in the spec file or pass {key}=VALUE",
                field=str(key),
            )
    values = OmegaConf.to_container(merged, resolve=True)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "spec"
        message = first["msg"].removeprefix("Value error, ")
        fix = "fix the value in the spec file or override it with key=value"
        if field == "knn_metric":
            message = f"knn_metric must be one of {', '.join(m.value for m in Metric)}; got {first.get('input')!r}"
            fix = "set knn_metric to cosine, euclidean or manhattan"
        raise DeftError("spec_invalid", f"{where}: {field}: {message}", fix=fix, field=field) from exc


def spec_to_yaml(spec: _Spec, exclude: set[str] | None = None, spelled: Mapping[str, Any] | None = None) -> str:
    """The spec as YAML, without the `exclude` keys; `spelled` values are written in place of the
    spec's own (e.g. a list as the one string another schema types it), an excluded key still left out."""
    values = spec.model_dump(mode="json", exclude=exclude)
    values.update({key: value for key, value in (spelled or {}).items() if key not in (exclude or ())})
    return OmegaConf.to_yaml(OmegaConf.create(values))


def _dotlist(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` words as strings for the spec to judge, as an MCP client's strings are (no
    YAML reading of `yes`/`on` as true on one face only); `???` stays "not set", `null` is None."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DeftError("spec_invalid", f"override {pair!r} is not key=value",
                            fix="write each override as key=value", field=pair)
        out[key.strip()] = None if value.strip().lower() in ("null", "~") else value
    return out


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise DeftError("file_not_found", f"spec file {path} does not exist",
                        fix="check the -e/-m path", path=str(path))
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: any parse failure is the user's file
        raise DeftError("spec_invalid", f"{path}: not valid YAML ({exc})", fix="fix the YAML",
                        path=str(path)) from exc
    if not OmegaConf.is_dict(config):
        raise DeftError("spec_invalid", f"{path}: the spec must be a mapping of key: value",
                        fix="write one key: value per line", path=str(path))
    return config


def _unknown_key(key: str, valid: list[str], what: str) -> DeftError:
    """spec_unknown_key, with the closest valid key when there is one."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return DeftError("spec_unknown_key", what + (f"; did you mean '{close[0]}'?" if close else
                                                  f"; valid keys: {', '.join(valid)}"),
                     fix=f"use '{close[0]}'" if close else f"use one of {', '.join(valid)}",
                     field=key, closest=close[0] if close else None)


#: Per-run paths that `run` fills in itself; the specs' only shared key is among them.
RUN_OWNED_KEYS = frozenset({"input_parquet", "output_parquet", "source_parquet", "target_parquet"})


def spec_for_key(key: str) -> type[_Spec]:
    """Which spec a run-level override belongs to (the two specs share no settable key)."""
    if key in RUN_OWNED_KEYS:
        raise DeftError("spec_invalid", f"'{key}' is set by run itself (inside the run folder)",
                        fix="give targets/source and output_dir/run_dir instead", field=key)
    if key in EmbeddingSpec.model_fields:
        return EmbeddingSpec
    if key in MiningSpec.model_fields:
        return MiningSpec
    valid = [k for k in (*EmbeddingSpec.model_fields, *MiningSpec.model_fields) if k not in RUN_OWNED_KEYS]
    raise _unknown_key(key, valid, f"unknown key '{key}'")


def split_overrides(
    overrides: Mapping[str, Any] | Sequence[str],
) -> tuple[dict[str, Any] | list[str], dict[str, Any] | list[str]]:
    """Route run-level overrides (a mapping or `key=value` strings) to the embedding and the
    mining spec."""
    if isinstance(overrides, Mapping):
        embedding = {k: v for k, v in overrides.items() if spec_for_key(k) is EmbeddingSpec}
        return embedding, {k: v for k, v in overrides.items() if k not in embedding}
    embedding_pairs: list[str] = []
    mining_pairs: list[str] = []
    for pair in overrides:
        if "=" not in pair:
            raise DeftError("spec_invalid", f"override {pair!r} is not key=value",
                            fix="write overrides as key=value", field=pair)
        side = spec_for_key(pair.split("=", 1)[0].strip())
        (embedding_pairs if side is EmbeddingSpec else mining_pairs).append(pair)
    return embedding_pairs, mining_pairs
