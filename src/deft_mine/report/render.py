"""Mining_Report.md's text from ReportFacts: a pure function (no file access, no clock)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Iterable, Sequence

from deft_mine import rules
from deft_mine.report.facts import SPEC_PARQUETS, ReportFacts
from deft_mine.rules import NOT_RECORDED, plural
from deft_mine.schemas.artifacts import (NEAR_DUPLICATES, SUMMARY_MEANING, UNIQUE_EXCLUDE as EXCLUDE_NAME, UNIQUE_SPEC,
                                        MiningSummary)
from deft_mine.schemas.manifest import EmbedFacts, InputFacts, RunManifest
from deft_mine.schemas.inputs import LedgerFormat
from deft_mine.schemas.specs import LabelFilter, Side, recorded_floor
from deft_mine.schemas.results import EncoderIdentity
from deft_mine.schemas.warnings import WarningCode

SECTIONS = ("Verdict", "Inputs", "Encoder Consistency", "Mining Run", "Per-Label Breakdown",
            "Output Sanity", "Recommended Actions")
MIN_WORDS, MAX_WORDS = 600, 1200
MAX_LABELS = 20  # label rows shown at most
SKIP_SENTENCE = "The per-label breakdown is skipped because the targets have no `label` column."
IDENTITY_FIELDS = ("model", "model_path", "model_config_path", "weights_digest", "preprocessing")
Blocks = Iterable[tuple[int, str]]  # a section's paragraphs, each with the least detail level that shows it


@dataclass
class Finding:
    code: WarningCode
    severity: str  # "failed" | "attention"
    reason: str
    action: str | None = None


@dataclass
class Rendered:
    text: str
    words: int
    verdict: str
    findings: list[Finding]


def count_words(text: str) -> int:
    """Words as a reader counts them: whitespace-separated tokens holding a letter or digit
    (table rules and pipes are not words)."""
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def render(facts: ReportFacts) -> Rendered:
    """The report at the least detail that reaches MIN_WORDS; a big run drops explanatory prose,
    then shortens lists, to stay within MAX_WORDS."""
    found = findings(facts)
    verdict = "failed" if any(f.severity == "failed" for f in found) else "attention" if found else "ok"

    def attempt(level: int, compact: bool) -> tuple[str, int]:
        text = _assemble(facts, found, verdict, level, compact)
        return text, count_words(text)

    text, words = attempt(1, False)
    if words < MIN_WORDS and (longer := attempt(2, False))[1] <= MAX_WORDS:
        text, words = longer
    for level, compact in ((1, True), (0, False), (0, True)):
        if words <= MAX_WORDS:
            break
        text, words = attempt(level, compact)
    return Rendered(text=text, words=words, verdict=verdict, findings=found)


# ----------------------------------------------------------------------------- fact access

def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _flag(value: Any) -> str:
    """A spec switch as the spec spells it."""
    return NOT_RECORDED if value is None else str(value).lower()


def _code(value: Any) -> str:
    return NOT_RECORDED if value is None else "`" + _fmt(value).replace("`", "'") + "`"


def _secs(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, (int, float)) else NOT_RECORDED


def _path_md(path: str, always_repr: bool = False) -> str:
    """A path as inline code; escaped (Python repr) when it holds control characters or backticks."""
    odd = always_repr or "`" in path or any(ord(ch) < 32 or ord(ch) == 127 for ch in path)
    return "`" + (repr(path).replace("`", "'") if odd else path) + "`"


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _table(header: str, rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the column titles (separated by " | "), then one line per row of cells."""
    lines = [f"| {header} |", "|" + "---|" * len(header.split(" | "))]
    return "\n".join(lines + ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows])


class _View:
    """Derived facts the sections share (each computed once, from the facts only)."""

    def __init__(self, facts: ReportFacts) -> None:
        self.facts, self.m = facts, (m := facts.manifest)
        self.spec: dict[str, Any] = m.mining_spec or {}
        self.inputs: dict[str, InputFacts] = {"target": m.inputs.targets, "source": m.inputs.source}
        self.embedded: dict[str, EmbedFacts] = {"target": m.embeddings.target, "source": m.embeddings.source}
        self.summary = MiningSummary.of(m.mining.summary, m.mining.label_filter)
        self.topn = _first(m.mining.topn, self.summary.topn, self.spec.get("topn"))
        self.metric = _first(m.mining.knn_metric, self.spec.get("knn_metric"))
        self.filter_by_label = _first(m.mining.filter_by_label, self.spec.get("filter_by_label"))
        self.label_filter = m.mining.label_filter
        self.exclude_targets = self.spec.get("exclude_targets")
        self.queries = self.summary.queries
        self.pool = _first(self.summary.pool, m.embeddings.source.rows)
        self.mined_count = _first(self.summary.mined, facts.mined.rows if facts.mined is not None else None)
        self.enc_t, self.enc_s, self.match = m.encoder.target, m.encoder.source, m.encoder.match
        self.differing = [k for k in IDENTITY_FIELDS if getattr(self.enc_t, k, None) != getattr(self.enc_s, k, None)]
        self.fingerprint = _first(m.encoder.fingerprint, facts.fingerprints.get(Side.target))
        self.skipped = {side: emb.skipped for side, emb in self.embedded.items()}
        self.mined_name = facts.files.get("mined") or "mined.parquet"
        self.score_words = ("cosine similarity, higher is nearer" if self.metric == "cosine" else
                            f"{self.metric} distance, lower is nearer" if self.metric else
                            "in a metric that is not recorded")
        self.no_label_sides = [side for side in ("source", "target") if self.inputs[side].has_label is False]
        self.label_mode = self.spec.get("label_mode")  # None: a run from before the choice, or TAO's
        self.floor_key, self.floor = recorded_floor(self.spec, self.metric) or (None, None)
        self.floor_rule = self.spec.get("floor_rule") or "pair"  # a run from before the choice: the pair rule
        self.unique = m.mining.unique  # None: mode=nearest (each target's topn nearest)
        # the near-duplicate collapse's key and threshold, (None, None) when off
        self.dedup_key, self.dedup = next(((key, self.spec[key]) for key in ("dedup_similarity", "dedup_distance")
                                           if self.spec.get(key) is not None), (None, None))


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _rule_facts(v: _View) -> rules.Facts:
    """What the rulebook looks at, as the run folder records it."""
    facts, mined = v.facts, v.facts.mined
    unknown = tuple(side for side, ident in ((Side.target, v.enc_t), (Side.source, v.enc_s)) if not ident)
    roots = ", ".join(f"{side} images from `{facts.image_roots.get(side.input)}`"
                      for side in (Side.target, Side.source) if v.skipped[side] and facts.image_roots.get(side.input))
    examples = [str(e) for w in facts.warnings if w.code == "images_skipped"
                for e in (w.details.get("examples") or [])[:2]][:3]
    return rules.Facts(
        topn=v.topn, queries=v.queries, pool=v.pool, mined=v.mined_count, label_filter=v.label_filter,
        sides_without_label=tuple(v.no_label_sides), target_in_pool=v.summary.target_in_pool,
        exclude_targets=v.exclude_targets, mine_command=_mine_command(v, inline=True),
        # an unfinished run's encoders are judged by the run_failed finding
        sides_without_identity=(unknown or ("embedding",)) if v.match is None and v.m.status in (None, "finished")
        else (),
        folder=True, has_manifest=facts.has_manifest, missing_facts=len(facts.missing_facts), status=v.m.status,
        error=v.m.error, encoder_match=v.match, differing=tuple(v.differing), mined_name=v.mined_name,
        mined_file=None if mined is None else rules.MinedFile(
            rows=mined.rows, paths_checked=mined.checked, paths_missing=mined.missing,
            odd_paths=sum(mined.encoding.values()),
            schema_ok=bool(mined.columns) and mined.columns[0][0] == "filepath" and not mined.duplicates),
        summary_mined=v.summary.mined,
        floored=v.floor_key if v.floor_key is not None and v.summary.below_floor and v.summary.below_floor == (
            v.summary.pairs if v.summary.kept_pairs is None else v.summary.kept_pairs) else None,
        skipped=(v.skipped["target"] or 0, v.skipped["source"] or 0), skipped_roots=roots,
        skipped_examples=tuple(examples))


