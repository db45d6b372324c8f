"""The run tool: embed targets and pool, mine, and leave an auditable run folder (a RunFolder:
its paths, and run.json, "running" first, then "finished", "failed" or "interrupted")."""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from deft_mine import __version__
from deft_mine.backends import Backend, resolve
from deft_mine.engine import changenet as cn
from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.engine import training_rows
from deft_mine.engine.listings import FILEPATH, TEXT, Listing, open_listing, text_listing, write_listing
from deft_mine.engine.mining import label_counts
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.report import write_report
from deft_mine.schemas import artifacts
from deft_mine.schemas.inputs import PassGolden, RunInput, SelectInput
from deft_mine.schemas.manifest import (EmbedFacts, Embeddings, EncoderFacts, InputFacts, Inputs, LabelCounts,
                                        MiningFacts, RunManifest, TrainingRowsFacts)
from deft_mine.schemas.results import (EmbedResult, ErrorInfo, MatchResult, MineResult, RunResult, SelectResult,
                                       TrainingRowsResult)
from deft_mine.schemas.warnings import ToolWarning
from deft_mine.schemas.specs import EmbeddingSpec, LabelFilter, MiningSpec, load_spec, spec_to_yaml, split_overrides
from deft_mine.tools import run_leaks, run_unique
from deft_mine.tools.embed import embed_spec, require_text_embedding
from deft_mine.tools.mine import mine_spec
from deft_mine.tools.preflight import label_precheck
from deft_mine.tools.registry import Tool, ToolContext, register
from deft_mine.tools.select import check_history, history_facts, select_new


RUNS_FOLDER = "mining_results"
TIMESTAMP = "%Y-%m-%d_%H%M%S"


