"""The report tool: Mining_Report.md and its pictures for a run folder, with or without run.json.

With run.json every fact comes from it; without one (a folder the TAO container filled) the
facts are rebuilt from the parquets and the mining summary found there, and the report names
the facts it could not state. The pictures are written first, the report last (atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deft_mine.schemas import artifacts
from deft_mine.engine import pictures, store
from deft_mine.engine.images import resolve_image_path
from deft_mine.engine.mining import count_labels, label_counts
from deft_mine.engine.report import (MinedCheck, PairStats, ReportFacts, labels_shown,
                                     render)
from deft_mine.errors import DeftError
from deft_mine.events import Events, NullEvents
from deft_mine.schemas.results import EncoderIdentity, ReportResult, ToolWarning
from deft_mine.tools.guards import PathPolicy, check_paths

CONTACT_TARGETS = 8  # targets drawn on the contact sheet
CONTACT_NEIGHBOURS = 8  # neighbours drawn per target at most
PICTURE_NAMES = {"contact_sheet": "contact_sheet.png", "score_histogram": "score_histogram.png",
                 "labels": "labels.png"}
MISSING_LISTED = 10
# Spellings of summary keys other tools may use, mapped to ours.
SUMMARY_ALIASES = {"num_queries": "queries", "number_of_queries": "queries", "targets": "queries",
                   "neighbors_requested": "neighbours_requested", "duplicates": "duplicates_removed",
                   "kept": "kept_pairs", "dropped": "dropped_pairs", "unique_mined": "mined"}


def report(run_dir: str | Path, events: Events | None = None, policy: PathPolicy | None = None) -> ReportResult:
    """Write the pictures, then Mining_Report.md, into `run_dir`; return what was written."""
    events = events or NullEvents()
    check_paths(policy, run_dir=run_dir)
    folder = Path(run_dir).expanduser().absolute()
    if not folder.is_dir():
        raise DeftError("report_no_run", f"run_dir {folder} is not a folder",
                        fix="give the run folder (the one holding run.json or mined.parquet)",
                        field="run_dir", path=str(folder))
    missing: list[str] = []
    manifest = _read_manifest(folder, missing)
    files = _locate(folder, manifest)
    if manifest is None and files.get("mined") is None:
        raise DeftError("report_no_run", f"{folder} holds neither {artifacts.MANIFEST} nor a mined parquet, "
                        "so there is no run to report on",
                        fix="give the folder a run (or the TAO container's mining step) wrote its output to",
                        field="run_dir", path=str(folder))
    events.progress("report", 0, 4)
    facts = _gather(folder, manifest, files, missing, events)
    events.progress("report", 1, 4)
    failures = _draw(facts, folder, files, events)
    events.progress("report", 3, 4)
    rendered = render(facts)
    path = folder / artifacts.REPORT
    store.write_text_atomic(path, rendered.text)  # last: its presence means everything else is there
    events.progress("report", 4, 4)
    events.log("info", f"wrote {path} ({rendered.words} words, verdict {rendered.verdict})")

    warnings = [ToolWarning(**_warning_fields(w)) for w in facts.warnings]
    recorded = {w.code for w in warnings}
    for finding in rendered.findings:
        if finding.code not in recorded:
            recorded.add(finding.code)
            warnings.append(ToolWarning(code=finding.code, message=finding.reason,
                                        details={"severity": finding.severity, "action": finding.action}))
    warnings += failures
    return ReportResult(report_path=str(path), words=rendered.words, verdict=rendered.verdict,
                        pictures=sorted(facts.pictures.values()), missing_facts=facts.missing_facts,
                        warnings=warnings)


# ----------------------------------------------------------------------------- finding the files

def _read_manifest(folder: Path, missing: list[str]) -> dict[str, Any] | None:
    path = folder / artifacts.MANIFEST
    if not path.is_file():
        missing.append(artifacts.MANIFEST)
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        missing.append(f"{artifacts.MANIFEST} (unreadable)")
        return None
    if not isinstance(manifest, dict):
        missing.append(f"{artifacts.MANIFEST} (not an object)")
        return None
    return manifest


def _first_file(*candidates: Path | None) -> Path | None:
    return next((p for p in candidates if p is not None and p.is_file()), None)


def _recorded(folder: Path, value: Any, default: str) -> Path | None:
    """A file the manifest names, looked for in this folder only (the folder may have moved since):
    under its recorded name, else under the default name."""
    return _first_file(folder / Path(str(value)).name if value else None, folder / default)


def _locate(folder: Path, manifest: dict[str, Any] | None) -> dict[str, Path | None]:
    if manifest is not None:
        spec = manifest.get("mining_spec") or {}
        mined = _recorded(folder, spec.get("output_parquet"), artifacts.MINED)
        return {
            "mined": mined,
            "target_embeddings": _recorded(folder, spec.get("target_parquet"), artifacts.TARGET_EMBEDDINGS),
            "source_embeddings": _recorded(folder, spec.get("source_parquet"), artifacts.SOURCE_EMBEDDINGS),
            "pairs": _first_file(folder / artifacts.PAIRS),
            "summary": _first_file(folder / artifacts.SUMMARY),
            "mining_spec": _first_file(folder / artifacts.MINING_SPEC),
            "embedding_spec": _first_file(folder / artifacts.EMBEDDING_SPEC),
        }
    return _scan(folder)


def _scan(folder: Path) -> dict[str, Path | None]:
    """Which file is which in a folder without run.json, judged by columns first, names second."""
    mined: list[Path] = []
    embeddings: list[tuple[Path, int]] = []
    pairs = None
    for path in sorted(folder.glob("*.parquet")):
        if path.name.startswith("."):
            continue
        try:
            schema = store.schema_of(path)
            rows = store.num_rows(path)
        except DeftError:
            continue
        names = set(schema.names)
        if {"target_filepath", "rank"} <= names:
            pairs = pairs or path
        elif "filepath" in names and any(_is_list(f.type) for f in schema):
            embeddings.append((path, rows))
        elif "filepath" in names:
            mined.append(path)
    mined.sort(key=lambda p: (p.name != artifacts.MINED, "mined" not in p.name or "candidate" in p.name,
                              "mined" not in p.name, p.name))
    target = next((p for p, _ in embeddings if "target" in p.name.lower()), None)
    source = next((p for p, _ in embeddings if any(w in p.name.lower() for w in ("source", "pool"))
                   and p != target), None)
    rest = sorted((rows, p.name, p) for p, rows in embeddings if p not in (target, source))
    if target is None and rest:
        target = rest.pop(0)[2]  # the smaller unnamed file: targets are the few, the pool the many
    if source is None and rest:
        source = rest.pop(-1)[2]
    yamls = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    summaries = [folder / artifacts.SUMMARY] + sorted(p for p in folder.glob("*.txt") if "summary" in p.name.lower())
    return {
        "mined": mined[0] if mined else None,
        "target_embeddings": target,
        "source_embeddings": source,
        "pairs": pairs,
        "summary": _first_file(*summaries),
        "mining_spec": _first_file(folder / artifacts.MINING_SPEC, *[p for p in yamls if "min" in p.name.lower()]),
        "embedding_spec": _first_file(folder / artifacts.EMBEDDING_SPEC, *[p for p in yamls if "embed" in p.name.lower()]),
    }


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


# ----------------------------------------------------------------------------- gathering the facts

def _gather(folder: Path, manifest: dict[str, Any] | None, files: dict[str, Path | None],
            missing: list[str], events: Events) -> ReportFacts:
    has_manifest = manifest is not None
    if manifest is None:
        manifest = _rebuild(folder, files, missing)
    if files.get("pairs") is None and manifest.get("status", "finished") == "finished":
        missing.append(artifacts.PAIRS)
    facts = ReportFacts(folder=str(folder), manifest=manifest, has_manifest=has_manifest,
                        missing_facts=missing,
                        warnings=[w for w in manifest.get("warnings") or [] if isinstance(w, dict)],
                        files={role: (p.name if p is not None else None) for role, p in files.items()})
    for side in ("target", "source"):
        identity = (manifest.get("encoder") or {}).get(side)
        facts.fingerprints[side] = _fingerprint(identity) if isinstance(identity, dict) else None
    facts.image_roots = _image_roots(folder, manifest, files, has_manifest)
    _optional(events, missing, "target labels", lambda: _labels(facts, files))
    _optional(events, missing, "mined_pairs statistics", lambda: _pair_stats(facts, files))
    _optional(events, missing, "mined parquet checks", lambda: _check_mined(facts, files, has_manifest))
    return facts


def _optional(events: Events, missing: list[str], what: str, step: Any) -> None:
    """A fact that cannot be read is reported as unavailable, never a crash of the report."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say so, go on
        events.log("warning", f"report: {what} unavailable ({exc.__class__.__name__}: {exc})")
        missing.append(what)


