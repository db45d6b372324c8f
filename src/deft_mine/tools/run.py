"""The run tool: embed targets and pool, mine, and leave an auditable run folder."""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence


from deft_mine.schemas import artifacts
from deft_mine import __version__
from deft_mine.engine import ledger as ledgers
from deft_mine.engine import store
from deft_mine.engine.mining import label_counts
from deft_mine.errors import DeftError
from deft_mine.events import Cancelled, Events, NullEvents, StageEvents
from deft_mine.schemas.results import RunResult, ToolWarning
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, load_spec, spec_to_yaml, split_overrides
from deft_mine.tools.embed import embed_spec
from deft_mine.tools.guards import EncoderLock, PathPolicy, check_paths
from deft_mine.tools.mine import mine_spec
from deft_mine.tools.report import report
from deft_mine.tools.select import history_facts, select

RUNS_FOLDER = "mining_results"
TIMESTAMP = "%Y-%m-%d_%H%M%S"


def run(
    targets: str | Path,
    source: str | Path,
    output_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    embedding_spec_path: str | Path | None = None,
    mining_spec_path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    backend: str = "local",
    events: Events | None = None,
    policy: PathPolicy | None = None,
    lock: EncoderLock | None = None,
    history: str | Path | None = None,
    image: str | None = None,
    mounts: list[str] | None = None,
) -> RunResult:
    """The whole workflow into a new run folder; `policy` and `lock` as for `embed`."""
    events = events or NullEvents()
    started = time.perf_counter()
    check_paths(policy, targets=targets, source=source, output_dir=output_dir, run_dir=run_dir,
                embedding_spec_path=embedding_spec_path, mining_spec_path=mining_spec_path,
                history=history)
    targets_path = _input(targets, "targets")
    source_path = _input(source, "source")
    embed_over, mine_over = split_overrides(overrides or ())
    # Both specs are checked before any work, so a typo in the mining spec costs no embedding.
    embedding = load_spec(EmbeddingSpec, embedding_spec_path, embed_over)
    mining = load_spec(MiningSpec, mining_spec_path, mine_over)
    check_paths(policy, image_root=embedding.image_root)
    if lock is not None:  # refuse a different encoder before making a run folder
        with lock.bind(embedding):
            pass
    folder = _make_run_dir(output_dir, run_dir)
    events.log("info", f"run folder {folder}")

    target_embed = folder / artifacts.TARGET_EMBEDDINGS
    source_embed = folder / artifacts.SOURCE_EMBEDDINGS
    mined = folder / artifacts.MINED
    # With a history ledger, mining writes the candidates and selection writes mined.parquet.
    candidates = folder / artifacts.CANDIDATES if history is not None else mined
    target_spec = embedding.model_copy(update={"input_parquet": str(targets_path), "output_parquet": str(target_embed)})
    source_spec = embedding.model_copy(update={"input_parquet": str(source_path), "output_parquet": str(source_embed)})
    mining = mining.model_copy(update={"source_parquet": str(source_embed), "target_parquet": str(target_embed),
                                       "output_parquet": str(candidates)})
    store.write_text_atomic(folder / artifacts.EMBEDDING_SPEC,
                            spec_to_yaml(embedding.model_copy(update={"input_parquet": None, "output_parquet": None})))
    store.write_text_atomic(folder / artifacts.MINING_SPEC, spec_to_yaml(mining))

    manifest: dict[str, Any] = {
        "deft_mine_version": __version__,
        "status": "running",
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "backend": backend,
        "run_dir": str(folder),
        "inputs": {"targets": _describe_input(targets_path), "source": _describe_input(source_path)},
        "embedding_spec": embedding.model_dump(mode="json", exclude={"input_parquet", "output_parquet"}),
        "mining_spec": mining.model_dump(mode="json"),
    }
    try:
        tgt = embed_spec(target_spec, backend, StageEvents(events, "embed targets"), policy, lock,
                         image, mounts)
        src = embed_spec(source_spec, backend, StageEvents(events, "embed source"), policy, lock,
                         image, mounts)
        mine_result = mine_spec(mining, backend, StageEvents(events, "mine"), policy,
                                pairs_path=folder / artifacts.PAIRS, image=image, mounts=mounts)
        selected = None
        if history is not None:
            ledger_path = Path(history).expanduser().absolute()
            iteration = ledgers.load(ledger_path).last_iteration + 1
            image_root = Path(embedding.image_root).expanduser().absolute() if embedding.image_root \
                else source_path.parent
            selected = select(candidates, ledger_path, iteration, mined, image_root=image_root,
                              topn=mining.topn, events=StageEvents(events, "select"), policy=policy)
    except Exception as exc:  # the folder says why it is incomplete, then the error goes on up
        if isinstance(exc, DeftError):
            error = exc.to_dict()
        else:
            error = {"code": "cancelled" if isinstance(exc, Cancelled) else "internal_error",
                     "message": str(exc) or repr(exc)}
        manifest.update(status="failed", error=error)
        _write_manifest(folder, manifest)
        raise

    warnings: list[ToolWarning] = [*_tag(tgt.warnings, "targets"), *_tag(src.warnings, "source"),
                                   *mine_result.warnings, *(selected.warnings if selected else [])]
    timings = {"embed_targets": tgt.timings["total"], "embed_source": src.timings["total"],
               "mine": mine_result.timings["total"], "total": time.perf_counter() - started}
    manifest.update(
        status="finished",
        finished_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        encoder={"target": tgt.encoder.model_dump(), "source": src.encoder.model_dump(),
                 "match": tgt.encoder == src.encoder, "fingerprint": tgt.encoder.fingerprint},
        embeddings={"target": _embed_facts(tgt), "source": _embed_facts(src)},
        mining={"summary": mine_result.summary, "label_filter": mine_result.label_filter,
                "knn_metric": mine_result.knn_metric, "topn": mine_result.topn,
                "filter_by_label": mine_result.filter_by_label,
                "labels": label_counts(target_embed, source_embed, mined)},
        history=None if selected is None else {
            **selected.model_dump(exclude={"warnings"}),
            "iterations": history_facts(Path(selected.ledger))},
        artifacts=sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) + [artifacts.MANIFEST],
        warnings=[w.model_dump() for w in warnings],
        timings=timings,
    )
    _write_manifest(folder, manifest)
    written = report(folder, StageEvents(events, "report"), policy)  # last: it reads the rest
    return RunResult(run_dir=str(folder), mined=selected.newly_selected if selected else mine_result.mined,
                     mined_parquet=str(mined), target_embed=tgt, source_embed=src, mine=mine_result,
                     select=selected, report=written, timings=timings, warnings=warnings)


def _input(value: str | Path, field: str) -> Path:
    path = Path(value).expanduser().absolute()
    return store.require_file(path, field)


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


def _describe_input(path: Path) -> dict[str, Any]:
    schema = store.schema_of(path)
    return {"path": str(path), "format": "csv" if store.is_csv(path) else "parquet",
            "rows": store.num_rows(path), "columns": list(schema.names),
            "has_label": "label" in schema.names}


def _embed_facts(result: Any) -> dict[str, Any]:
    return {"rows": result.rows, "input_rows": result.input_rows, "skipped": result.skipped,
            "skipped_by_reason": result.skipped_by_reason, "embedding_dim": result.embedding_dim,
            "device": result.device, "timings": result.timings}


def _tag(warnings: list[ToolWarning], side: str) -> list[ToolWarning]:
    return [w.model_copy(update={"details": {**w.details, "side": side},
                                 "message": f"{side}: {w.message}"}) for w in warnings]


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    store.write_text_atomic(folder / artifacts.MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