class RunFolder:
    """A new, empty folder of one run: the paths of its artifacts, and run.json."""

    def __init__(self, path: Path, history: bool) -> None:
        self.path, self.manifest = path, RunManifest()
        self.listings = {"targets": path / artifacts.TARGET_LISTING, "source": path / artifacts.SOURCE_LISTING}
        self.embeddings = {"targets": path / artifacts.TARGET_EMBEDDINGS, "source": path / artifacts.SOURCE_EMBEDDINGS}
        self.mined, self.pairs = path / artifacts.MINED, path / artifacts.PAIRS
        # With a history ledger, mining writes the candidates and selection writes mined.parquet.
        self.candidates = path / artifacts.CANDIDATES if history else self.mined

    @classmethod
    def make(cls, output_dir: str | Path | None, run_dir: str | Path | None, history: bool) -> "RunFolder":
        """`run_dir` exactly (new or empty), or a new timestamped folder under `output_dir`."""
        if (output_dir is None) == (run_dir is None):
            raise DeftError("spec_invalid", "give exactly one of output_dir and run_dir",
                            fix="--output-dir DIR (a new timestamped folder inside) or --run-dir DIR",
                            field="output_dir")
        if run_dir is not None:
            folder = Path(run_dir).expanduser().absolute()
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise DeftError("run_dir_exists", f"run_dir {folder} already exists and is not empty; "
                                "refusing to mix a new run into it", fix="choose a new run_dir, or use "
                                "output_dir for a fresh timestamped folder", field="run_dir")
            folder.mkdir(parents=True, exist_ok=True)
            return cls(folder, history)
        parent = Path(output_dir).expanduser().absolute() / RUNS_FOLDER
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a second run within the same second waits for the next one
            folder = parent / dt.datetime.now().strftime(TIMESTAMP)
            try:
                folder.mkdir()
                return cls(folder, history)
            except FileExistsError:
                time.sleep(1.0 - (time.time() % 1.0) + 0.01)
        raise DeftError("run_dir_exists", f"could not create a fresh folder under {parent}",
                        fix="retry in a second", field="output_dir")

    @contextlib.contextmanager
    def running(self, embedding: EmbeddingSpec, mining: MiningSpec, **facts: Any) -> Iterator[RunManifest]:
        """run.json first, "running" (a process killed outright never looks finished), then the specs;
        every way out of the block that Python sees, but `finish`, rewrites run.json saying why."""
        self.manifest = RunManifest(
            deft_mine_version=__version__, status="running", host=platform.node(), run_dir=str(self.path),
            started_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"), **facts,
            embedding_spec=embedding.model_dump(mode="json", exclude={"input_parquet", "output_parquet"}),
            mining_spec=mining.model_dump(mode="json"))
        self._save()
        try:
            tables.write_text_atomic(self.path / artifacts.EMBEDDING_SPEC, spec_to_yaml(
                embedding.model_copy(update={"input_parquet": None, "output_parquet": None})))
            tables.write_text_atomic(self.path / artifacts.MINING_SPEC, spec_to_yaml(mining))
            yield self.manifest
        except BaseException as exc:  # the folder says why it is incomplete, then the error goes on up
            self._record_stop(exc)
            raise

    def record_mining_spec(self, mining: MiningSpec) -> None:
        """The mining spec rewritten as it will mine (the leakage guard adds protected_parquet or leaks_parquet)."""
        tables.write_text_atomic(self.path / artifacts.MINING_SPEC, spec_to_yaml(mining))
        self.manifest.mining_spec = mining.model_dump(mode="json")
        self._save()

    def finish(self) -> None:
        """run.json "finished", naming every artifact (the report comes after)."""
        self.manifest.status = "finished"
        self.manifest.finished_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        names = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
        self.manifest.artifacts = names + [artifacts.MANIFEST]
        self._save()

    def _save(self) -> None:
        tables.write_text_atomic(self.path / artifacts.MANIFEST, self.manifest.dump())

    def _record_stop(self, exc: BaseException) -> None:
        """Rewrite run.json for a run that stops early: "interrupted" when stopped from outside
        (Ctrl-C, SIGTERM, an MCP cancel), else "failed", with the error either way."""
        manifest = self.manifest
        if isinstance(exc, (KeyboardInterrupt, Cancelled)):
            manifest.status = "interrupted"
            manifest.error = ErrorInfo(code="cancelled" if isinstance(exc, Cancelled) else "interrupted",
                                       message=str(exc) or "interrupted (SIGINT)",
                                       fix="run the same command again (into a new run folder): the "
                                           "embedding store, unless switched off, supplies the vectors already made")
        elif isinstance(exc, DeftError):
            manifest.status, manifest.error = "failed", ErrorInfo.of(exc)
        elif isinstance(exc, Exception):
            manifest.status = "failed"
            manifest.error = ErrorInfo(code="internal_error", message=str(exc) or repr(exc))
        else:  # SystemExit, GeneratorExit: not ours to describe; run.json keeps saying "running"
            return
        try:
            self._save()
        except DeftError:  # e.g. the disk is full: run.json keeps saying "running", which is true enough
            pass
        # A signal can land between a temp file's creation and the block that removes it on the way
        # out; the folder is this run's alone, so its temp names go too.
        for stray in self.path.glob(".*.tmp"):
            stray.unlink(missing_ok=True)