def _rebuild(folder: Path, files: dict[str, Path | None], missing: list[str]) -> dict[str, Any]:
    """A manifest of what a folder without run.json shows: the same keys, unknown facts None."""
    inputs: dict[str, Any] = {}
    embeddings: dict[str, Any] = {}
    encoder: dict[str, Any] = {}
    for side, key, role in (("targets", "target", "target_embeddings"), ("source", "source", "source_embeddings")):
        path = files.get(role)
        if path is None:
            missing.append(f"{role} parquet")
            inputs[side], embeddings[key], encoder[key] = {}, {}, None
            continue
        schema = store.schema_of(path)
        columns = [f.name for f in schema if not _is_list(f.type)]
        inputs[side] = {"path": None, "format": None, "rows": None, "columns": columns,
                        "has_label": "label" in schema.names}
        dims = [f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)]
        embeddings[key] = {"rows": store.num_rows(path), "skipped": None,
                           "embedding_dim": dims[0] if dims else _first_dim(path, schema)}
        encoder[key] = store.read_identity(path)
        if encoder[key] is None:
            missing.append(f"encoder.{key} (no identity in {path.name})")
    both = encoder["target"] is not None and encoder["source"] is not None
    encoder["match"] = (encoder["target"] == encoder["source"]) if both else None
    encoder["fingerprint"] = _fingerprint(encoder["target"]) if encoder["target"] else None
    mining_spec = _yaml(files.get("mining_spec"))
    embedding_spec = _yaml(files.get("embedding_spec"))
    if mining_spec is None:
        missing.append("mining_spec")
    if embedding_spec is None:
        missing.append("embedding_spec")
    mining_spec = dict(mining_spec or {})
    for key, role in (("source_parquet", "source_embeddings"), ("target_parquet", "target_embeddings"),
                      ("output_parquet", "mined")):
        if files.get(role) is not None:
            mining_spec[key] = str(files[role])
    summary, label_filter = _read_summary(files.get("summary"))
    if files.get("summary") is None:
        missing.append(artifacts.SUMMARY)
    elif "queries" not in summary:
        missing.append("mining summary counts")
    filter_by_label = _bool(mining_spec.get("filter_by_label"))
    if label_filter is None:
        no_label = any(inputs[s].get("has_label") is False for s in ("targets", "source"))
        label_filter = ("applied" if "kept_pairs" in summary else
                        "noop" if filter_by_label and no_label else
                        "off" if filter_by_label is False else None)
    if filter_by_label is None and label_filter is not None:
        filter_by_label = label_filter != "off"
    labels = None
    paths = [files.get(r) for r in ("target_embeddings", "source_embeddings", "mined")]
    if all(p is not None for p in paths) and all(inputs[s].get("has_label") for s in ("targets", "source")):
        try:
            labels = label_counts(*paths)
        except Exception:  # noqa: BLE001 - odd label columns: the breakdown says n/a
            missing.append("mining.labels")
    missing.extend(["status", "started_at", "host", "inputs.targets.path", "inputs.source.path",
                    "embeddings.skipped", "timings", "warnings"])
    return {
        "inputs": inputs, "embeddings": embeddings, "encoder": encoder,
        "embedding_spec": embedding_spec, "mining_spec": mining_spec,
        "mining": {"summary": summary, "label_filter": label_filter,
                   "knn_metric": mining_spec.get("knn_metric"), "topn": _int(mining_spec.get("topn")),
                   "filter_by_label": filter_by_label, "labels": labels},
    }


