"""Run folder → ReportFacts: every file the report states facts from is found and read here."""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from deft_mine.engine import tables
from deft_mine.engine.images import resolve_image_path
from deft_mine.engine.mining import count_labels, label_counts, label_keys, label_spellings, label_text
from deft_mine.errors import DeftError
from deft_mine.events import Events
from deft_mine.schemas import artifacts
from deft_mine.schemas.manifest import EmbedFacts, InputFacts, LabelCounts, MiningFacts, RunManifest
from deft_mine.schemas.specs import LabelFilter, Side
from deft_mine.schemas.warnings import ToolWarning

MISSING_LISTED = 10
SPEC_PARQUETS = {  # mining spec key -> (role of the file, its default name)
    "source_parquet": ("source_embeddings", artifacts.SOURCE_EMBEDDINGS),
    "target_parquet": ("target_embeddings", artifacts.TARGET_EMBEDDINGS),
    "output_parquet": ("mined", artifacts.MINED),
}
TRAITS: dict[str, Callable[[str], bool]] = {  # odd things a mined path may hold, and how to tell
    "non_utf8": lambda p: "\ufffd" in p or any("\ud800" <= ch <= "\udfff" for ch in p),
    "control": lambda p: any(unicodedata.category(ch) == "Cc" for ch in p),
    "backslash": lambda p: "\\" in p,
}
Files = dict[str, Path | None]  # role ("mined", "pairs", "target_embeddings" …) -> file in the run folder


@dataclass
class MinedCheck:
    """What the mined parquet holds on disk, looked at by the report itself."""

    name: str  # its file name in the run folder
    columns: list[tuple[str, str]]  # (column, Arrow type), in file order
    rows: int
    root: str | None  # the folder relative paths were resolved against
    root_guessed: bool  # True when no run.json said where the images live
    duplicates: int = 0  # rows whose filepath repeats an earlier row
    checked: int = 0  # paths looked up on disk
    missing: int = 0
    missing_examples: list[str] = field(default_factory=list)  # the first missing paths, as listed
    encoding: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAITS, 0))  # trait -> paths
    encoding_examples: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TRAITS})


@dataclass
class PairStats:
    """Neighbour scores and label agreement from mined_pairs.parquet."""

    pairs: int
    kept: int
    score_min: float | None
    score_median: float | None
    score_max: float | None
    kept_by_target_label: dict[str, int] | None  # kept pairs per target label (None: no label)
    below_floor: int | None = None  # pairs below the similarity floor (None: no floor was set)
    below_by_target_label: dict[str, int] | None = None  # ...per target label


@dataclass
class ChangeNetSide:
    """A side given as a ChangeNet CSV, as its listing in the run folder shows it."""

    listing: str  # the listing's file name in the run folder
    images: int  # listing rows: one per CSV row and light that resolved
    csv_rows: int  # the CSV rows they came from
    lights: list[str]  # in first-appearance order


@dataclass
class Budget:
    """The selection budget a history run ran under, as mining_history_summary.json records it."""

    fraction: float
    pool_size: int
    cap: int


@dataclass
class NearDuplicates:
    """near_duplicates.parquet as the report reads it: the images collapsed into one kept."""

    name: str  # its path relative to the run folder (mode=unique: in the matcher's folder)
    rows: int  # images collapsed (near duplicates and identical files)
    by_label: dict[str, int] | None = None  # collapsed images per pool label (None: the pool has no label)


@dataclass
class ReportFacts:
    folder: str  # the run folder, absolute; every file named in `files` lies in it
    manifest: RunManifest  # run.json, or one rebuilt from the folder (unknown facts None)
    has_manifest: bool
    missing_facts: list[str] = field(default_factory=list)
    warnings: list[ToolWarning] = field(default_factory=list)  # the run's, as run.json records them
    files: dict[str, str | None] = field(default_factory=dict)  # role -> file name in the folder
    mined: MinedCheck | None = None
    pairs: PairStats | None = None
    target_texts: list[str | None] | None = None  # the targets' sentences, in order (None: targets are images)
    target_labels: dict[str, int] | None = None  # targets per label
    mined_labels: dict[str, int] | None = None  # mined images per pool label
    merged_labels: dict[str, list[str]] = field(default_factory=dict)  # a class's name -> its spellings
    pictures: dict[str, str] = field(default_factory=dict)  # kind -> PNG file name
    contact_targets: int = 0  # targets drawn on the contact sheet
    contact_neighbours: int = 0  # neighbours drawn per target at most
    contact_from: str = "pairs"  # "pairs" | "best_target"
    histogram_from: str = "pairs"  # "pairs" | "mined"
    training_rows_now: int | None = None  # data rows mined_training_rows.csv holds now (None: no such file)
    changenet: dict[str, ChangeNetSide] = field(default_factory=dict)  # "target" | "source" -> its listing
    budget: Budget | None = None  # None: no budget, or no readable mining_history_summary.json
    image_roots: dict[str, str | None] = field(default_factory=dict)  # Side.input -> where its images resolve
    fingerprints: dict[Side, str | None] = field(default_factory=dict)  # each side's encoder identity hash
    image_allowed: Callable[[Path], bool] = lambda path: True  # which image files the pictures may read
    leak_examples: list[dict[str, Any]] = field(default_factory=list)  # leaks.parquet's first rows
    near_duplicates: NearDuplicates | None = None  # None: nothing was collapsed (or no such file)

    def path(self, role: str) -> Path | None:
        """The file playing `role` in the run folder, if there is one."""
        name = self.files.get(role)
        return None if name is None else Path(self.folder) / name


