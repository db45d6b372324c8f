"""The choose tool: which encoder, which topn and which floor, measured by leave-one-out label
agreement on a label-stratified sample of the user's own labelled images."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deft_mine.backends import Backend, resolve
from deft_mine.engine import changenet as cn
from deft_mine.engine import choice, tables
from deft_mine.engine.listings import Listing, open_listing, write_listing
from deft_mine.engine.mining import label_keys
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.report.choice_pictures import draw_choice
from deft_mine.schemas import artifacts
from deft_mine.schemas.inputs import ChooseInput, EncoderChoice
from deft_mine.schemas.results import ChooseResult, EncoderScore, ErrorInfo, FloorSuggestion
from deft_mine.schemas.specs import EmbeddingSpec, Metric, MiningSpec, load_spec, spec_to_yaml
from deft_mine.schemas.warnings import ToolWarning, picture_failed
from deft_mine.tools.embed import embed_spec
from deft_mine.tools.registry import Tool, ToolContext, register

LABEL = "label"
# Ties at topn go to the cheaper encoder: a fixed order by model (a weight-free thumbnail, then the
# vision-only DINOv2, then the two-tower models by their usual size, any `hf` model last).
COST_ORDER = {"thumbnail": 0, "DINOv2": 1, "CLIP": 2, "SigLIP": 3, "hf": 4}
# The built-in candidates tried by default (each only where its weights load here).
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"model": "thumbnail"},
    {"model": "DINOv2", "model_path": "facebook/dinov2-base", "pooling": "cls"},
    {"model": "DINOv2", "model_path": "facebook/dinov2-base", "pooling": "mean"},
    {"model": "CLIP", "model_path": "openai/clip-vit-base-patch32"},
    {"model": "SigLIP", "model_path": "google/siglip-base-patch16-224"},
)
_ENCODER_KEYS = ("model", "model_path", "pooling", "model_config_path", "batch_size", "device")
# An encoder whose embedding fails with one of these is unavailable here; the others are scored.
_UNAVAILABLE = {"model_load_failed", "model_kind_mismatch", "pooling_unsupported", "backend_unsupported",
                "gpu_unavailable", "spec_missing_value"}


def choose_encoder(inputs: ChooseInput, ctx: ToolContext) -> ChooseResult:
    """Measure, on the user's own labelled images, which encoder to mine with, which topn and which
    floor. A label-stratified sample of `listing` (`sample` images, every image when fewer; the same
    seed, the same sample) is embedded with each candidate encoder through the embedding store (a later
    run reuses the vectors); each is scored by leave-one-out label agreement: for every sampled image,
    the share of its k nearest other images (exact cosine similarity) that carry its label (compared as
    the container compares labels), for k = 1…k_max, averaged per label and then over the labels, with
    a binomial standard error. With `targets`, also each target's topn sample neighbours. Picks the
    best at `topn` (exact ties: the cheaper encoder, thumbnail < DINOv2 < CLIP < SigLIP < hf; within two
    standard errors: "no clear winner"), suggests topn (the largest n within `tolerance` of n = 1) and
    min_similarity, and writes choice.json, embedding_spec.yaml and mining_spec.yaml (ready for `run`),
    encoder_choice.png and Encoder_Choice.md into output_dir. An encoder that cannot load here is
    listed as unavailable with its error. Run it before the first round of a new pool."""
    started = time.perf_counter()
    _check_numbers(inputs)
    backend = resolve(inputs.backend_options())
    if not backend.capabilities.loads_encoders_here:
        raise DeftError("backend_unsupported", f"choose loads each candidate encoder in this process, which the "
                        f"{backend.name} backend does not", fix="use backend=local (the default) for choose",
                        field="backend", backend=backend.name)
    out = _output_folder(inputs.output_dir)
    candidates = _candidates(inputs.encoders)
    pool, keys = _labelled_listing(inputs, ctx)
    rows = choice.stratified_sample(keys, inputs.sample, inputs.seed)
    _check_sample(inputs, len(rows))
    sampled = write_listing(_taken(pool, rows), out / artifacts.CHOICE_SAMPLE)
    targets = _targets(inputs, ctx, out)
    store = ctx.store_for(inputs.store, inputs.no_store)
    scores, found, warned = [], {}, []
    for index, (name, keys_given, probe) in enumerate(candidates):
        ctx.events.progress("choose", index, len(candidates), name)
        score, scored, embed_warnings = _score(name, keys_given, probe, inputs, sampled, targets, backend,
                                                store, ctx, out)
        scores.append(score)
        warned += [w for w in embed_warnings if w.model_dump() not in [x.model_dump() for x in warned]]
        if scored is not None:
            found[name] = scored
    ctx.events.progress("choose", len(candidates), len(candidates), "scored")
    result = _decide(inputs, out, scores, found, pool.rows, keys, rows, warned)
    result.timings = {"total": time.perf_counter() - started}
    root = str(Path(inputs.image_root).expanduser().absolute()) if inputs.image_root else None
    _write(result, scores, found[result.pick], out, root)
    return result


def _check_numbers(inputs: ChooseInput) -> None:
    if inputs.sample < 10:
        raise DeftError("sample_too_small", f"sample={inputs.sample}: agreement on fewer than 10 images is noise",
                        fix="pass sample=10 or more (default 2000)", field="sample", sample=inputs.sample)
    if inputs.k_max < 1:
        raise DeftError("spec_invalid", f"k_max={inputs.k_max}: agreement needs at least one neighbour",
                        fix="pass k_max=1 or more (default 20)", field="k_max", k_max=inputs.k_max)
    if inputs.k_max >= inputs.sample:
        raise DeftError("k_max_too_large", f"k_max={inputs.k_max} must be at most sample - 1 "
                        f"({inputs.sample - 1}): each image's neighbours are the other sampled images",
                        fix=f"pass k_max below {inputs.sample} (default 20), or a larger sample", field="k_max",
                        k_max=inputs.k_max, sample=inputs.sample)
    if not 1 <= inputs.topn <= inputs.k_max:
        raise DeftError("spec_invalid", f"topn={inputs.topn} must lie between 1 and k_max={inputs.k_max}: the "
                        "encoders are compared at topn", fix=f"pass topn between 1 and {inputs.k_max}, or a "
                        "larger k_max", field="topn", topn=inputs.topn, k_max=inputs.k_max)


def _check_sample(inputs: ChooseInput, sampled: int) -> None:
    """k_max against the images there are (the listing may hold fewer than `sample`)."""
    if inputs.k_max >= sampled:
        raise DeftError("k_max_too_large", f"k_max={inputs.k_max} but the listing has only {sampled} labelled "
                        "images: each image's neighbours are the other sampled images", field="k_max",
                        fix=f"pass k_max below {sampled}", k_max=inputs.k_max, sample=sampled)


def _output_folder(output_dir: str) -> Path:
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise DeftError("output_not_writable", f"output_dir {out} is a file, not a folder",
                        fix="choose a folder for output_dir", field="output_dir", path=str(out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _candidates(given: list[EncoderChoice] | None) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, spec keys, probe the cache first) per candidate: the given ones, each checked as
    embedding spec keys now; or the built-in ones, tried only where their weights are cached here."""
    if not given:
        return [(_name(keys), keys, keys["model"] != "thumbnail") for keys in DEFAULT_CANDIDATES]
    keyed = [_keys_of(item, f"encoders[{index}]") for index, item in enumerate(given)]
    out, seen = [], set()
    for index, (keys, name) in enumerate(zip(keyed, _names(keyed))):
        if name in seen:
            raise DeftError("spec_invalid", f"encoders[{index}] ({name}) is named twice", field=f"encoders[{index}]",
                            fix="name each candidate encoder once")
        seen.add(name)
        out.append((name, keys, False))
    return out