def _first_dim(path: Path, schema: pa.Schema) -> int | None:
    column = next((f.name for f in schema if _is_list(f.type)), None)
    if column is None:
        return None
    for batch in store.iter_batches(path, 1, [column]):
        if batch.num_rows:
            return len(batch.column(0)[0].values)
    return None


def _yaml(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _read_summary(path: Path | None) -> tuple[dict[str, int], str | None]:
    """`key: value` (or `key = value`) lines; integer values become counts, label_filter a word."""
    summary: dict[str, int] = {}
    label_filter = None
    if path is None:
        return summary, None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"\s*([^:=]+?)\s*[:=]\s*(.+?)\s*$", line)
        if not match:
            continue
        key = re.sub(r"[^a-z0-9]+", "_", match.group(1).lower()).strip("_")
        key = SUMMARY_ALIASES.get(key, key)
        value = match.group(2)
        if key == "label_filter":
            label_filter = value if value in ("off", "applied", "noop") else None
        elif re.fullmatch(r"[+-]?\d+", value):
            summary.setdefault(key, int(value))
    return summary, label_filter


def _fingerprint(identity: dict[str, Any]) -> str:
    try:
        return EncoderIdentity(**identity).fingerprint
    except Exception:  # noqa: BLE001 - an identity another tool wrote: hash it as it is
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_roots(folder: Path, manifest: dict[str, Any], files: dict[str, Path | None],
                 has_manifest: bool) -> dict[str, str | None]:
    """Where relative image paths resolve: the spec's image_root, else each input file's folder;
    without run.json, the folder (or a parent) under which the listed images are found."""
    root = (manifest.get("embedding_spec") or {}).get("image_root")
    if root:
        root = str(Path(root).expanduser().absolute())
        return {"targets": root, "source": root}
    if has_manifest:
        out: dict[str, str | None] = {}
        for side in ("targets", "source"):
            path = ((manifest.get("inputs") or {}).get(side) or {}).get("path")
            out[side] = str(Path(path).parent) if path else str(folder)
        return out
    samples = {"targets": _sample_paths(files.get("target_embeddings")),
               "source": _sample_paths(files.get("mined"))}
    candidates = list(dict.fromkeys([folder, folder.parent, folder.parent.parent]))
    out = {}
    for side, paths in samples.items():
        hits = [sum(resolve_image_path(p, c).is_file() for p in paths) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (hits[i], -i)) if paths else 0
        out[side] = str(candidates[best])
    return out