def run_workflow(inputs: RunInput, ctx: ToolContext) -> RunResult:
    """Embed targets and pool with one encoder, mine, and write a new run folder
    (embedding_spec.yaml, mining_spec.yaml, both embedding parquets, mined.parquet,
    mining_summary.txt, run.json). Give exactly one of output_dir and run_dir; a run never
    reuses a non-empty folder. Overrides go to whichever spec owns the key. With `history`
    (a ledger), mining writes mined_candidates.parquet and mined.parquet keeps only images no
    earlier iteration selected (the next iteration number is taken from the ledger). With
    mode=unique (and desired_unique_count), mining is `tmm unique_neighbor_matching`: a budget of
    unique pool images, one target each, its files in unique_matching/ and mined.parquet the files
    selected (a ledger's earlier selections are excluded from the budget)."""
    started = time.perf_counter()
    sentences = _sentences(inputs)  # None: the targets are a listing
    paths = {name: tables.require_file(Path(value).expanduser().absolute(), name)
             for name, value in (("targets", inputs.targets), ("source", inputs.source)) if value is not None}
    for field in ("ledger_format", "max_cumulative_fraction") if inputs.history is None else ():
        if getattr(inputs, field) is not None:  # a ledger's option without a ledger: refused, never ignored
            raise DeftError("spec_invalid", f"{field} applies to a history ledger, and no history was given",
                            fix=f"add --history LEDGER.json (the ledger to start or continue), or leave {field} out",
                            field=field)
    embedding, mining = _specs(inputs, ctx)
    # What can be refused without a run folder is refused before one exists.
    backend = resolve(inputs.backend_options())
    # Each side's listing, read once: checked at the door, described in run.json, and kept in the
    # run folder, where every later step reads it.
    # A ChangeNet CSV is resolved here, row by row and light by light, before anything is embedded.
    changenet = inputs.changenet_options()
    cn.check_images_dir(changenet, embedding.image_root)
    # A targets parquet of sentences (`text`, no `filepath`) is taken as sentences too.
    given = {name: open_listing(path, name, embedding.images_root(path), changenet, texts=name == "targets")
             for name, path in paths.items()}
    if ctx.policy is not None:
        for listing in given.values():
            if listing.format != "text":  # sentences name no files
                ctx.policy.check_listing(listing)
    if sentences is not None or given["targets"].format == "text":
        require_text_embedding(embedding, backend)
    # The leakage guard (mode=nearest, local or ray): its listings read and checked before any work.
    guarded = run_leaks.applies(inputs, mining, backend, sentences is not None or given["targets"].format == "text")
    protected = run_leaks.open_protected(inputs, embedding, changenet, ctx.policy) if guarded else []
    validation = _training_options(inputs, given["source"])
    if inputs.history is not None:  # a bad budget or a damaged ledger costs no embedding
        check_history(Path(inputs.history).expanduser().absolute(), inputs.ledger_format,
                      inputs.max_cumulative_fraction, given["source"].rows)
    if mining.unique:  # a backend that cannot match, or a split by labels a side lacks: before embedding
        run_unique.refuse_early(mining, backend, given)
    prechecked = label_precheck(given, mining.filter_by_label)  # the loop's yield precheck, before embedding
    for warning in prechecked:
        ctx.events.log("warning", warning.message)
    folder = RunFolder.make(inputs.output_dir, inputs.run_dir, history=inputs.history is not None)
    ctx.events.log("info", f"run folder {folder.path}")
    if sentences is not None:  # the sentences become the folder's target listing, written with the other
        paths["targets"] = folder.listings["targets"]
        given = {"targets": text_listing(sentences, paths["targets"]), "source": given["source"]}
    mining = mining.model_copy(update={"source_parquet": str(folder.embeddings["source"]),
                                       "target_parquet": str(folder.embeddings["targets"]),
                                       "output_parquet": str(folder.candidates)})
    # where the pool's relative paths resolve: mined (or claimed) byte copies are found by their files
    mining = mining.model_copy(update={"pool_image_root": str(given["source"].images_root)})
    store = ctx.store_for(inputs.store, inputs.no_store)
    described = Inputs(**{name: InputFacts(path=str(s.path), format=s.format, rows=s.rows, columns=s.schema.names,
                                           has_label="label" in s.schema.names,
                                           images_root=str(s.images_root)) for name, s in given.items()})
    with folder.running(embedding, mining, backend=inputs.backend, inputs=described) as manifest:
        if not mining.unique:  # unique mode runs the match action, whose keys the backend judges itself
            backend.accepts(mining)  # before anything is embedded
        sides = {name: write_listing(listing, folder.listings[name]) for name, listing in given.items()}
        embedded = {name: embed_spec(embedding.model_copy(update={
            "input_parquet": str(paths[name]), "output_parquet": str(folder.embeddings[name])}),
            backend, store, ctx.stage(f"embed {name}"), listing) for name, listing in sides.items()}
        _require_readable(embedded)
        tgt, src = embedded["targets"], embedded["source"]
        leaks, leak_warnings, protect_embeds, leak_seconds = None, [], [], 0.0
        if guarded:  # before the search: the leak rows go to the mining spec, whose search leaves them out
            t0 = time.perf_counter()
            leaks, leak_warnings, protect_embeds, guarded_mining = run_leaks.guard(
                inputs, protected, folder.path, mining, embedding, backend, store, ctx, sides["targets"], sides["source"])
            if guarded_mining != mining:
                mining = guarded_mining
                folder.record_mining_spec(mining)
            leak_seconds = time.perf_counter() - t0
        mine_result, matched = _mine(inputs, folder, mining, sides["source"], backend, ctx)
        if mine_result is not None and mine_result.leaks is not None:  # the guard in the search (leak_scope=mined)
            leaks = mine_result.leaks
            leak_seconds += mine_result.timings.get("leaks", 0.0)
        claimed = None if matched is None else run_unique.claimed_leaks(matched, mining)
        if claimed is not None and claimed.reported:  # mode=unique: the byte guard as the matcher claimed
            leaks, raised = run_leaks.leak_facts(claimed, mining, Path(matched.output_dir) / artifacts.LEAKS)
            leak_warnings = [*leak_warnings, *raised]
        selected, training, training_warnings = _select_and_train(inputs, folder, mining, sides["source"],
                                                                  validation, ctx, matched)
        mined_warnings = (mine_result or matched).warnings
        if any(w.code == "label_missing_in_pool" for w in mined_warnings):  # per_label's, from the rows searched
            prechecked = [w for w in prechecked if w.code != "label_missing_in_pool"]
        manifest.warnings = [*prechecked, *(w.for_side("targets") for w in tgt.warnings),
                             *(w.for_side("source") for w in src.warnings),
                             *(w.for_side("protect") for done in protect_embeds for w in done.warnings), *leak_warnings,
                             *mined_warnings, *(selected.warnings if selected else []), *training_warnings]
        manifest.timings = {"embed_targets": tgt.timings["total"], "embed_source": src.timings["total"],
                            "mine": (mine_result or matched).timings["total"], "total": time.perf_counter() - started}
        if leaks is not None:
            manifest.timings["leaks"] = leak_seconds
            manifest.leaks = leaks
        _record_results(manifest, folder, tgt, src, mine_result, selected, mining, matched)
        if training is not None:
            manifest.training_rows = TrainingRowsFacts(**training.model_dump())
        folder.finish()
    try:
        # last: it reads the rest
        written = write_report(folder.path, ctx.stage("report").events, ctx.image_allowed, ctx.invocation,
                               ctx.session, producing=True)
    except DeftError as exc:
        # run.json stays "finished": every mining output is whole (and a report regenerated later
        # must not call the run unfinished); the missing Mining_Report.md says the rest.
        raise DeftError(exc.code, f"{exc.message}; the run's mining outputs in {folder.path} are complete, only "
                        "its report is missing", fix=f"{exc.fix or 'fix the cause'}, then write the report "
                        f"with: deft-mine report {folder.path}", **exc.details) from exc
    mined = selected.newly_selected if selected else matched.retrieved_unique_count if matched else mine_result.mined
    return RunResult(run_dir=str(folder.path), mined=mined, mined_parquet=str(folder.mined), target_embed=tgt,
                     source_embed=src, mine=mine_result, match=matched, select=selected, training_rows=training,
                     leaks=manifest.leaks, report=written, timings=manifest.timings, warnings=manifest.warnings)