def findings(facts: ReportFacts) -> list[Finding]:
    """What needs a person's attention (or makes the run unusable), each with its action: the
    rulebook's rulings, then the run's other warnings as recorded."""
    v = _View(facts)
    # A ruling without a sentence of its own is stated as its warning, with the run's warnings.
    out = [Finding(r.code, r.severity, r.reason, r.action) for r in rules.rule(_rule_facts(v)) if r.reason is not None]
    covered = {f.code for f in out}
    for warning in facts.warnings:
        if warning.code not in covered:
            covered.add(warning.code)
            out.append(Finding(warning.code, "attention", rules.short(warning.message, 40),
                               rules.CONTROL_ACTIONS.get(warning.code)))
    return out


def _assemble(facts: ReportFacts, found: list[Finding], verdict: str, level: int, compact: bool) -> str:
    v = _View(facts)
    run_name = (v.m.run_dir or facts.folder).rstrip("/").rsplit("/", 1)[-1]
    parts = [f"# Mining Report — `{run_name}`\n"]
    sections: list[tuple[str, Callable[..., Blocks]]] = list(zip(SECTIONS, (
        _verdict_section, _inputs_section, _encoder_section, _mining_section, _labels_section,
        _sanity_section, _actions_section)))
    if v.unique is not None:  # mode=unique: how the budget was spent, after the mining step
        sections.insert(SECTIONS.index("Mining Run") + 1, ("Budget", _budget_section))
    if v.m.leaks is not None:  # the leakage guard ran (or found a byte copy of a target): after the mining step
        sections.insert([t for t, _ in sections].index("Mining Run") + 1, ("Leakage Guard", _leaks_section))
    if v.m.history is not None:  # iterative runs: before the actions, what earlier rounds took
        sections.insert(-1, ("History", _history_section))
    if v.m.training_rows is not None:  # a ChangeNet pool: the next round's training rows
        sections.insert(-1, ("Training Rows", _training_section))
    for title, build in sections:
        body = "\n\n".join(text for need, text in build(v, found, verdict, compact) if need <= level and text)
        parts.append(f"## {title}\n\n{body}\n")
    return "\n".join(parts)


def _verdict_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    mined = (f"{plural(v.queries, 'target')} mined {plural(v.mined_count, 'unique pool image')} "
             f"from {plural(v.pool, 'pool row')}")
    headline = {
        "ok": f"{mined} with one encoder on both sides; nothing needs attention.",
        "attention": f"{mined}, but {plural(len(found), 'finding')} "
                     f"{'needs' if len(found) == 1 else 'need'} a look before the images go to training.",
        "failed": "the mined set must not be used: " + "; ".join(f.reason for f in found if f.severity == "failed") + ".",
    }[verdict]
    controls = ([f"label_mode={v.label_mode}"] if v.label_filter is LabelFilter.applied and v.label_mode else []) \
        + ([f"{v.floor_key}={_fmt(v.floor)}"] if v.floor_key else []) \
        + ([f"{v.dedup_key}={_fmt(v.dedup)}"] if v.dedup_key else [])  # the controls a run set beyond TAO's
    params = (f"topn={_fmt(v.topn)}, knn_metric={_fmt(v.metric)}, filter_by_label={_flag(v.filter_by_label)}"
              + (f" ({v.label_filter})" if v.label_filter else "") + "".join(f", {c}" for c in controls))
    if v.unique is not None:
        params = (f"mode=unique, desired_unique_count={v.unique.desired}, allocation_policy="
                  f"{v.unique.allocation_policy}, knn_metric={_fmt(v.metric)}")
    encoder = (f"{_code(getattr(v.enc_t, 'model', None))} (fingerprint {_code(v.fingerprint)}), "
               + {True: "the same on both sides", False: "DIFFERENT on the two sides",
                  None: "match not recorded"}[v.match])
    m = v.m
    when = (f"{_fmt(m.status)}, started {_fmt(m.started_at)}, finished "
            f"{_fmt(m.finished_at)}, backend {_fmt(m.backend)} on host {_fmt(m.host)}, "
            f"deft-mine {_fmt(m.deft_mine_version)}") if v.facts.has_manifest else \
        "no run.json in this folder: status, times and host are not recorded"

    def rows_in(side: str) -> str:
        listed, embedded = v.inputs[side].rows, v.embedded[side].rows
        only = (" (rows of its embedding parquet; the input file's rows are not recorded)"
                if listed is None and embedded is not None else "")
        return f"**{_fmt(_first(listed, embedded))}**{only}"

    yield 0, f"**Verdict: {verdict.upper()}** — {headline}"
    yield 0, "\n".join([
        f"- Targets in: {rows_in('target')}",
        f"- Pool in: {rows_in('source')}",
        f"- Mined out: **{_fmt(v.mined_count)}** unique images → `{v.mined_name}`",
        f"- Encoder: {encoder}",
        f"- Parameters: {params}",
        f"- Run: {when}",
    ])
    if found:
        limit, words = (5, 15) if compact else (12, 40)
        yield 0, ("Findings behind this verdict:\n\n" + "\n".join(
            f"- **{f.code}** ({f.severity}): {rules.short(f.reason, words)}." for f in found[:limit])
            + (f"\n- and {len(found) - limit} more (see the report tool's warnings)" if len(found) > limit else ""))
    if v.facts.missing_facts:
        yield 0, ("Facts this folder does not record, so the report cannot state them: "
               + ", ".join(f"`{x}`" for x in v.facts.missing_facts) + ".")
    yield 1, ("An OK verdict means every recorded check passed: the run finished, both sides "
              "used one encoder, no image was skipped, no requested filter was silently "
              "ignored and every mined path exists. ATTENTION means the output is usable but "
              "a finding above deserves a decision first; FAILED means the mined set must not "
              "be used as it is.")
    yield 2, ("Every number in this report is read from the run's recorded facts (run.json, "
              "the mining summary and the parquet files of this folder) and none is typed by "
              "hand, so regenerating the report from the same folder gives the same text.")