def _sample_paths(path: Path | None, n: int = 5) -> list[str]:
    if path is None or "filepath" not in store.schema_of(path).names:
        return []
    for batch in store.iter_batches(path, n, ["filepath"]):
        return [str(p) for p in batch.column(0).to_pylist() if p is not None]
    return []


def _labels(facts: ReportFacts, files: dict[str, Path | None]) -> None:
    labels = (facts.manifest.get("mining") or {}).get("labels")
    if isinstance(labels, dict) and labels.get("targets") is not None:
        facts.target_labels = dict(labels["targets"])
        facts.mined_labels = dict(labels["mined"]) if labels.get("mined") is not None else None
        return
    has_label = ((facts.manifest.get("inputs") or {}).get("targets") or {}).get("has_label")
    path = files.get("target_embeddings")
    if has_label is False or path is None or "label" not in store.schema_of(path).names:
        return
    facts.target_labels = count_labels(store.read_columns(path, ["label"]).column("label").to_pylist())


def _pair_stats(facts: ReportFacts, files: dict[str, Path | None]) -> None:
    path = files.get("pairs")
    if path is None:
        return
    names = store.schema_of(path).names
    table = store.read_columns(path, ["score", "kept"] + (["target_label"] if "target_label" in names else []))
    scores = table.column("score").to_numpy()
    kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    by_label = None
    if "target_label" in names:
        by_label = count_labels([label for label, k in zip(table.column("target_label").to_pylist(), kept) if k])
    facts.pairs = PairStats(
        pairs=len(scores), kept=int(kept.sum()),
        score_min=float(scores.min()) if len(scores) else None,
        score_median=float(np.median(scores)) if len(scores) else None,
        score_max=float(scores.max()) if len(scores) else None,
        kept_by_target_label=by_label)