def _keys_of(item: EncoderChoice, field: str) -> dict[str, Any]:
    """A candidate as embedding spec keys: a model name, 'key=value …' words, or a mapping."""
    if isinstance(item, str):
        words = item.split()
        item = {"model": item.strip()} if len(words) == 1 and "=" not in item else \
            dict(word.split("=", 1) for word in words if "=" in word)
    stray = [key for key in item if key not in _ENCODER_KEYS]
    if stray or "model" not in item:
        raise DeftError("spec_invalid", f"{field}: {'unknown key ' + repr(stray[0]) if stray else 'no model'}; a "
                        f"candidate encoder takes {', '.join(_ENCODER_KEYS)}", field=field,
                        fix="give a model name (thumbnail, SigLIP, CLIP, DINOv2) or e.g. "
                            "{\"model\": \"hf\", \"model_path\": \"/models/vit\", \"pooling\": \"mean\"}")
    try:
        spec = load_spec(EmbeddingSpec, None, {k: v for k, v in item.items()})
    except DeftError as exc:
        raise DeftError(exc.code, f"{field}: {exc.message}", fix=exc.fix, **{**exc.details, "field": field}) from exc
    if spec.is_tao_checkpoint:
        raise DeftError("backend_unsupported", f"{field}: model={spec.model} is a TAO checkpoint, which only the "
                        "docker backend runs; choose runs locally", field=field,
                        fix="compare SigLIP, CLIP, DINOv2, hf or thumbnail here")
    keys = {"model": spec.model}
    if spec.model != "thumbnail":  # a local folder absolute, so the written spec runs from any directory
        local = Path(str(spec.model_path)).expanduser()
        keys["model_path"] = str(local.absolute()) if local.exists() else spec.model_path
    if spec.asked_pooling is not None:
        keys["pooling"] = spec.asked_pooling
    return keys | {k: getattr(spec, k) for k in ("batch_size", "device") if k in item}