def _inputs_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    facts = v.facts
    limit = 6 if compact else 12
    rows, columns, skips = [], [], []
    for side, name in (("target", "Targets"), ("source", "Pool")):
        inp, emb, cols = v.inputs[side], v.embedded[side], v.inputs[side].columns
        rows.append((name, _code(inp.path), inp.rows, emb.rows, emb.skipped, inp.has_label, _CONVERTED.get(
            inp.format, inp.format == "csv")))
        if inp.format == "changenet":
            columns.append(_changenet_words(facts, side, name, inp))
        if inp.format == "text" and side == "target":
            columns.append(_sentences_words(facts, inp))
        if cols:
            shown = ", ".join(f"`{c}`" for c in cols[:limit]) + (f" and {len(cols) - limit} more" if len(cols) > limit else "")
            columns.append(f"{name} columns ({len(cols)}): {shown}.")
        if emb.skipped_by_reason:
            things = "sentences" if inp.format == "text" else "images"
            skips.append(f"Skipped {name.lower()} {things} by reason: "
                         + ", ".join(f"{n} {r}" for r, n in sorted(emb.skipped_by_reason.items())) + ".")
    yield 0, _table("Side | Path | Rows | Embedded | Skipped | Has `label` | Converted from CSV", rows)
    lines = columns + skips
    dim = _first(v.embedded["target"].embedding_dim, v.embedded["source"].embedding_dim)
    device = v.embedded["target"].device
    if dim is not None:
        lines.append(f"Embedding vectors have {dim} dimensions" + (f" and were computed on `{device}`." if device else "."))
    roots = [f"{name} images from `{facts.image_roots[side.input]}`" for side, name in ((Side.target, "target"),
             (Side.source, "pool")) if facts.image_roots.get(side.input)
             and v.inputs[side.value].format != "text"]  # sentences resolve against nothing
    if roots:
        lines.append("Relative image paths resolve against: " + "; ".join(roots) + ".")
    if lines:
        yield 0, " ".join(lines)
    yield 1, ("*Rows* is the length of each input file, *Embedded* the rows written to its "
              "embedding parquet, and *Skipped* the rows left out because their image could not "
              "be read. A `label` column on both sides is what makes the label filter and the "
              "per-label breakdown possible; a CSV pool is read as it is and its columns are "
              "carried into the embedding parquet.")
    yield 2, ("The targets are the images the last DEFT round's gap analysis found the model "
              "weakest on; the pool is the large set of unused images searched for look-alikes. "
              "Every input column (such as `siamese_score` or `weakness`) travels with the "
              "embeddings, so later steps can still see it.")


# The Inputs table's "Converted from CSV" cell for each input format (any other: whether it is "csv").
_CONVERTED: dict[str | None, Any] = {None: None, "changenet": "yes, ChangeNet CSV"}


SENTENCES_LISTED, SENTENCE_WORDS = 8, 12  # sentences quoted in the Inputs section, words of each


def _sentences_words(facts: ReportFacts, inp: InputFacts) -> str:
    """Targets given as sentences: how many, and (when few) the sentences themselves, shortened."""
    texts = facts.target_texts
    if texts is None:
        return (f"Targets are {plural(inp.rows, 'sentence')}, embedded by the text tower of the pool's model "
                "(the sentences are not recorded: the run folder has no listing of them).")
    given = [t.strip() for t in texts if t is not None and t.strip()]  # blank ones were skipped, and counted
    quoted = ", ".join(f"“{_cell(rules.short(t, SENTENCE_WORDS))}”" for t in given[:SENTENCES_LISTED])
    more = f", and {len(given) - SENTENCES_LISTED} more" if len(given) > SENTENCES_LISTED else ""
    return (f"Targets are {plural(len(given), 'sentence')}, embedded by the text tower of the pool's model "
            f"into its image space and searched for like target images: {quoted}{more}.")


def _changenet_words(facts: ReportFacts, side: str, name: str, inp: InputFacts) -> str:
    """What a ChangeNet CSV side was resolved to: images over its lights, from its listing in the folder."""
    found = facts.changenet.get(side)
    if found is None:
        return (f"{name} is a ChangeNet CSV, resolved to {plural(inp.rows, 'image')} (its lights are not "
                "recorded: the run folder has no listing of it).")
    lights = ", ".join(f"`{_cell(x)}`" for x in found.lights)
    return (f"{name} is a ChangeNet CSV, resolved to {plural(found.images, 'image')} over its "
            f"{plural(len(found.lights), 'light')} ({lights}) from {plural(found.csv_rows, 'CSV row')}, "
            f"listed in `{found.listing}` as every step read them.")


def _encoder_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    rows = [(f"`{key}`", _identity_cell(v.enc_t, key), _identity_cell(v.enc_s, key))
            for key in IDENTITY_FIELDS]
    fps = [v.facts.fingerprints.get(side) for side in (Side.target, Side.source)]
    if any(fps):
        rows.append(("fingerprint", _cell(fps[0]), _cell(fps[1])))
    yield 0, _table("Field | Targets | Pool", rows)
    yield 0, (f"**Encoder match: yes** — both sides were embedded with the same encoder identity "
              f"(fingerprint `{_fmt(v.fingerprint)}`), so target and pool vectors are comparable." if v.match else
              f"**Encoder match: NO** — the two sides differ in {', '.join(v.differing) or 'their identity'}; "
              "distances between their vectors mean nothing, so the verdict is FAILED." if v.match is False else
              "**Encoder match: unknown** — the run stopped before both sides were embedded, so "
              "there is no pair of identities to compare." if v.facts.has_manifest and v.m.status != "finished" else
              "**Encoder match: unknown** — at least one side records no encoder identity "
              "(for example an embedding parquet written by the TAO container), so the match "
              "cannot be confirmed.")
    spec = v.m.embedding_spec or {}
    if getattr(v.enc_t, "model", None) == "thumbnail" and spec.get("model_path"):
        yield 1, (f"The spec's `model_path` ({_code(spec.get('model_path'))}) is ignored by the "
                  "weight-free `thumbnail` encoder and is therefore no part of its identity.")
    if spec.get("batch_size") is not None:
        yield 1, (f"The batch size ({spec.get('batch_size')}) is not part of the identity: it "
                  "changes speed and memory, never the vectors.")
    yield 1, ("The identity is what makes two embeddings comparable: the model, where its "
              "weights came from (path and, for local weights, their digest) and the "
              "preprocessing applied to every image. Mining compares target vectors with "
              "pool vectors, so both sides must share it exactly.")
    yield 2, ("Mixing encoders is the most common silent failure of this workflow: the run "
              "completes and the mined images simply look unrelated to the targets. deft-mine "
              "records the identity inside each embedding parquet and refuses to mine two "
              "files whose identities differ.")


