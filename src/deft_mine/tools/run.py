"""The run tool: embed targets and pool, mine, and leave an auditable run folder."""

from __future__ import annotations

import datetime as dt
import platform
import time
from pathlib import Path

from deft_mine import __version__
from deft_mine.backends import get_backend
from deft_mine.engine import ledger as ledgers
from deft_mine.engine import tables
from deft_mine.engine.listings import Listing, open_listing
from deft_mine.engine.mining import label_counts
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled
from deft_mine.report import write_report
from deft_mine.schemas import artifacts
from deft_mine.schemas.inputs import EmbedInput, MineInput, RunInput, SelectInput
from deft_mine.schemas.manifest import (EmbedFacts, Embeddings, EncoderFacts, InputFacts, Inputs, LabelCounts,
                                        MiningFacts, RunManifest)
from deft_mine.schemas.results import EmbedResult, ErrorInfo, RunResult
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, load_spec, spec_to_yaml, split_overrides
from deft_mine.tools.embed import embed_spec
from deft_mine.tools.mine import mine_spec
from deft_mine.tools.registry import Tool, ToolContext, register
from deft_mine.tools.select import history_facts, select_new

RUNS_FOLDER = "mining_results"
TIMESTAMP = "%Y-%m-%d_%H%M%S"


def run_workflow(inputs: RunInput, ctx: ToolContext) -> RunResult:
    """Embed targets and pool with one encoder, mine, and write a new run folder
    (embedding_spec.yaml, mining_spec.yaml, both embedding parquets, mined.parquet,
    mining_summary.txt, run.json). Give exactly one of output_dir and run_dir; a run never
    reuses a non-empty folder. Overrides go to whichever spec owns the key. With `history`
    (a ledger), mining writes mined_candidates.parquet and mined.parquet keeps only images no
    earlier iteration selected (the next iteration number is taken from the ledger)."""
    started = time.perf_counter()
    targets_path = _input(inputs.targets, "targets")
    source_path = _input(inputs.source, "source")
    embed_over, mine_over = split_overrides(inputs.overrides or ())
    # Both specs are checked before any work, so a typo in the mining spec costs no embedding.
    embedding = load_spec(EmbeddingSpec, inputs.embedding_spec_path, embed_over)
    mining = load_spec(MiningSpec, inputs.mining_spec_path, mine_over)
    ctx.check_paths(embedding)
    if ctx.lock is not None:  # refuse a different encoder before making a run folder
        with ctx.lock.bind(embedding):
            pass
    # What can be refused without a run folder is refused before one exists.
    backend = get_backend(inputs.backend, inputs.image, inputs.mounts, inputs.ray_address)
    # Each side's listing, read once: described in run.json and embedded from.
    sides = {name: open_listing(path, name, embedding.images_root(path))
             for name, path in (("targets", targets_path), ("source", source_path))}
    described = Inputs(targets=_describe_input(sides["targets"]), source=_describe_input(sides["source"]))
    folder = _make_run_dir(inputs.output_dir, inputs.run_dir)
    ctx.events.log("info", f"run folder {folder}")

    target_embed = folder / artifacts.TARGET_EMBEDDINGS
    source_embed = folder / artifacts.SOURCE_EMBEDDINGS
    mined = folder / artifacts.MINED
    # With a history ledger, mining writes the candidates and selection writes mined.parquet.
    candidates = folder / artifacts.CANDIDATES if inputs.history is not None else mined
    target_spec = embedding.model_copy(update={"input_parquet": str(targets_path), "output_parquet": str(target_embed)})
    source_spec = embedding.model_copy(update={"input_parquet": str(source_path), "output_parquet": str(source_embed)})
    mining = mining.model_copy(update={"source_parquet": str(source_embed), "target_parquet": str(target_embed),
                                       "output_parquet": str(candidates)})
    manifest = RunManifest(
        deft_mine_version=__version__, status="running",
        started_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"), host=platform.node(),
        backend=inputs.backend, run_dir=str(folder), inputs=described,
        embedding_spec=embedding.model_dump(mode="json", exclude={"input_parquet", "output_parquet"}),
        mining_spec=mining.model_dump(mode="json"))
    # run.json first: a folder whose process is killed outright (SIGKILL, power) says "running",
    # never looks finished; every way out below that Python sees rewrites it.
    tables.write_text_atomic(folder / artifacts.MANIFEST, manifest.dump())
    side = EmbedInput(backend=inputs.backend, image=inputs.image, mounts=inputs.mounts, ray_address=inputs.ray_address,
                      store=inputs.store,
                      no_store=inputs.no_store)
    try:
        tables.write_text_atomic(folder / artifacts.EMBEDDING_SPEC, spec_to_yaml(
            embedding.model_copy(update={"input_parquet": None, "output_parquet": None})))
        tables.write_text_atomic(folder / artifacts.MINING_SPEC, spec_to_yaml(mining))
        tgt = embed_spec(target_spec, side, ctx.stage("embed targets"), sides["targets"])
        src = embed_spec(source_spec, side, ctx.stage("embed source"), sides["source"])
        for name, done in (("targets", tgt), ("source", src)):
            if done.input_rows and not done.rows:  # mining nothing would look like a finished run
                raise DeftError("no_readable_images", f"{name}: none of the {done.input_rows} images could be "
                                f"read ({', '.join(f'{n} {r}' for r, n in done.skipped_by_reason.items())}), "
                                f"e.g. {done.skipped_examples[0] if done.skipped_examples else '?'}",
                                fix="check the paths and image_root (relative paths resolve against it)",
                                field=name, skipped_by_reason=done.skipped_by_reason)
        mine_result = mine_spec(mining, MineInput(**side.model_dump(include={"backend", "image", "mounts", "ray_address"})),
                                ctx.stage("mine"),
                                pairs_path=folder / artifacts.PAIRS if backend.capabilities.writes_pairs else None)
        selected = None
        if inputs.history is not None:
            ledger_path = Path(inputs.history).expanduser().absolute()
            selected = select_new(SelectInput(
                candidates=str(candidates), ledger=str(ledger_path), output=str(mined),
                iteration=ledgers.load(ledger_path).last_iteration + 1,
                image_root=str(embedding.images_root(source_path)),
                topn=mining.topn), ctx.stage("select"))
        found = [*(w.for_side("targets") for w in tgt.warnings), *(w.for_side("source") for w in src.warnings),
                 *mine_result.warnings, *(selected.warnings if selected else [])]
        timings = {"embed_targets": tgt.timings["total"], "embed_source": src.timings["total"],
                   "mine": mine_result.timings["total"], "total": time.perf_counter() - started}
        manifest.status = "finished"
        manifest.finished_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        manifest.encoder = EncoderFacts(target=tgt.encoder, source=src.encoder, match=tgt.encoder == src.encoder,
                                        fingerprint=tgt.encoder.fingerprint)
        manifest.embeddings = Embeddings(target=_embed_facts(tgt), source=_embed_facts(src))
        labels = label_counts(target_embed, source_embed, mined)
        manifest.mining = MiningFacts(summary=mine_result.summary, label_filter=mine_result.label_filter,
                                      knn_metric=mine_result.knn_metric, topn=mine_result.topn,
                                      filter_by_label=mine_result.filter_by_label,
                                      labels=None if labels is None else LabelCounts(**labels),
                                      cluster=mine_result.cluster)
        manifest.history = None if selected is None else history_facts(selected)
        manifest.artifacts = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) + [artifacts.MANIFEST]
        manifest.warnings = found
        manifest.timings = timings
        tables.write_text_atomic(folder / artifacts.MANIFEST, manifest.dump())
    except BaseException as exc:  # the folder says why it is incomplete, then the error goes on up
        _record_stop(manifest, folder, exc)
        raise
    try:
        # last: it reads the rest
        written = write_report(folder, ctx.stage("report").events, ctx.image_allowed, ctx.invocation, ctx.session,
                               producing=True)
    except DeftError as exc:
        # run.json stays "finished": every mining output is whole (and a report regenerated later
        # must not call the run unfinished); the missing Mining_Report.md says the rest.
        raise DeftError(exc.code, f"{exc.message}; the run's mining outputs in {folder} are complete, only "
                        "its report is missing", fix=f"{exc.fix or 'fix the cause'}, then write the report "
                        f"with: deft-mine report {folder}", **exc.details) from exc
    return RunResult(run_dir=str(folder), mined=selected.newly_selected if selected else mine_result.mined,
                     mined_parquet=str(mined), target_embed=tgt, source_embed=src, mine=mine_result,
                     select=selected, report=written, timings=timings, warnings=found)