def _name(keys: dict[str, Any], where: str | None = None) -> str:
    """e.g. 'DINOv2 (mean)', 'hf vit (cls)': the model path's folder name (`where`: more of the path)."""
    model = keys["model"]
    if model == "thumbnail":
        return "thumbnail"
    path = str(keys.get("model_path", ""))
    default = next((c for c in DEFAULT_CANDIDATES if c["model"] == model), {})
    where = "" if path == default.get("model_path") else f" {where or Path(path).name or path}"
    return f"{model}{where}" + (f" ({keys['pooling']})" if keys.get("pooling") else "")


def _names(keyed: list[dict[str, Any]]) -> list[str]:
    """Each candidate's name; where two different model paths end in the same folder name, each gets as
    much of its path as tells it apart (the name is also its embeddings file's name)."""
    names = [_name(keys) for keys in keyed]
    for name in set(names):
        clash = [i for i, other in enumerate(names) if other == name]
        paths = {str(Path(keyed[i].get("model_path", ""))) for i in clash}
        if len(paths) > 1:  # the same folder twice (however spelled) stays one name: refused as named twice
            for i in clash:
                names[i] = _name(keyed[i], _telling_tail(str(Path(keyed[i]["model_path"])), paths))
    return names


def _telling_tail(path: str, paths: set[str]) -> str:
    """The fewest trailing parts of `path` that no other of `paths` ends with (else the whole path)."""
    parts = Path(path).parts
    others = [Path(other).parts for other in paths if other != path]
    for depth in range(2, len(parts) + 1):
        if all(other[-depth:] != parts[-depth:] for other in others):
            return str(Path(*parts[-depth:]))
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _labelled_listing(inputs: ChooseInput, ctx: ToolContext) -> tuple[Listing, list[str | None]]:
    """The listing read whole, and each row's label key (None: null or blank, never sampled);
    refused without a label column or with fewer than two labels."""
    root = Path(inputs.image_root).expanduser().absolute() if inputs.image_root else None
    options = inputs.changenet_options()
    cn.check_images_dir(options, inputs.image_root)
    path = tables.require_file(Path(inputs.listing).expanduser().absolute(), "listing")
    listing = open_listing(path, "listing", root, options)
    if ctx.policy is not None:
        ctx.policy.check_listing(listing)
    if LABEL not in listing.schema.names:
        raise DeftError("label_column_missing", f"listing {path} has no '{LABEL}' column: label agreement needs "
                        f"each image's label (its columns: {', '.join(listing.schema.names)})", field="listing",
                        fix="give a listing with a label column (the pool's defect classes, or a labelled sample "
                            "of it)", path=str(path), columns=list(listing.schema.names))
    table = listing.table if listing.table is not None else tables.read_columns(path, listing.schema.names)
    keys = [key or None for key in label_keys(table.column(LABEL)).to_pylist()]
    distinct = sorted({key for key in keys if key is not None})
    if len(distinct) < 2:
        raise DeftError("single_label", f"listing {path} carries {len(distinct)} distinct label(s) "
                        f"({', '.join(distinct) or 'none'}): agreement with one label is always 1", field="listing",
                        fix="give a listing with two or more labels (e.g. the defect classes and OK)",
                        path=str(path), labels=distinct)
    return dataclasses.replace(listing, table=table), keys


def _taken(listing: Listing, rows: np.ndarray) -> Listing:
    table = listing.table.take(pa.array(rows))
    return dataclasses.replace(listing, table=table, rows=table.num_rows, unresolved=0, unresolved_examples=())


def _targets(inputs: ChooseInput, ctx: ToolContext, out: Path) -> Listing | None:
    if inputs.targets is None:
        return None
    path = tables.require_file(Path(inputs.targets).expanduser().absolute(), "targets")
    root = Path(inputs.image_root).expanduser().absolute() if inputs.image_root else None
    listing = open_listing(path, "targets", root, inputs.changenet_options())
    if ctx.policy is not None:
        ctx.policy.check_listing(listing)
    return write_listing(listing, out / artifacts.CHOICE_TARGETS)