def locate(folder: Path) -> tuple[RunManifest | None, Files, list[str]]:
    """run.json (None when absent or unreadable), the run's files, and the facts already missing;
    refuses a folder that holds no run."""
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
    return manifest, files, missing


def gather(folder: Path, manifest: RunManifest | None, files: Files, missing: list[str],
           events: Events) -> ReportFacts:
    """Every fact the report states: run.json's (or those rebuilt from the files), plus what the
    report itself reads from the files now (labels, pair scores, the mined paths on disk)."""
    has_manifest = manifest is not None
    if manifest is None:
        manifest = _rebuild(folder, files, missing)
    if files.get("pairs") is None and manifest.status in (None, "finished"):
        missing.append(artifacts.PAIRS)
    encoder = manifest.encoder
    facts = ReportFacts(folder=str(folder), manifest=manifest, has_manifest=has_manifest,
                        missing_facts=missing, warnings=list(manifest.warnings),
                        files={role: (p.name if p is not None else None) for role, p in files.items()},
                        fingerprints={side: None if ident is None else ident.fingerprint
                                      for side, ident in ((Side.target, encoder.target), (Side.source, encoder.source))})
    facts.image_roots = _image_roots(folder, manifest, files, has_manifest)
    for what, step in (("target labels", _labels), ("mined_pairs statistics", _pair_stats),
                       ("mined parquet checks", _check_mined), ("training rows", _check_training_rows),
                       ("ChangeNet listings", _changenet_sides), ("history budget", _history_budget),
                       ("target sentences", _target_texts), ("leak examples", _leak_examples),
                       ("near-duplicates", _near_duplicates)):
        try:  # a fact that cannot be read is reported as unavailable, never a crash of the report
            step(facts, files)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: say so, go on
            events.log("warning", f"report: {what} unavailable ({exc.__class__.__name__}: {exc})")
            missing.append(what)
    return facts


# ----------------------------------------------------------------------------- finding the files

def _read_manifest(folder: Path, missing: list[str]) -> RunManifest | None:
    path = folder / artifacts.MANIFEST
    if not path.is_file():
        missing.append(artifacts.MANIFEST)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return RunManifest.model_validate(data)
        why = "not an object"
    except ValidationError:  # before ValueError, which it is
        why = "not a run manifest"
    except (OSError, ValueError):
        why = "unreadable"
    missing.append(f"{artifacts.MANIFEST} ({why})")
    return None


def _first_file(*candidates: Path | None) -> Path | None:
    return next((p for p in candidates if p is not None and p.is_file()), None)


def _locate(folder: Path, manifest: RunManifest | None) -> Files:
    """The run's files by role. A parquet run.json names is looked for in this folder only (the folder
    may have moved since): under its recorded name, else under the default name."""
    if manifest is None:
        return _scan(folder)
    spec = manifest.mining_spec or {}
    files = {role: _first_file(folder / Path(str(spec[key])).name if spec.get(key) else None, folder / name)
             for key, (role, name) in SPEC_PARQUETS.items()}
    for role, name in (("pairs", artifacts.PAIRS), ("summary", artifacts.SUMMARY),
                       ("mining_spec", artifacts.MINING_SPEC), ("embedding_spec", artifacts.EMBEDDING_SPEC)):
        files[role] = _first_file(folder / name)
    return files