def _record_stop(manifest: RunManifest, folder: Path, exc: BaseException) -> None:
    """Rewrite run.json for a run that stops early: "interrupted" when stopped from outside
    (Ctrl-C, SIGTERM, an MCP cancel), else "failed", with the error either way."""
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
        tables.write_text_atomic(folder / artifacts.MANIFEST, manifest.dump())
    except DeftError:  # e.g. the disk is full: run.json keeps saying "running", which is true enough
        pass
    # A signal can land between a temp file's creation and the block that removes it on the way
    # out; the folder is this run's alone, so its temp names go too.
    for stray in folder.glob(".*.tmp"):
        stray.unlink(missing_ok=True)


def _input(value: str | Path, field: str) -> Path:
    path = Path(value).expanduser().absolute()
    return tables.require_file(path, field)


def _make_run_dir(output_dir: str | Path | None, run_dir: str | Path | None) -> Path:
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
        return folder
    parent = Path(output_dir).expanduser().absolute() / RUNS_FOLDER
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a second run within the same second waits for the next one
        folder = parent / dt.datetime.now().strftime(TIMESTAMP)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            time.sleep(1.0 - (time.time() % 1.0) + 0.01)
    raise DeftError("run_dir_exists", f"could not create a fresh folder under {parent}",
                    fix="retry in a second", field="output_dir")


def _describe_input(listing: Listing) -> InputFacts:
    return InputFacts(path=str(listing.path), format=listing.format, rows=listing.rows, columns=listing.columns,
                      has_label="label" in listing.columns)


def _embed_facts(result: EmbedResult) -> EmbedFacts:
    return EmbedFacts(**result.model_dump(include=set(EmbedFacts.model_fields)))


run = register(Tool("run", "Run the whole workflow", "embed targets and pool, mine, and write a run folder",
                    RunInput, RunResult, run_workflow, idempotent=False))