def _score(name: str, keys: dict[str, Any], probe: bool, inputs: ChooseInput, sampled: Listing,
           targets: Listing | None, backend: Backend, store: Path | None, ctx: ToolContext, out: Path
           ) -> tuple[EncoderScore, choice.Agreement | None, list[ToolWarning]]:
    """One candidate: embedded (or listed as unavailable, with why) and scored."""
    score = EncoderScore(name=name, spec=keys, available=False, cost_rank=COST_ORDER.get(keys["model"], 9))
    if probe and (missing := _not_cached(keys["model_path"])) is not None:
        score.error = ErrorInfo.of(missing)
        return score, None, []
    spec = EmbeddingSpec(**keys, image_root=inputs.image_root)
    embedded = out / artifacts.choice_embeddings(_slug(name))
    ctx = dataclasses.replace(ctx, lock=None)  # choose compares encoders: it binds the session to none of them
    try:
        done = embed_spec(spec.model_copy(update={"input_parquet": str(sampled.path),
                                                  "output_parquet": str(embedded)}),
                          backend, store, ctx.stage(f"embed {name}"), sampled)
        tdone = None if targets is None else embed_spec(spec.model_copy(update={
            "input_parquet": str(targets.path), "output_parquet": str(out / artifacts.choice_embeddings(
                _slug(name), targets=True))}), backend, store, ctx.stage(f"embed targets {name}"), targets)
    except Cancelled:
        raise
    except DeftError as exc:
        if exc.code not in _UNAVAILABLE:
            raise
        score.error = ErrorInfo.of(exc)
        return score, None, []
    vectors, labels = _read_vectors(embedded)
    if len(vectors) <= inputs.k_max:
        raise DeftError("no_readable_images" if not len(vectors) else "k_max_too_large",
                        f"only {len(vectors)} of the {sampled.rows} sampled images could be read with {name}",
                        fix="check the listing's paths and image_root, or lower k_max", field="k_max",
                        k_max=inputs.k_max, readable=len(vectors))
    found = _fill(score, vectors, labels, tdone.output_parquet if tdone else None, inputs)
    score.available, score.embeddings_parquet = True, str(embedded)
    score.embedded, score.reused = done.embedded, done.reused
    score.seconds_per_image = done.timings.get("total", 0.0) / done.embedded if done.embedded else None
    return score, found, [*done.warnings, *(tdone.warnings if tdone else [])]


def _not_cached(model_path: str) -> DeftError | None:
    """A built-in candidate whose hub checkpoint this machine has not downloaded (tried only when it has)."""
    if Path(model_path).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_path, "config.json"), str):
        return None
    return DeftError("model_load_failed", f"model_path {model_path!r}: not in this machine's Hugging Face cache, "
                     "so not tried", fix=f"download it once (huggingface-cli download {model_path}), or name a "
                     "local folder in encoders", field="model_path")


def _read_vectors(path: Path) -> tuple[np.ndarray, list[str]]:
    table = tables.read_columns(path, ["embedding", LABEL])
    vectors = tables.vectors_from_column(table.column("embedding"), path=path, name="embedding", first_row=0,
                                         dim=None)
    return vectors, label_keys(table.column(LABEL)).to_pylist()


def _fill(score: EncoderScore, vectors: np.ndarray, labels: list[str], target_parquet: str | None,
          inputs: ChooseInput) -> choice.Agreement:
    """The agreement curves, the similarity quantiles and (with targets) the targets' scores."""
    found = choice.agreement(vectors, labels, inputs.k_max)
    score.agreement, score.standard_error = found.macro.tolist(), found.macro_se.tolist()
    score.at_topn, score.at_topn_se = float(found.macro[inputs.topn - 1]), float(found.macro_se[inputs.topn - 1])
    score.per_label = {name: values.tolist() for name, values in found.per_label.items()}
    score.images = dict(found.images)
    score.same_label_similarity = choice.quantiles(found.same_similarities)
    score.cross_label_similarity = choice.quantiles(found.cross_similarities)
    if target_parquet is not None:
        table = tables.read_columns(Path(target_parquet), tables.schema_of(Path(target_parquet)).names)
        tvectors = tables.vectors_from_column(table.column("embedding"), path=Path(target_parquet),
                                              name="embedding", first_row=0, dim=None)
        tkeys = label_keys(table.column(LABEL)).to_pylist() if LABEL in table.column_names else [None] * len(tvectors)
        score.target_agreement, score.target_per_label, score.targets_scored = choice.target_agreement(
            tvectors, [key or None for key in tkeys], vectors, labels, inputs.topn)
    return found