def _scan(folder: Path) -> Files:
    """Which file is which in a folder without run.json, judged by columns first, names second."""
    mined: list[Path] = []
    embeddings: list[tuple[Path, int]] = []
    pairs = None
    for path in sorted(folder.glob("*.parquet")):
        if path.name.startswith("."):
            continue
        try:
            schema = tables.schema_of(path)
            rows = tables.num_rows(path)
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

def _rebuild(folder: Path, files: Files, missing: list[str]) -> RunManifest:
    """A manifest of what a folder without run.json shows; the facts it cannot show stay None."""
    m = RunManifest()
    for side, key, role in (("targets", "target", "target_embeddings"), ("source", "source", "source_embeddings")):
        path = files.get(role)
        if path is None:
            missing.append(f"{role} parquet")
            continue
        schema = tables.schema_of(path)
        dims = [f.type.list_size for f in schema if pa.types.is_fixed_size_list(f.type)]
        setattr(m.inputs, side, InputFacts(columns=[f.name for f in schema if not _is_list(f.type)],
                                           has_label="label" in schema.names))
        setattr(m.embeddings, key, EmbedFacts(rows=tables.num_rows(path),
                                              embedding_dim=dims[0] if dims else _first_dim(path, schema)))
        setattr(m.encoder, key, tables.read_identity(path))  # None too for an identity of another shape
        if getattr(m.encoder, key) is None:
            missing.append(f"encoder.{key} (no identity in {path.name})")
    target, source = m.encoder.target, m.encoder.source
    m.encoder.match = target == source if target and source else None
    m.encoder.fingerprint = target.fingerprint if target else None
    mining_spec, m.embedding_spec = _yaml(files.get("mining_spec")), _yaml(files.get("embedding_spec"))
    missing.extend(name for name, spec in (("mining_spec", mining_spec), ("embedding_spec", m.embedding_spec))
                   if spec is None)
    mining_spec = dict(mining_spec or {}) | {key: str(files[role]) for key, (role, _) in SPEC_PARQUETS.items()
                                             if files.get(role) is not None}
    summary_path = files.get("summary")
    summary = artifacts.MiningSummary() if summary_path is None else \
        artifacts.MiningSummary.parse(summary_path.read_text(encoding="utf-8", errors="replace"))
    if summary_path is None:
        missing.append(artifacts.SUMMARY)
    elif summary.queries is None:
        missing.append("mining summary counts")
    filter_by_label = _bool(mining_spec.get("filter_by_label"))
    has_label = (m.inputs.targets.has_label, m.inputs.source.has_label)
    if summary.label_filter is None:
        summary.label_filter = (LabelFilter.applied if summary.kept_pairs is not None else
                                LabelFilter.noop if filter_by_label and False in has_label else
                                LabelFilter.off if filter_by_label is False else None)
    if filter_by_label is None and summary.label_filter is not None:
        filter_by_label = summary.label_filter is not LabelFilter.off
    labels = None
    paths = [files.get(r) for r in ("target_embeddings", "source_embeddings", "mined")]
    if all(p is not None for p in paths) and all(has_label):
        try:
            counts = label_counts(*paths)  # type: ignore[arg-type]  # None ruled out just above
            labels = None if counts is None else LabelCounts(**counts)
        except Exception:  # noqa: BLE001 - odd label columns: the breakdown says n/a
            missing.append("mining.labels")
    missing.extend(["status", "started_at", "host", "inputs.targets.path", "inputs.source.path",
                    "embeddings.skipped", "timings", "warnings"])
    metric = mining_spec.get("knn_metric")
    m.mining_spec = mining_spec
    m.mining = MiningFacts(summary=summary.as_dict(), label_filter=summary.label_filter, topn=_int(mining_spec.get("topn")),
                           knn_metric=None if metric is None else str(metric), filter_by_label=filter_by_label,
                           labels=labels)
    return m


def _first_dim(path: Path, schema: pa.Schema) -> int | None:
    column = next((f.name for f in schema if _is_list(f.type)), None)
    if column is None:
        return None
    for batch in tables.iter_batches(path, 1, [column]):
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
    # keys as text: a spec is looked up by name, and YAML may give `1:` or `true:` keys
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else None