def _identity_cell(identity: EncoderIdentity | None, key: str) -> str:
    value = getattr(identity, key, None)
    return NOT_RECORDED if identity is None else "none" if value is None else _cell(value)


def _mine_command(v: _View, inline: bool = False) -> str:
    files = v.facts.files
    folder = (v.m.run_dir or v.facts.folder).rstrip("/")
    parts = ["deft-mine mine"] + ([f"-e {folder}/{files['mining_spec']}"] if files.get("mining_spec") else [])
    for key, (role, default) in SPEC_PARQUETS.items():
        parts.append(f"{key}={v.spec.get(key) or folder + '/' + (files.get(role) or default)}")
    parts += [f"{key}={str(value).lower()}" for key, value in (("topn", v.topn), ("knn_metric", v.metric),
              ("filter_by_label", v.filter_by_label)) if value is not None]
    if v.label_mode and v.label_mode != "post_filter":
        parts.append(f"label_mode={v.label_mode}")
    if v.floor_key:
        parts.append(f"{v.floor_key}={_fmt(v.floor)}")
        parts += [f"floor_rule={v.floor_rule}"] if v.floor_rule != "pair" else []
    if v.dedup_key:
        parts.append(f"{v.dedup_key}={_fmt(v.dedup)}")
    command = " ".join(parts)
    return f"`{command}`" if inline else f"```\n{command}\n```"


def _mining_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    facts = v.facts
    if v.unique is not None:
        yield from _unique_mining_words(v)
    else:
        yield 0, "The command equivalent of this mining step (re-run it to mine again without re-embedding):\n\n" \
            + _mine_command(v)
        yield 0, (f"Parameters: `topn` = {_fmt(v.topn)}, `knn_metric` = {_fmt(v.metric)} (scores are "
                  f"{v.score_words}), `filter_by_label` = {_flag(v.filter_by_label)}, "
                  f"`exclude_targets` = {_flag(v.exclude_targets)}"
                  + "".join(f", `{key}` = {_fmt(value)}" for key, value in (
                      ("label_mode", v.label_mode if v.label_filter is LabelFilter.applied else None),
                      (v.floor_key, v.floor), (v.dedup_key, v.dedup)) if key and value is not None) + ".")
    if counts := v.summary.as_dict():
        table = _table("Count | Value | Meaning", [(f"`{key}`", _cell(value), SUMMARY_MEANING.get(key, ""))
                                                  for key, value in counts.items()])
        name = facts.files.get("summary") or "mining_summary.txt"
        yield 0, f"Every count of `{name}`:\n\n{table}"
    else:
        yield 0, "No mining summary was recorded, so the counts of the mining step are not known."
    kept, dropped = v.summary.kept_pairs, v.summary.dropped_pairs
    if v.floor_key:
        yield 0, _floor_words(v)
    if v.summary.identical_images:
        yield 0, _identical_words(v)
    if v.dedup_key:
        yield 0, _dedup_words(v)
    if "near_duplicates" in facts.pictures:
        yield 0, _near_picture_words(v)
    within = f"Of {_fmt(v.summary.pairs)} pairs found"
    yield 0, "" if v.unique is not None else {
        LabelFilter.applied: (
            "Label filter: applied per label (`label_mode` = per_label): each target's `topn` was searched among "
            "the pool rows of its own label only, so every pair found shares its target's label; "
            f"{_fmt(kept)} pairs were kept." if v.label_mode == "per_label" else
            "Label filter: applied" + (" as a post-filter (`label_mode` = post_filter)" if v.label_mode else "")
            + f". {within}, {_fmt(kept)} had matching labels and were kept, {_fmt(dropped)} were dropped; "
            "the filter no-op did not fire."),
        LabelFilter.noop: "Label filter: **no-op**. `filter_by_label` was true, but the "
                          f"{' and '.join(v.no_label_sides) or 'one'} side has no `label` column, so every pair "
                          "was kept unfiltered (warning `filter_by_label_noop`).",
        LabelFilter.off: "Label filter: off (`filter_by_label` = false), so every pair found was kept and the no-op "
                         "cannot fire.",
    }.get(v.label_filter or "", "Label filter: whether it was applied is not recorded.")
    if facts.pairs is not None and facts.pairs.pairs:
        p = facts.pairs
        yield 0, (f"Neighbour scores ({v.score_words}) of the {p.pairs} pairs range from "
                  f"{_fmt(p.score_min)} to {_fmt(p.score_max)}, median {_fmt(p.score_median)}.")
    if "score_histogram" in facts.pictures:
        stacked = v.label_filter is LabelFilter.applied or v.floor_key is not None
        what = ("every pair found" + (", kept and dropped pairs stacked" if stacked else "")
                if facts.histogram_from == "pairs" else "the best score of each mined image")
        what += f"; the vertical line is the floor, `{v.floor_key}` = {_fmt(v.floor)}" if v.floor_key else ""
        yield 0, (f"![Neighbour score histogram]({facts.pictures['score_histogram']})\n\n"
                  f"The histogram shows {what}.")
    elif facts.mined is not None:
        yield 0, "No score histogram: " + _no_picture(facts, "a `score` column in the mined parquet") + "."
    if any(e.reused is not None for e in v.embedded.values()):
        t, s = v.embedded["target"], v.embedded["source"]
        yield 0, (("Embedding store: off, so every image was embedded." if not (t.store or s.store) else
                   f"Embedding store `{t.store or s.store}`: targets {_fmt(t.reused)} reused and "
                   f"{_fmt(t.embedded)} embedded, pool {_fmt(s.reused)} reused and {_fmt(s.embedded)} "
                   f"embedded; reusing vectors saved about {_secs((t.seconds_saved or 0) + (s.seconds_saved or 0))} "
                   "of embedding (what those images cost when they were first embedded)."))
    if cluster := _cluster_words(v.m):
        yield 0, cluster
    if timings := v.m.timings:
        yield 1, (f"Timings: embedding the targets took {_secs(timings.get('embed_targets'))}, the pool "
                  f"{_secs(timings.get('embed_source'))}, mining {_secs(timings.get('mine'))}; "
                  f"{_secs(timings.get('total'))} in all.")
    if v.unique is not None:
        yield 1, ("Matching to a budget gives each pool file to one target only: in passes, every target "
                  "claims its share of the nearest free files, a target that cannot fill its share is "
                  "retried wider, and the nearest claims fill the budget. Each pair above is a selected "
                  "file with the target that claimed it, so no file is mined twice.")
        return
    yield 1, ("Mining takes, for every target in file order, the `topn` nearest pool rows "
              "(ties go to the lower pool row), optionally drops pairs whose labels differ, "
              "then merges the kept pairs across targets: an image several targets found is "
              "mined once, which is what `duplicates_removed` counts.")
    yield 2, ("When `topn` × targets exceeds the pool, targets necessarily share neighbours and "
              "the mined count falls below the request; that is normal, and the report states "
              "the actual number rather than the requested one.")