def _mine(inputs: RunInput, folder: RunFolder, mining: MiningSpec, pool: Listing, backend: Backend,
          ctx: ToolContext) -> tuple[MineResult | None, MatchResult | None]:
    """mode=nearest: each target's topn nearest (the mine step). mode=unique: a budget of unique pool
    files, one target each (the match step), the ledger's earlier selections excluded from it."""
    if not mining.unique:
        return mine_spec(mining, backend, ctx.stage("mine"), pairs_path=folder.pairs, loop_files=True), None
    sentences = FILEPATH not in tables.schema_of(folder.embeddings["targets"]).names  # keyed by their `text`
    paths = run_unique.UniquePaths(folder.path, folder.embeddings["targets"], folder.embeddings["source"],
                                   folder.candidates, folder.pairs, TEXT if sentences else FILEPATH)
    exclude = None if inputs.history is None else \
        run_unique.exclusions(Path(inputs.history).expanduser().absolute(), paths, pool.images_root)
    return None, run_unique.match_run(mining, paths, exclude, backend, ctx.stage("match"))


def _sentences(inputs: RunInput) -> list[str] | None:
    """`text`, checked at the door: exactly one of targets and text, and no sentence empty or blank."""
    if (inputs.targets is None) == (inputs.text is None):
        given = "both" if inputs.text is not None else "neither"
        raise DeftError("spec_invalid", f"give exactly one of targets and text (got {given}): targets names a "
                        "listing of target images (or a parquet of sentences), text the sentences themselves",
                        fix="--targets LISTING, or --text \"a sentence\" (repeatable), not both", field="text")
    if inputs.text is None:
        return None
    blank = [i for i, sentence in enumerate(inputs.text) if not sentence.strip()]
    if not inputs.text or blank:
        which = "no sentence" if not inputs.text else \
            ", ".join(f"text[{i}] ({inputs.text[i]!r})" for i in blank[:5]) + (" …" if blank[5:] else "")
        raise DeftError("spec_invalid", f"text: {which} is empty or blank; there is nothing to mine from it",
                        fix="give each --text a sentence describing the defect, e.g. "
                            "\"solder bridge between two pins\"", field="text", blank=blank)
    return list(inputs.text)