def _bool(value: Any) -> bool | None:
    """A spec switch as YAML or the TAO spec may spell it (true, "true", "False" …)."""
    word = value.strip().lower() if isinstance(value, str) else None
    return value if isinstance(value, bool) else (word == "true") if word in ("true", "false") else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _image_roots(folder: Path, manifest: RunManifest, files: Files, has_manifest: bool) -> dict[str, str | None]:
    """Where relative image paths resolve: the spec's image_root, else each input file's folder;
    without run.json, the folder (or a parent) under which the listed images are found."""
    root = (manifest.embedding_spec or {}).get("image_root")
    if root:
        return dict.fromkeys((Side.target.input, Side.source.input), str(Path(root).expanduser().absolute()))
    if has_manifest:
        # run.json records each input's images root (a ChangeNet CSV's: its images_dir); older
        # runs' inputs resolve beside their file
        given = {Side.target.input: manifest.inputs.targets, Side.source.input: manifest.inputs.source}
        return {side: facts.images_root or (str(Path(facts.path).parent) if facts.path else str(folder))
                for side, facts in given.items()}
    candidates = list(dict.fromkeys([folder, folder.parent, folder.parent.parent]))
    out: dict[str, str | None] = {}
    for side, role in ((Side.target, "target_embeddings"), (Side.source, "mined")):
        paths = _sample_paths(files.get(role))
        hits = [sum(resolve_image_path(p, c).is_file() for p in paths) for c in candidates]
        out[side.input] = str(candidates[max(range(len(candidates)), key=lambda i: (hits[i], -i))])
    return out


def _sample_paths(path: Path | None, n: int = 5) -> list[str]:
    if path is None or "filepath" not in tables.schema_of(path).names:
        return []
    for batch in tables.iter_batches(path, n, ["filepath"]):
        return [str(p) for p in batch.column(0).to_pylist() if p is not None]
    return []


def _labels(facts: ReportFacts, files: Files) -> None:
    labels = facts.manifest.mining.labels
    if labels is not None and labels.targets is not None:
        facts.target_labels = dict(labels.targets)
        facts.mined_labels = dict(labels.mined) if labels.mined is not None else None
        facts.merged_labels = dict(labels.merged)
        return
    path = files.get("target_embeddings")
    if facts.manifest.inputs.targets.has_label is False or path is None or "label" not in tables.schema_of(path).names:
        return
    facts.target_labels = count_labels(tables.read_columns(path, ["label"]).column("label").to_pylist())


def _pair_stats(facts: ReportFacts, files: Files) -> None:
    path = files.get("pairs")
    if path is None:
        return
    names = tables.schema_of(path).names
    labelled, floored = "target_label" in names, "below_floor" in names
    table = tables.read_columns(path, ["score", "kept", *(c for c in ("target_label", "below_floor") if c in names)])
    scores = table.column("score").to_numpy()
    kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    labels = table.column("target_label").to_pylist() if labelled else None
    # the classes named as the run's labels are (each key's first spelling, in target order)
    names = None if labels is None else {key: seen[0] for key, seen in label_spellings(labels).items()}
    by_label = None if labels is None else count_labels(list(compress(labels, kept)), names)
    spread = [float(f(scores)) for f in (np.min, np.median, np.max)] if len(scores) else [None] * 3
    facts.pairs = PairStats(len(scores), int(kept.sum()), *spread, kept_by_target_label=by_label)
    if floored:  # a run with a similarity floor says which pairs fell below it
        below = table.column("below_floor").to_numpy(zero_copy_only=False).astype(bool)
        facts.pairs.below_floor = int(below.sum())
        facts.pairs.below_by_target_label = None if labels is None else count_labels(list(compress(labels, below)), names)


def _check_mined(facts: ReportFacts, files: Files) -> None:
    path = files.get("mined")
    if path is None:
        return
    schema = tables.schema_of(path)
    rows = tables.num_rows(path)
    root = facts.image_roots.get(Side.source.input)
    guessed = not facts.has_manifest and not (facts.manifest.embedding_spec or {}).get("image_root")
    facts.mined = check = MinedCheck(name=path.name, columns=[(f.name, str(f.type)) for f in schema],
                                     rows=rows, root=root, root_guessed=guessed)
    if "filepath" not in schema.names:
        return
    column = tables.read_columns(path, ["filepath"]).column("filepath")
    binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
    paths = [None if b is None else b.decode("utf-8", errors="surrogateescape") for b in column.to_pylist()] \
        if binary else pc.cast(column, pa.string()).to_pylist()
    check.duplicates = rows - len(set(paths))
    base = Path(root) if root else path.parent
    present = [p for p in paths if p is not None]
    gone = [p for p in present if not _on_disk(p, base)]
    odd = {trait: [p for p in present if holds(p)] for trait, holds in TRAITS.items()}
    check.checked, check.missing, check.missing_examples = len(present), len(gone), gone[:MISSING_LISTED]
    check.encoding = {trait: len(found) for trait, found in odd.items()}
    check.encoding_examples = {trait: found[:3] for trait, found in odd.items()}