def _decide(inputs: ChooseInput, out: Path, scores: list[EncoderScore],
            found: dict[str, choice.Agreement], listing_rows: int, keys: list[str | None],
            rows: np.ndarray, warned: list[ToolWarning]) -> ChooseResult:
    """The pick (best at topn, exact ties to the cheaper), whether it is clear, and the suggestions."""
    ranked = sorted((s for s in scores if s.available), key=lambda s: (-s.at_topn, s.cost_rank, s.name))
    if not ranked:
        raise DeftError("no_encoder_available", "none of the candidate encoders could be loaded here: "
                        + "; ".join(f"{s.name}: {s.error.message if s.error else '?'}" for s in scores),
                        fix="include model=thumbnail (it needs no weights), or name a local folder saved with "
                            "save_pretrained", field="encoders")
    pick, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    margin = noise = None
    clear = True
    if runner is not None:
        margin = pick.at_topn - runner.at_topn
        noise = float(np.hypot(pick.at_topn_se, runner.at_topn_se))
        clear = margin > 2.0 * noise
    floor = choice.suggest_floor(found[pick.name].same_similarities, found[pick.name].cross_similarities)
    sampled = [keys[r] for r in rows]
    per_label = {name: sampled.count(name) for name in sorted(set(sampled))}
    # the counts the pick's score rests on: a sampled image that failed to embed is not among them
    return ChooseResult(
        output_dir=str(out), choice_json=str(out / artifacts.CHOICE),
        embedding_spec=str(out / artifacts.EMBEDDING_SPEC), mining_spec=str(out / artifacts.MINING_SPEC),
        report=str(out / artifacts.CHOICE_REPORT), plot=str(out / artifacts.CHOICE_PLOT),
        metric=Metric.cosine.value, sample=len(rows), listing_rows=listing_rows,
        unlabelled=sum(key is None for key in keys), sampled_per_label=per_label,
        scored_images=sum(pick.images.values()),
        unscored_labels=[name for name in per_label if name not in pick.images], k_max=inputs.k_max, topn=inputs.topn,
        seed=inputs.seed, encoders=scores, pick=pick.name, clear_winner=clear,
        runner_up=runner.name if runner else None, margin=margin, noise=noise,
        suggested_topn=choice.suggest_topn(np.asarray(pick.agreement), inputs.tolerance), tolerance=inputs.tolerance,
        floor=FloorSuggestion(min_similarity=floor.value, reason=floor.reason, pairs=floor.pairs, below=floor.below,
                              below_cross_label_share=floor.below_cross, above=floor.above,
                              above_same_label_share=floor.above_same),
        warnings=warned)


def _write(result: ChooseResult, scores: list[EncoderScore], agreement: choice.Agreement, out: Path,
           image_root: str | None) -> None:
    """The specs for `run`, the plot (one that fails is a warning on the result), Encoder_Choice.md and
    choice.json (last: it says the rest is there)."""
    from deft_mine.report.choice_render import render_choice

    pick = next(s for s in scores if s.name == result.pick)
    embedding = EmbeddingSpec(**{k: v for k, v in pick.spec.items() if k != "device"}, image_root=image_root)
    tables.write_text_atomic(Path(result.embedding_spec), spec_to_yaml(
        embedding, exclude={"input_parquet", "output_parquet", "workers"} | ({"image_root"} if not image_root else set())))
    floor = {"min_similarity": result.floor.min_similarity} if result.floor.min_similarity is not None else {}
    mining = MiningSpec(topn=result.suggested_topn, knn_metric=Metric.cosine, **floor)
    tables.write_text_atomic(Path(result.mining_spec), spec_to_yaml(
        mining, exclude={"source_parquet", "target_parquet", "output_parquet", "leaks_parquet"}))
    try:
        draw_choice(Path(result.plot), [(s.name, s.agreement) for s in scores if s.available], result.topn,
                    pick.name, agreement.same_similarities, agreement.cross_similarities, result.floor.min_similarity)
    except Exception as exc:  # noqa: BLE001 - a picture is never worth losing the choice
        result.warnings.append(picture_failed(Path(result.plot).name, exc))
    tables.write_text_atomic(Path(result.report), render_choice(result))
    tables.write_text_atomic(Path(result.choice_json), result.model_dump_json(indent=2))


choose = register(Tool("choose", "Choose the encoder, topn and floor",
                       "score candidate encoders (and topn, a floor) by label agreement on a labelled listing",
                       ChooseInput, ChooseResult, choose_encoder, idempotent=True))