def _check_mined(facts: ReportFacts, files: dict[str, Path | None], has_manifest: bool) -> None:
    path = files.get("mined")
    if path is None:
        return
    schema = store.schema_of(path)
    columns = [(f.name, str(f.type)) for f in schema]
    rows = store.num_rows(path)
    root = facts.image_roots.get("source")
    check = MinedCheck(name=path.name, columns=columns, rows=rows, duplicates=0, checked=0, missing=0,
                       missing_examples=[], root=root, root_guessed=not has_manifest and not
                       (facts.manifest.get("embedding_spec") or {}).get("image_root"),
                       encoding={"non_utf8": 0, "control": 0, "backslash": 0},
                       encoding_examples={"non_utf8": [], "control": [], "backslash": []})
    facts.mined = check
    if "filepath" not in schema.names:
        return
    column = store.read_columns(path, ["filepath"]).column("filepath")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        raw = column.to_pylist()
        paths = [None if b is None else b.decode("utf-8", errors="surrogateescape") for b in raw]
    else:
        paths = column.to_pylist() if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) \
            else pc.cast(column, pa.string()).to_pylist()
    check.duplicates = rows - len(set(paths))
    base = Path(root) if root else path.parent
    for p in paths:
        if p is None:
            continue
        check.checked += 1
        for trait in _traits(p):
            check.encoding[trait] += 1
            if len(check.encoding_examples[trait]) < 3:
                check.encoding_examples[trait].append(p)
        try:
            exists = os.path.exists(resolve_image_path(p, base))
        except (ValueError, OSError):  # e.g. an embedded NUL
            exists = False
        if not exists:
            check.missing += 1
            if len(check.missing_examples) < MISSING_LISTED:
                check.missing_examples.append(p)


def _traits(path: str) -> list[str]:
    traits = []
    if "\ufffd" in path or any("\ud800" <= ch <= "\udfff" for ch in path):
        traits.append("non_utf8")
    if any(unicodedata.category(ch) == "Cc" for ch in path):
        traits.append("control")
    if "\\" in path:
        traits.append("backslash")
    return traits


def _warning_fields(warning: dict[str, Any]) -> dict[str, Any]:
    return {"code": str(warning.get("code", "unknown")), "message": str(warning.get("message", "")),
            "fields": list(warning.get("fields") or []), "details": dict(warning.get("details") or {})}


# ----------------------------------------------------------------------------- pictures

def _draw(facts: ReportFacts, folder: Path, files: dict[str, Path | None], events: Events) -> list[ToolWarning]:
    failures: list[ToolWarning] = []
    for kind, draw in (("contact_sheet", _contact_sheet), ("score_histogram", _histogram),
                       ("labels", _label_chart)):
        name = PICTURE_NAMES[kind]
        try:
            if draw(facts, folder / name, files):
                facts.pictures[kind] = name
        except Exception as exc:  # noqa: BLE001 - a picture is never worth losing the report
            events.log("warning", f"report: could not draw {name} ({exc.__class__.__name__}: {exc})")
            failures.append(ToolWarning(code="picture_failed", message=f"could not draw {name}: {exc}",
                                        details={"picture": name}))
    return failures


def _score_text(score: float | None) -> str:
    return "n/a" if score is None or not np.isfinite(score) else f"{score:.4g}"