def _check_training_rows(facts: ReportFacts, files: Files) -> None:
    """The training CSV a ChangeNet run wrote, counted as it is now (it may have been edited or moved)."""
    path = Path(facts.folder) / artifacts.TRAINING_ROWS
    if facts.manifest.training_rows is not None and path.is_file():
        facts.training_rows_now = tables.read_csv(path).num_rows


def _changenet_sides(facts: ReportFacts, files: Files) -> None:
    """Each side given as a ChangeNet CSV: what its listing in the run folder resolved it to."""
    inputs = facts.manifest.inputs
    for side, given, name in (("target", inputs.targets, artifacts.TARGET_LISTING),
                              ("source", inputs.source, artifacts.SOURCE_LISTING)):
        path = Path(facts.folder) / name
        if given.format != "changenet" or not path.is_file():
            continue
        table = tables.read_columns(path, ["light", "csv_row"])
        lights = [x for x in dict.fromkeys(table.column("light").to_pylist()) if x is not None]
        facts.changenet[side] = ChangeNetSide(name, table.num_rows, len(set(table.column("csv_row").to_pylist())),
                                              lights)


def _leak_examples(facts: ReportFacts, files: Files, shown: int = 5) -> None:
    """The first leaks the guard left out (leaks.parquet), for the report's table of them."""
    path = Path(facts.folder) / artifacts.LEAKS
    if facts.manifest.leaks is not None and path.is_file():
        facts.leak_examples = tables.read_columns(path, tables.schema_of(path).names).slice(0, shown).to_pylist()


def _near_duplicates(facts: ReportFacts, files: Files) -> None:
    """The images the run collapsed (near_duplicates.parquet beside the mined parquet, or in the
    matcher's folder) and how many of them each pool label lost, by the per-label table's names."""
    folder, unique = Path(facts.folder), facts.manifest.mining.unique
    path = next((p for p in (folder / artifacts.NEAR_DUPLICATES,
                             None if unique is None else folder / unique.folder / artifacts.NEAR_DUPLICATES)
                 if p is not None and p.is_file()), None)
    if path is None:
        return
    dropped = tables.read_columns(path, ["filepath"]).column("filepath")
    facts.near_duplicates = found = NearDuplicates(path.relative_to(folder).as_posix(), len(dropped))
    pool = files.get("source_embeddings")
    if not found.rows or pool is None or "label" not in tables.schema_of(pool).names:
        return
    # each dropped image's first pool row's label (as label_counts takes a mined image's), null if none
    rows = tables.read_columns(pool, ["filepath", "label"])
    first = pc.index_in(dropped.cast(pa.string()), value_set=rows.column("filepath").cast(pa.string()))
    labels = label_text(rows.column("label").take(first)).to_pylist()
    shown = [x for x in {**(facts.target_labels or {}), **(facts.mined_labels or {})} if x != "(null)"]
    names = {key: seen[0] for key, seen in label_spellings(labels).items()} | \
        dict(zip(label_keys(shown).to_pylist(), shown))  # a class keeps the name the table gives it
    found.by_label = count_labels(labels, names)


def _target_texts(facts: ReportFacts, files: Files) -> None:
    """Sentences as targets (`run --text`, or a targets parquet of `text`): as the run folder's target
    listing holds them (else its target embeddings: the sentences embedded)."""
    if facts.manifest.inputs.targets.format != "text":
        return
    listing = Path(facts.folder) / artifacts.TARGET_LISTING
    path = listing if listing.is_file() else files.get("target_embeddings")
    if path is not None and "text" in tables.schema_of(path).names:
        facts.target_texts = tables.read_columns(path, ["text"]).column("text").to_pylist()


def _history_budget(facts: ReportFacts, files: Files) -> None:
    """The budget of a history run, from mining_history_summary.json (the ledger's facts omit the fraction)."""
    history = facts.manifest.history
    if history is None:
        return
    path = Path(facts.folder) / Path(history.history_summary or artifacts.MINING_HISTORY_SUMMARY).name
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("max_cumulative_fraction") is not None:
        facts.budget = Budget(float(data["max_cumulative_fraction"]), int(data["pool_size"]), int(data["budget_cap"]))


def _on_disk(path: str, base: Path) -> bool:
    try:
        return os.path.exists(resolve_image_path(path, base))
    except (ValueError, OSError):  # e.g. an embedded NUL
        return False