def _identical_words(v: _View) -> str:
    """Mined images whose files repeat an earlier mined image's bytes under another path: mined once."""
    n = v.summary.identical_images or 0
    if (u := v.unique) is not None:  # mode=unique: set aside while claiming, listed in the matcher's folder
        return (f"Identical files: {plural(n, 'pool image')} repeated the bytes of a file already held and "
                f"{'was' if n == 1 else 'were'} never claimed (listed in `{u.folder}/{NEAR_DUPLICATES}`, `kind` "
                "identical_bytes).")
    return (f"Identical files: {plural(n, 'mined image')} repeated the bytes of an image mined before "
            f"{'it' if n == 1 else 'them'} under another path and {'was' if n == 1 else 'were'} mined once "
            f"(listed in `{NEAR_DUPLICATES}`, `kind` identical_bytes).")


def _dedup_words(v: _View) -> str:
    """The near-duplicate collapse: its threshold, how many images it dropped, where they are listed."""
    removed, near = v.summary.near_duplicates_removed, "similarity" if v.dedup_key == "dedup_similarity" else "distance"
    if (u := v.unique) is not None:  # mode=unique: the rule works while claiming, its list in the matcher's folder
        removed = u.near_duplicates_removed if removed is None else removed
        return (f"Near-duplicate rule (`{v.dedup_key}` = {_fmt(v.dedup)}): {plural(removed, 'pool image')} lay "
                f"within that {near} of a file already held and {'was' if removed == 1 else 'were'} never claimed "
                "(nor does a target take two files that close in one pass), so no two of the "
                f"{_fmt(v.mined_count)} selected images lie that close; `{u.folder}/{NEAR_DUPLICATES}` maps each "
                "image set aside to the held file it lies nearest (`duplicate_of`).")
    return (f"Near-duplicate collapse (`{v.dedup_key}` = {_fmt(v.dedup)}): walking the mined images in order "
            f"(target order, then rank), {plural(removed, 'image')} lay within that {near} of an image kept "
            f"before {'it' if removed == 1 else 'them'} and {'was' if removed == 1 else 'were'} dropped, so "
            f"{_fmt(v.mined_count)} distinct images remain; `{NEAR_DUPLICATES}` maps each dropped "
            "image to the kept one (`duplicate_of`).")


def _near_picture_words(v: _View) -> str:
    """The sheet of collapsed groups: what a row shows."""
    score = "similarity" if v.metric == "cosine" else "distance"
    return (f"![Mined images kept beside the ones collapsed into them]({v.facts.pictures['near_duplicates']})\n\n"
            f"Each row: a mined image kept (green), then the images collapsed into it (red), captioned with "
            f"their {score} to it (`same bytes` for identical files) and their `kind`.")


def _unique_mining_words(v: _View) -> Blocks:
    """mode=unique's command and parameters (the budget itself has its own section)."""
    u = v.unique
    assert u is not None
    folder = (v.m.run_dir or v.facts.folder).rstrip("/")
    yield 0, ("The command equivalent of this matching step (re-run it to match again without re-embedding; "
              "it rewrites the matcher's folder, not `mined.parquet`):\n\n"
              f"```\ndeft-mine match -e {folder}/{u.folder}/{UNIQUE_SPEC}\n```")
    yield 0, (f"Parameters: `mode` = unique (`tmm unique_neighbor_matching`), `desired_unique_count` = {u.desired}, "
              f"`allocation_policy` = {u.allocation_policy}"
              + (f", `rare_class_list` = {', '.join(u.rare_classes)}" if u.rare_classes else "")
              + f", `knn_metric` = {_fmt(v.metric)} (on L2-normalised vectors; scores are {v.score_words}), "
              f"`candidate_expansion_factor` = {_fmt(u.candidate_expansion_factor)}. There is no `topn`, label "
              "filter or floor in this mode: the budget decides how many images are mined.")


def _budget_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    u = v.unique
    assert u is not None  # _assemble adds this section only for runs with mode=unique
    short = [g for g in u.groups if g.shortfall]
    yield 0, (f"Budget: {plural(u.desired, 'unique image')} desired, {u.retrieved} retrieved "
              f"({_fmt(u.coverage_pct)}% coverage) in {plural(u.passes, 'pass')}, allocation_policy "
              f"`{u.allocation_policy}`; each selected pool file is claimed by exactly one target. "
              + ("The budget was spent in full." if not short else
                 f"It fell short by {u.desired - u.retrieved} (warning `unique_count_short`)."))
    stratified = u.allocation_policy == "class_stratified"
    rows = [(f"`{_cell(g.group)}`", g.quota, g.got, *((g.from_non_rare,) if stratified else ()), g.shortfall,
             f"`{g.reason}`" if g.reason else "—") for g in u.groups]
    yield 0, _table("Group | Quota | Got | " + ("From non_rare | " if stratified else "") + "Shortfall | Reason", rows)
    yield 0, ("*Quota* is the group's share of the budget"
              + (" (split over the rare classes and `non_rare` by the targets' class ratio)" if stratified else "")
              + ", *Got* the files it selected"
              + (" (*From non_rare*: of those, taken from the `non_rare` pool once the class's own ran dry)"
                 if stratified else "") + ". A shortfall's reason: `pool_spent` (every file its pools hold "
              "is selected), `class_empty` (the class has no pool rows; only the `non_rare` fallback fed it), "
              "`excluded` (excluded rows could have filled it).")
    if u.excluded_rows:
        yield 0, (f"{plural(u.excluded_rows, 'pool row')} were kept out of the budget as selected by earlier "
                  f"iterations of the ledger (`{EXCLUDE_NAME}`, the matcher's `exclude_path`).")
    yield 1, (f"The matcher's own files are in `{u.folder}/`: `final_unique_files.parquet`, `summary.json` "
              "(the container's keys, then the passes and the shortfall) and one parquet per pass.")