def _contact_sheet(facts: ReportFacts, path: Path, files: dict[str, Path | None]) -> bool:
    t_root = Path(facts.image_roots.get("targets") or facts.folder)
    s_root = Path(facts.image_roots.get("source") or facts.folder)
    rows: list[list[pictures.Tile]] = []
    pairs_path = files.get("pairs")
    if pairs_path is not None:
        names = store.schema_of(pairs_path).names
        columns = ["target_filepath", "target_row", "rank", "filepath", "score", "kept"] + \
            [c for c in ("target_label", "source_label") if c in names]
        table = pq.read_table(pairs_path, columns=columns, filters=[("target_row", "<", CONTACT_TARGETS)])
        by_target: dict[int, list[dict[str, Any]]] = {}
        for pair in table.to_pylist():
            by_target.setdefault(pair["target_row"], []).append(pair)
        for target_row in sorted(by_target):
            found = sorted(by_target[target_row], key=lambda p: p["rank"])
            head = found[0]
            row = [pictures.Tile(head["target_filepath"], t_root,
                                 [f"target {target_row}", _label_text(head.get("target_label")),
                                  Path(head["target_filepath"]).name], pictures.TARGET_FRAME)]
            for pair in found[:CONTACT_NEIGHBOURS]:
                row.append(pictures.Tile(pair["filepath"], s_root,
                                         [f"#{pair['rank']}  {_score_text(pair['score'])}",
                                          (_label_text(pair.get("source_label")) + " "
                                           + ("" if pair["kept"] else "(dropped)")).strip(),
                                          Path(pair["filepath"]).name],
                                         pictures.KEPT if pair["kept"] else pictures.DROPPED))
            rows.append(row)
        facts.contact_from = "pairs"
    else:
        mined = files.get("mined")
        if mined is None or not {"best_target", "filepath"} <= set(store.schema_of(mined).names):
            return False
        names = store.schema_of(mined).names
        table = store.read_columns(mined, [c for c in ("filepath", "best_target", "score") if c in names])
        groups: dict[str, list[dict[str, Any]]] = {}
        for item in table.to_pylist():
            if item["best_target"] in groups or len(groups) < CONTACT_TARGETS:
                groups.setdefault(item["best_target"], []).append(item)
        for i, (target, items) in enumerate(groups.items()):
            row = [pictures.Tile(str(target), t_root, [f"target {i}", "", Path(str(target)).name],
                                 pictures.TARGET_FRAME)]
            row += [pictures.Tile(str(it["filepath"]), s_root,
                                  [f"best {_score_text(it.get('score'))}", "", Path(str(it["filepath"])).name],
                                  pictures.KEPT) for it in items[:CONTACT_NEIGHBOURS]]
            rows.append(row)
        facts.contact_from = "best_target"
    facts.contact_targets = len(rows)
    facts.contact_neighbours = max([len(r) - 1 for r in rows] + [0])
    queries = ((facts.manifest.get("mining") or {}).get("summary") or {}).get("queries")
    title = (f"First {len(rows)} of {queries if queries is not None else 'the'} targets (blue) and their "
             f"nearest pool images: green kept, red dropped")
    pictures.contact_sheet(rows, path, title)
    return True


def _label_text(label: Any) -> str:
    return "" if label is None else str(label)


def _histogram(facts: ReportFacts, path: Path, files: dict[str, Path | None]) -> bool:
    mining = facts.manifest.get("mining") or {}
    metric = mining.get("knn_metric") or (facts.manifest.get("mining_spec") or {}).get("knn_metric")
    axis = ("cosine similarity (higher is nearer)" if metric == "cosine" else
            f"{metric} distance (lower is nearer)" if metric else "score")
    pairs_path = files.get("pairs")
    if pairs_path is not None:
        table = store.read_columns(pairs_path, ["score", "kept"])
        scores = table.column("score").to_numpy()
        kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool) \
            if mining.get("label_filter") == "applied" else None
        title = f"Neighbour scores of all {len(scores)} pairs found"
        facts.histogram_from = "pairs"
    else:
        mined = files.get("mined")
        if mined is None or "score" not in store.schema_of(mined).names:
            return False
        scores = store.read_columns(mined, ["score"]).column("score").to_numpy(zero_copy_only=False)
        kept = None
        title = f"Best neighbour score of each of the {len(scores)} mined images"
        facts.histogram_from = "mined"
    scores = np.asarray(scores, dtype=np.float64)
    pictures.score_histogram(scores[np.isfinite(scores)], None if kept is None else kept[np.isfinite(scores)],
                             path, title, f"score: {axis}")
    return True


def _label_chart(facts: ReportFacts, path: Path, files: dict[str, Path | None]) -> bool:
    if facts.target_labels is None or facts.mined_labels is None:
        return False
    shown, _ = labels_shown(facts.target_labels, facts.mined_labels)
    pictures.label_bars(shown, [facts.target_labels.get(x, 0) for x in shown],
                        [facts.mined_labels.get(x, 0) for x in shown], path,
                        "Targets vs mined images per label (mined counted by pool label)")
    return True