def _specs(inputs: RunInput, ctx: ToolContext) -> tuple[EmbeddingSpec, MiningSpec]:
    """Both specs, checked before any work, so a typo in the mining spec costs no embedding."""
    embed_over, mine_over = split_overrides(inputs.overrides or ())
    embedding = load_spec(EmbeddingSpec, inputs.embedding_spec_path, embed_over)
    mining = load_spec(MiningSpec, inputs.mining_spec_path, mine_over)
    ctx.check_paths(embedding)
    if ctx.lock is not None:  # refuse a different encoder before making a run folder
        with ctx.lock.bind(embedding):
            pass
    return embedding, mining


def _training_options(inputs: RunInput, pool: Listing) -> training_rows.Validation | None:
    """The training-row options, checked before any work: they need a ChangeNet pool, and the
    validation CSV must share a leak key with the training rows (read now, kept for the end)."""
    if inputs.validation_csv is None and inputs.pass_golden is PassGolden.none:
        return None
    if not cn.is_changenet(pool.schema):
        field = "validation_csv" if inputs.validation_csv is not None else "pass_golden"
        raise DeftError("not_changenet_pool", f"{field} applies to a ChangeNet pool (columns "
                        f"{', '.join(cn.COLUMNS)}), and the source {pool.path} is not one "
                        f"(columns: {', '.join(pool.schema.names)})", fix=f"leave {field} out, or give the "
                        "ChangeNet CSV as the source", field=field)
    if inputs.validation_csv is None:
        return None
    validation = training_rows.read_validation(Path(inputs.validation_csv).expanduser().absolute())
    validation.require_keys(training_rows.training_columns(pool.schema.names))
    return validation


def _select_and_train(inputs: RunInput, folder: RunFolder, mining: MiningSpec, pool: Listing,
                      validation: training_rows.Validation | None, ctx: ToolContext, matched: MatchResult | None
                      ) -> tuple[SelectResult | None, TrainingRowsResult | None, list[ToolWarning]]:
    """mined.parquet (with a ledger: the candidates no earlier iteration selected) and, from a
    ChangeNet pool, its training rows, written before the ledger records the iteration: a run
    stopped between the two leaves the iteration unrecorded (the next run mines it again), never
    recorded without its training rows."""
    if inputs.history is None:
        return None, *_training_rows(inputs, folder, pool, validation)
    made: list[tuple[TrainingRowsResult | None, list[ToolWarning]]] = []
    selected = _select(inputs, folder, _ledger_topn(mining, matched, folder), pool, ctx, lambda book, iteration: made.append(
        _training_rows(inputs, folder, pool, validation, book, iteration)))
    return selected, *made[0]


def _training_rows(inputs: RunInput, folder: RunFolder, pool: Listing, validation: training_rows.Validation | None,
                   book: ledgers.Ledger | None = None, iteration: int = 0
                   ) -> tuple[TrainingRowsResult | None, list[ToolWarning]]:
    """A ChangeNet pool's mined components as ChangeNet training rows (other pools: none); with a
    ledger, a component an earlier iteration selected an image of was a training row then: not again."""
    if not cn.is_changenet(pool.schema, listing=True):
        return None, []
    before = None if book is None else training_rows.trained_before(book, iteration, pool.images_root)
    return training_rows.make(folder.mined, folder.listings["source"], pool.images_root,
                              folder.path / artifacts.TRAINING_ROWS, inputs.pass_golden, validation, before)