def _floor_words(v: _View) -> str:
    """What the similarity floor did, and by which rule: pairs below it, targets left with nothing."""
    side = "below" if v.floor_key == "min_similarity" else "beyond"
    alone, summary = v.summary.targets_without_neighbours, v.summary
    threshold = None if v.floor is None else 1 - v.floor if v.floor_key == "min_similarity" else v.floor
    looked_at = (f"{_fmt(summary.pairs)} pairs found" if summary.kept_pairs is None else
                 f"{_fmt(summary.kept_pairs)} pairs the label filter kept")
    judged = (f"scored {side} it" if v.floor_rule == "pair" else
              "belong to images whose best similarity to any target"
              + (" of their label" if v.label_filter is LabelFilter.applied else "") + f" lies {side} it")
    # The rule's two words stand where "at all" stood after "kept no neighbour": a report near its
    # word budget keeps its level of detail.
    return (f"Similarity floor (`floor_rule` = {v.floor_rule}): `{v.floor_key}` = {_fmt(v.floor)} (the container's "
            f"`distance_threshold` = {_fmt(threshold)}); {_fmt(summary.below_floor)} of the {looked_at} {judged} "
            f"and were dropped before de-duplication, and {plural(alone, 'target')} kept no neighbour"
            + (" (warning `targets_without_neighbours`)." if alone else ".") + _FLOOR_RULES.get(v.floor_rule, ""))


# What a rule other than the per-pair one (the container's) does, said after its counts.
_FLOOR_RULES = {
    "best_target": " Under `best_target` (the DEFT loop's cosine filter) an image the label rule let through is "
                   "kept when its best cosine similarity over all targets (the same-label ones under the label "
                   "filter) reaches the floor, so it may keep an image whose own pairs fell short; the kept images "
                   "carry `max_cosine_similarity` and `matched_target_filepath`, and `cosine_filter_summary.json` "
                   "audits every candidate.",
}


def _cluster_words(m: RunManifest) -> str | None:
    """The Ray cluster a run used and what each step ran on it (None: no step ran on one)."""
    steps = [(what, facts.cluster, kind) for what, facts, kind in (
        ("embedding the targets", m.embeddings.target, "encoder actor"),
        ("the pool", m.embeddings.source, "encoder actor"), ("mining", m.mining, "shard task")) if facts.cluster]
    if not steps:
        return None
    c = steps[-1][1]
    used = "; ".join(f"{what} ran {plural(f.workers, kind)} on {plural(f.nodes_used, 'node')}"
                     + (f" with {f.gpus_used:g} GPU(s)" if f.gpus_used else "") for what, f, kind in steps)
    return (f"Cluster: Ray {c.ray_version} at {_code(c.address)}, {plural(c.nodes, 'node')} with {c.cpus:g} "
            f"CPU(s) and {c.gpus:g} GPU(s); {used}.")


def labels_shown(targets: dict[str, int], mined: dict[str, int] | None,
                 limit: int = 20) -> tuple[list[str], list[str]]:
    """The labels a table or chart shows (by name; the `limit` with most targets, then most
    mined, when there are more) and the rest."""
    labels = sorted(set(targets) | set(mined or {}))
    if len(labels) <= limit:
        return labels, []
    ranked = sorted(labels, key=lambda x: (-targets.get(x, 0), -(mined or {}).get(x, 0), x))
    return sorted(ranked[:limit]), sorted(ranked[limit:])


def _labels_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    facts = v.facts
    if v.inputs["target"].has_label is False or facts.target_labels is None:
        yield 0, SKIP_SENTENCE
        return
    targets, mined = facts.target_labels, facts.mined_labels
    kept = facts.pairs.kept_by_target_label if facts.pairs is not None else None
    below = facts.pairs.below_by_target_label if facts.pairs is not None and v.floor_key else None
    kept_total = sum(kept.values()) if kept else 0
    near = facts.near_duplicates
    collapsed = near.by_label if near is not None and near.rows else None  # a column only when any was
    # a label only collapsed images carry still gets a row, so the column adds up
    shown, rest = labels_shown(targets, None if mined is None else dict.fromkeys(collapsed or (), 0) | mined,
                               10 if compact else MAX_LABELS)
    rows = []
    for label in shown:
        n_mined, n_kept = (None if counts is None else counts.get(label, 0) for counts in (mined, kept))
        share = "n/a" if n_kept is None or not kept_total else f"{100.0 * n_kept / kept_total:.1f}%"
        rows.append((f"`{_cell(label)}`", targets.get(label, 0), "n/a" if n_mined is None else n_mined,
                     "n/a" if n_kept is None else n_kept, share)
                    + ((below.get(label, 0),) if below is not None else ())
                    + ((collapsed.get(label, 0),) if collapsed is not None else ()))
    defs = ("*Targets* counts the target rows with each label. *Mined (pool label)* counts the unique "
            f"images in `{v.mined_name}` whose own pool `label` is that label"
            + (" (n/a: the pool has no `label` column)" if mined is None else "")
            + ". *Kept pairs* counts the kept (target, neighbour) pairs whose target has that label, and "
              "the share is that count over all kept pairs"
            + (" (n/a: no pairs file)" if kept is None else "") + ".")
    if below is not None:
        defs += f" *Below floor* counts the pairs of that label's targets dropped by `{v.floor_key}`."
    if collapsed is not None:
        defs += (f" *Collapsed* counts the images of `{near.name if near else NEAR_DUPLICATES}` (near duplicates "
                 "and identical files, no longer mined) whose own pool `label` is that label.")
    header = "Label | Targets | Mined (pool label) | Kept pairs | Share of kept pairs" + \
        (" | Below floor" if below is not None else "") + (" | Collapsed" if collapsed is not None else "")
    yield 0, _table(header, rows)
    yield 0, defs
    if facts.merged_labels:
        yield 0, ("Labels compare as the TAO container compares them (case and surrounding spaces do not "
                  "matter), so these spellings were counted as one class each: " + "; ".join(
                      f"{', '.join(f'`{_cell(s)}`' for s in seen)} → `{_cell(name)}`"
                      for name, seen in sorted(facts.merged_labels.items())) + ".")
    if rest:
        yield 0, (f"{len(rest)} more labels are not shown ({sum(targets.get(x, 0) for x in rest)} targets"
                  + (f", {sum(mined.get(x, 0) for x in rest)} mined" if mined is not None else "") + ").")
    if "labels" in facts.pictures:
        yield 0, f"![Targets and mined images per label]({facts.pictures['labels']})"
    if extra := [x for x in (mined or {}) if x not in targets]:
        yield 1, (f"{len(extra)} mined labels belong to no target (rows with 0 targets): a "
                  "neighbour from another defect class, which the label filter would drop.")
    yield 1, (("A label whose mined count is far below its target count has few look-alikes in "
               "the pool; one far above it is over-represented in the next round unless "
               "balanced. " if mined is not None else
               "A label with a small share of the kept pairs has few close look-alikes in the "
               "pool, whatever their own class. ")
              + ("With the label filter applied, every kept pair joins a target and a pool image "
                 "of the same label" + (" (searched per label, so a label rare in the pool keeps "
                                        "up to `topn` pairs per target)." if v.label_mode == "per_label"
                                        else ".") if v.label_filter is LabelFilter.applied else
                 "Without the label filter, a target's neighbours may carry other labels, which "
                 "the contact sheet shows pair by pair."))


def _sanity_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    facts, mined = v.facts, v.facts.mined
    if mined is None:
        yield 0, "No mined parquet exists in this folder, so its schema and paths cannot be checked."
    else:
        schema = ", ".join(f"`{name}` ({kind})" for name, kind in mined.columns)
        first = bool(mined.columns) and mined.columns[0][0] == "filepath"
        agree = v.summary.mined
        yield 0, (f"Schema of `{mined.name}`: {schema}. `filepath` is the first column: "
                  f"{_fmt(first)}. Rows: {mined.rows}"
                  + (f" (the summary records {agree}: " + ("they agree" if agree == mined.rows else "they DIFFER") + ")"
                     if agree is not None else "")
                  + f". Repeated paths: {mined.duplicates}.")
        where = (f" (relative paths resolved against `{mined.root}`"
                 + (", guessed because no run.json names the image folder" if mined.root_guessed else "") + ")"
                 if mined.root else "")
        line = f"On disk: {mined.checked - mined.missing} of {mined.checked} mined paths exist{where}."
        if mined.missing:
            shown = mined.missing_examples[:5 if compact else 10]
            line += (f" Missing ({mined.missing}" + (f", first {len(shown)} listed" if mined.missing > len(shown) else "")
                     + "):\n\n" + "\n".join(f"- {_path_md(p)}" for p in shown))
        yield 0, line
        names = {"non_utf8": "non-UTF-8 characters", "control": "control characters", "backslash": "backslashes"}
        issues = "; ".join(f"{mined.encoding[k]} with {names[k]} "
                           f"(e.g. {_path_md(mined.encoding_examples[k][0], True)})"
                           for k in names if mined.encoding.get(k))
        none = f"none of the {mined.rows} paths holds non-UTF-8 characters, control characters or backslashes"
        yield 0, f"Path encoding check: {issues or none}."
    in_pool = v.summary.target_in_pool
    yield 0, ("Targets found in the pool: " + (
        "not recorded." if in_pool is None else f"{plural(in_pool, 'pool row')} with a target's filepath"
        + (" (removed before the search, exclude_targets=true)." if v.exclude_targets else
           " (searched like any other row; exclude_targets=false)." if in_pool else ".")))
    skipped = [v.skipped["target"], v.skipped["source"]]
    yield 0, ("Images skipped while embedding: " + ("not recorded." if skipped == [None, None] else
              f"{plural(skipped[0], 'target')}, {plural(skipped[1], 'pool row')}."))
    codes = list(dict.fromkeys(w.code for w in facts.warnings))
    listed = ", ".join(f"`{c}`" for c in codes[:12]) + (f" and {len(codes) - 12} more" if codes[12:] else "")
    warned = (": none could be, without run.json; the findings under Verdict are derived from the files "
              "themselves" if not facts.has_manifest else ": none" if not codes else
              f" ({len(facts.warnings)}, each explained under Verdict): {listed}")
    yield 0, f"Warnings recorded for this run{warned}."
    if "contact_sheet" in facts.pictures:
        src = ("its nearest pool neighbours in rank order with their score and label; dropped pairs have a red "
               "frame, kept ones a green frame" if facts.contact_from == "pairs" else
               "the mined images it was the best target of, with their best score")
        target = ("a target sentence (blue frame, its words in place of an image)" if facts.target_texts is not None
                  else "a target (blue frame)")
        yield 0, (f"![Contact sheet]({facts.pictures['contact_sheet']})\n\n"
                  f"The contact sheet shows the first {facts.contact_targets} targets; each row "
                  f"is {target} followed by up to {facts.contact_neighbours} of {src}. "
                  "Unreadable images appear as grey tiles marked missing.")
        yield 1, ("Look at the contact sheet before training: neighbours that do not resemble "
                  "their target point at an encoder or path problem that no count can reveal.")
    elif facts.mined is not None:
        yield 0, "No contact sheet: " + _no_picture(facts, "a `best_target` column in the mined parquet") + "."
    yield 2, ("These checks read the files as they are now, so restoring a missing image or "
              "fixing a path and regenerating the report updates this section.")


def _no_picture(facts: ReportFacts, fallback: str) -> str:
    if facts.files.get("pairs") is None:
        return f"the folder has no mined_pairs.parquet, nor {fallback} to draw from"
    return "drawing it failed (the report tool's result names the error)"


def _history_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    history, budget = v.m.history, v.facts.budget
    assert history is not None  # _assemble adds this section only for runs with a ledger
    skill = history.ledger_format is LedgerFormat.tao_skill
    rows = [(it.iteration, it.candidates, it.previously_selected, it.newly_selected, it.cumulative)
            for it in history.iterations]
    yield 0, (f"This run is iteration {_fmt(history.iteration)} of the ledger {_path_md(history.ledger)}"
              + (" (the DEFT loop's `mining_history.json`, format `tao-skill`)" if skill else "")
              + f": of {plural(history.candidates, 'mined candidate')} "
              f"in `mined_candidates.parquet`, {_fmt(history.previously_selected)} were selected by "
              f"earlier iterations and {_fmt(history.duplicates_in_candidates)} repeated a candidate, "
              f"so `mined.parquet` holds {plural(history.newly_selected, 'newly selected image')}.")
    if budget is not None or history.budget_excluded_count:
        cap = ("" if budget is None else f"`max_cumulative_fraction` = {_fmt(budget.fraction)} of "
               f"{plural(budget.pool_size, 'pool row')} caps all iterations together at "
               f"{plural(budget.cap, 'image')}; ")
        yield 0, (f"Budget: {cap}{plural(history.budget_excluded_count, 'new candidate')} "
                  f"{'was' if history.budget_excluded_count == 1 else 'were'} left out by it (`budget_excluded_count`"
                  + (", warning `budget_exhausted`)." if history.budget_excluded_count else ").")
                  + (f" `{PurePath(history.history_summary).name}` records the iteration's counts with the loop's keys."
                     if history.history_summary else ""))
    yield 0, _table("Iteration | Candidates | Previously selected | Newly selected | Cumulative total", rows)
    identity = ("as written: stripped, backslashes made slashes, POSIX-normalised; the loop's identity "
                "`filepath`" if skill else "absolute, normalised")
    yield 1, (f"The ledger records, per iteration, the selected paths ({identity}) and the "
              "SHA-256 of its candidate, output and summary files; re-running an iteration re-checks "
              "them, and no path is ever selected twice.")