def _require_readable(sides: dict[str, EmbedResult]) -> None:
    """A side none of whose images could be read stops the run: mining nothing would look finished."""
    for name, done in sides.items():
        if done.input_rows and not done.rows:
            raise DeftError("no_readable_images", f"{name}: none of the {done.input_rows} images could be "
                            f"read ({', '.join(f'{n} {r}' for r, n in done.skipped_by_reason.items())}), "
                            f"e.g. {done.skipped_examples[0] if done.skipped_examples else '?'}",
                            fix="check the paths and image_root (relative paths resolve against it)",
                            field=name, skipped_by_reason=done.skipped_by_reason)


def _ledger_topn(mining: MiningSpec, matched: MatchResult | None, folder: RunFolder) -> int:
    """The neighbours per target the ledger records: topn, or under a budget each target's first share
    (ceil(budget / targets), the first pass's topn, also when no pass ran: the pool all excluded),
    which a tao-skill ledger's resume compares."""
    if matched is None:
        return mining.topn
    targets = max(1, tables.num_rows(folder.embeddings["targets"]))
    return matched.passes[0].topn if matched.passes else -(-matched.desired_unique_count // targets)


def _select(inputs: RunInput, folder: RunFolder, topn: int, pool: Listing, ctx: ToolContext,
            before_commit: Callable[[ledgers.Ledger, int], None]) -> SelectResult:
    """mined.parquet: the candidates no earlier iteration of the ledger selected (within the
    budget, whose pool is the source listing's rows)."""
    ledger_path = Path(str(inputs.history)).expanduser().absolute()
    return select_new(SelectInput(
        candidates=str(folder.candidates), ledger=str(ledger_path), output=str(folder.mined),
        iteration=ledgers.load(ledger_path, verify=False).last_iteration + 1,  # select_new verifies it
        image_root=str(pool.images_root), topn=topn, ledger_format=inputs.ledger_format,
        max_cumulative_fraction=inputs.max_cumulative_fraction, pool_size=pool.rows), ctx.stage("select"),
        before_commit)


def _record_results(manifest: RunManifest, folder: RunFolder, tgt: EmbedResult, src: EmbedResult,
                    mine_result: MineResult | None, selected: SelectResult | None, mining: MiningSpec,
                    matched: MatchResult | None) -> None:
    manifest.encoder = EncoderFacts(target=tgt.encoder, source=src.encoder, match=tgt.encoder == src.encoder,
                                    fingerprint=tgt.encoder.fingerprint)
    manifest.embeddings = Embeddings(target=_embed_facts(tgt), source=_embed_facts(src))
    counts = label_counts(folder.embeddings["targets"], folder.embeddings["source"], folder.mined)
    labels = None if counts is None else LabelCounts(**counts)
    if matched is not None:  # a budget: no topn and no label filter, the budget's own account instead
        summary = artifacts.MiningSummary.parse((folder.path / artifacts.SUMMARY).read_text(encoding="utf-8"))
        manifest.mining = MiningFacts(summary=summary.as_dict(), label_filter=LabelFilter.off,
                                      knn_metric=mining.knn_metric.value, filter_by_label=False, labels=labels,
                                      unique=run_unique.unique_facts(matched, folder.path, mining.knn_metric))
    else:
        assert mine_result is not None  # one of the two steps ran
        manifest.mining = MiningFacts(summary=mine_result.summary, label_filter=mine_result.label_filter,
                                      knn_metric=mine_result.knn_metric, topn=mine_result.topn,
                                      filter_by_label=mine_result.filter_by_label, labels=labels,
                                      cluster=mine_result.cluster)
    manifest.history = None if selected is None else history_facts(selected)


def _embed_facts(result: EmbedResult) -> EmbedFacts:
    return EmbedFacts(**result.model_dump(include=set(EmbedFacts.model_fields)))


run = register(Tool("run", "Run the whole workflow", "embed targets and pool, mine, and write a run folder",
                    RunInput, RunResult, run_workflow, idempotent=False))