def _leaks_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    """What the leakage guard protected, the pool rows it left out before the search, and (with a
    threshold) where the pool's nearest protected scores lie."""
    g = v.m.leaks
    assert g is not None  # _assemble adds this section only when the guard ran
    listed = ", ".join(_path_md(p) for p in g.protected_listings) or "no listing (`protect` not given)"
    rule = "identical bytes (SHA-256)" + (f", or `{g.threshold_key}` = {_fmt(g.threshold)}" if g.threshold_key else "")
    kinds = ", ".join(f"{n} `{kind}`" for kind, n in g.by_kind.items())
    judged = (f"of {g.pool}" if g.scope == "pool" else
              f"among the {g.pool} it judged: the rows the search would have taken (`leak_scope=mined`: the same "
              f"answer as judging all {g.pool_rows})")
    yield 0, (f"Protected: the targets and {listed}; {plural(g.protected_images, 'protected image')} in all. A pool "
              f"row is a leak when it copies one ({rule}); leaks never reach the answer. "
              f"{plural(g.leaks_excluded, 'pool row')} {judged} were left out ({kinds}), each listed with the "
              f"image it copies in `leaks.parquet`" + (" (warning `leaks_excluded`)." if g.leaks_excluded else "."))
    if v.facts.leak_examples:
        score = "similarity" if g.knn_metric == "cosine" else "distance"
        yield 0, _table(f"Pool file | Protected file | Kind | {score.capitalize()}", [
            (_path_md(row["filepath"]), _path_md(row["protected_filepath"]), f"`{row['kind']}`",
             "same bytes" if row.get(score) is None else _fmt(row[score])) for row in v.facts.leak_examples])
    pictures = v.facts.pictures
    if "leak_pairs" in pictures:
        yield 0, (f"![Leaks beside the protected images they copy]({pictures['leak_pairs']})\n\n"
                  "Each row: a protected image (blue), then the pool rows left out as its copies (red), "
                  "captioned with the kind and score.")
    if g.nearest and sum(g.nearest["counts"]):
        edges, counts = g.nearest["edges"], g.nearest["counts"]
        what = "similarity" if g.knn_metric == "cosine" else "distance"
        if g.sample is not None and g.pool_rows is not None and g.sample < g.pool_rows:
            yield 0, f"The distribution below is of a fixed uniform sample of {g.sample} pool rows."
        if "leak_nearest" in pictures:
            yield 0, (f"![Nearest protected {what} of each pool row]({pictures['leak_nearest']})\n\n"
                      f"Each pool row's nearest protected {what}, the dashed line at `{g.threshold_key}`: "
                      "rows past it are leaks; a gap before it means the threshold separates copies from "
                      "the rest.")
        else:
            bins = [f"{_fmt(edges[i])}–{_fmt(edges[i + 1])}: {int(n)}" for i, n in enumerate(counts) if n]
            yield 0, (f"Each pool row's nearest protected {what} (to choose `{g.threshold_key}`): "
                      + "; ".join(bins) + ".")


def _training_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    rows = v.m.training_rows
    assert rows is not None  # _assemble adds this section only for runs with a ChangeNet pool
    name = rows.path.rstrip("/").rsplit("/", 1)[-1]
    now = v.facts.training_rows_now
    left = ", ".join(f"{n} `{reason}`" + (": already written by an earlier iteration" if reason == "trained_before"
                                          else "") for reason, n in rows.left_out_by_reason.items())
    earlier = rows.left_out_by_reason.get("trained_before", 0)  # written by an earlier round: not warned
    left += "; warning `training_rows_left_out`" if rows.left_out > earlier else ""
    yield 0, (f"`{name}` holds {plural(rows.rows, 'ChangeNet training row')} (`input_path`, `golden_path`, "
              f"`label`, `object_name`, then the pool's metadata columns), one per mined component, from "
              f"{plural(rows.components, 'mined component')}: ready to append to the next round's training CSV. "
              f"Every row's image and golden resolve for each light ({', '.join(f'`{x}`' for x in rows.lights)}) as "
              f"`{{images_dir}}/{{dir}}/{{object_name}}_{{light}}{rows.image_ext}` under {_path_md(rows.images_dir)}, "
              "and labels are in ChangeNet's case (`PASS` verbatim, every other label lower-case).")
    yield 0, ("Left out: " + (f"{plural(rows.left_out, 'component')} ({left}); "
                              if rows.left_out else "none; ")
              + (f"{plural(rows.leaks, 'train/val leak')} equal to a row of {_path_md(rows.validation_csv)} on "
                 f"{', '.join(f'`{k}`' for k in rows.leak_keys)}" + (" (warning `training_rows_leaked`)." if rows.leaks
                                                                      else ".")
                 if rows.validation_csv else "no validation CSV was given, so leaks were not checked.")
              + (" PASS rows without a golden use their own image directory as golden (`pass_golden` = self)."
                 if rows.pass_golden == "self" else ""))
    if now != rows.rows:
        yield 0, ("The file is no longer in this folder." if now is None else
                  f"The file now holds {plural(now, 'row')}, not the {rows.rows} written: it changed after the run.")


def _actions_section(v: _View, found: list[Finding], verdict: str, compact: bool) -> Blocks:
    history = v.m.history
    if verdict == "failed":
        first = (f"Do not use `{v.mined_name}` as the next round's augmentation queue yet; once the "
                 f"failure below is fixed and mining is re-run, the new `{v.mined_name}` is that queue.")
    else:
        queue = (f"`mined.parquet` ({plural(history.newly_selected, 'image')} no earlier iteration selected)"
                 if history is not None else f"`{v.mined_name}` ({plural(v.mined_count, 'image')})")
        first = (f"Use {queue} as the next round's augmentation queue: label or review those images and add "
                 "them to the training set" + (", after the decisions below." if found else "."))
    actions = [first] + [f.action for f in found if f.action]
    return [(0, "\n".join(f"{i}. {a}" for i, a in enumerate(actions, 1))),
            (1, "Keep this folder with the next round's training data: its recorded facts and "
                "embedding parquets let anyone re-check, re-mine or extend this selection "
                "without embedding the pool again.")]
