"""report.render: the report text as a pure function of hand-built facts — verdict from findings,
encoder match sentences, the per-label skip sentence, the word budget, same facts → same text."""

from __future__ import annotations

import copy
import re

import pytest

from conftest import THUMB_ID
from deft_mine.report.facts import MinedCheck, PairStats, ReportFacts
from deft_mine.report.render import (MAX_WORDS, MIN_WORDS, SECTIONS, SKIP_SENTENCE, count_words, findings,
                                     labels_shown, render)
from deft_mine.schemas.manifest import (EmbedFacts, Embeddings, EncoderFacts, InputFacts, Inputs, LabelCounts,
                                        MiningFacts, RunManifest)
from deft_mine.schemas.results import EncoderIdentity, ErrorInfo
from deft_mine.schemas.warnings import ToolWarning

IDENTITY = EncoderIdentity.model_validate(THUMB_ID)
OTHER = EncoderIdentity.model_validate({**THUMB_ID, "preprocessing": {"side": 32}})


def run_facts() -> ReportFacts:
    """A finished, labelled, filtered run where nothing needs attention."""
    manifest = RunManifest(
        deft_mine_version="0.1.0", status="finished", started_at="2026-01-02T03:04:05+00:00",
        finished_at="2026-01-02T03:04:09+00:00", host="box", backend="local", run_dir="/runs/r1",
        inputs=Inputs(targets=InputFacts(path="/data/targets.parquet", format="parquet", rows=4,
                                         columns=["filepath", "label"], has_label=True),
                      source=InputFacts(path="/data/pool.csv", format="csv", rows=20,
                                        columns=["filepath", "label"], has_label=True)),
        embedding_spec={"model": "thumbnail", "batch_size": 8},
        mining_spec={"topn": 3, "knn_metric": "cosine", "filter_by_label": True, "exclude_targets": False},
        encoder=EncoderFacts(target=IDENTITY, source=IDENTITY, match=True, fingerprint=IDENTITY.fingerprint),
        embeddings=Embeddings(target=EmbedFacts(rows=4, skipped=0, embedding_dim=256, device="cpu"),
                              source=EmbedFacts(rows=20, skipped=0, embedding_dim=256, device="cpu")),
        mining=MiningFacts(summary={"queries": 4, "topn": 3, "neighbours_requested": 12, "pool": 20, "pairs": 12,
                                    "kept_pairs": 8, "dropped_pairs": 4, "duplicates_removed": 2, "mined": 6,
                                    "target_in_pool": 0},
                           label_filter="applied", knn_metric="cosine", topn=3, filter_by_label=True,
                           labels=LabelCounts(targets={"a": 2, "b": 2}, mined={"a": 3, "b": 3})),
        timings={"embed_targets": 0.5, "embed_source": 1.25, "mine": 0.1, "total": 2.0})
    return ReportFacts(
        folder="/runs/r1", manifest=manifest, has_manifest=True,
        files={"mined": "mined.parquet", "pairs": "mined_pairs.parquet", "summary": "mining_summary.txt",
               "target_embeddings": "target_embeddings.parquet", "source_embeddings": "source_embeddings.parquet"},
        mined=MinedCheck(name="mined.parquet", columns=[("filepath", "string"), ("score", "float")], rows=6,
                         root="/data", root_guessed=False, checked=6),
        pairs=PairStats(pairs=12, kept=8, score_min=0.5, score_median=0.75, score_max=0.9,
                        kept_by_target_label={"a": 4, "b": 4}),
        target_labels={"a": 2, "b": 2}, mined_labels={"a": 3, "b": 3},
        pictures={"contact_sheet": "contact_sheet.png", "score_histogram": "score_histogram.png"},
        contact_targets=4, contact_neighbours=3, image_roots={"targets": "/data", "source": "/data"},
        fingerprints={"target": IDENTITY.fingerprint, "source": IDENTITY.fingerprint})


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts), 2)}


def test_a_clean_run_is_ok():
    rendered = render(run_facts())
    assert rendered.verdict == "ok" and rendered.findings == []
    assert rendered.text.startswith("# Mining Report — `r1`\n")
    assert re.findall(r"^## (.+)$", rendered.text, flags=re.M) == list(SECTIONS)
    verdict = sections(rendered.text)["Verdict"]
    assert verdict.startswith("**Verdict: OK** — 4 targets mined 6 unique pool images from 20 pool rows")
    assert "- Targets in: **4**" in verdict and "- Pool in: **20**" in verdict
    assert "| Pool | `/data/pool.csv` | 20 | 20 | 0 | yes | yes |" in sections(rendered.text)["Inputs"]
    mining = sections(rendered.text)["Mining Run"]
    assert "| `kept_pairs` | 8 | pairs whose labels agree (kept by the filter) |" in mining


def test_a_finding_makes_the_verdict_attention():
    facts = run_facts()
    assert facts.mined is not None
    facts.mined.missing, facts.mined.missing_examples = 2, ["imgs/gone.png", "imgs/lost.png"]
    rendered = render(facts)
    assert rendered.verdict == "attention" and [f.code for f in rendered.findings] == ["mined_paths_missing"]
    text = sections(rendered.text)
    assert text["Verdict"].startswith("**Verdict: ATTENTION**") and "1 finding needs a look" in text["Verdict"]
    assert "On disk: 4 of 6 mined paths exist" in text["Output Sanity"] and "- `imgs/lost.png`" in text["Output Sanity"]
    assert "Restore or mount the missing images" in text["Recommended Actions"]


def test_a_failed_run_fails_with_its_error():
    facts = run_facts()
    facts.manifest.status = "failed"
    facts.manifest.error = ErrorInfo(code="column_missing", message="no column 'filepath'", fix="rename it")
    rendered = render(facts)
    assert rendered.verdict == "failed" and rendered.findings[0].code == "run_failed"
    assert "column_missing: no column 'filepath'" in rendered.text and "Fix the cause (rename it)" in rendered.text
    assert "Do not use `mined.parquet`" in sections(rendered.text)["Recommended Actions"]


def test_encoder_match_yes():
    encoder = sections(render(run_facts()).text)["Encoder Consistency"]
    assert f"**Encoder match: yes** — both sides were embedded with the same encoder identity " \
           f"(fingerprint `{IDENTITY.fingerprint}`)" in encoder
    assert '| `preprocessing` | {"side": 16} | {"side": 16} |' in encoder


def test_encoder_match_no_fails_the_run():
    facts = run_facts()
    facts.manifest.encoder = EncoderFacts(target=IDENTITY, source=OTHER, match=False)
    rendered = render(facts)
    encoder = sections(rendered.text)["Encoder Consistency"]
    assert "**Encoder match: NO** — the two sides differ in preprocessing;" in encoder
    assert rendered.verdict == "failed" and [f.code for f in rendered.findings] == ["encoder_mismatch"]
    assert "DIFFERENT on the two sides" in sections(rendered.text)["Verdict"]


def test_encoder_match_unknown_without_identities():
    facts = run_facts()
    facts.manifest.encoder = EncoderFacts(target=IDENTITY)
    rendered = render(facts)
    assert "**Encoder match: unknown** — at least one side records no encoder identity" in rendered.text
    assert "| `model` | thumbnail | not recorded |" in rendered.text
    assert [(f.code, f.severity) for f in rendered.findings] == [("provenance_unknown", "attention")]
    assert "the source side records no encoder identity" in rendered.findings[0].reason


def test_encoder_match_unknown_when_the_run_stopped_early():
    facts = run_facts()
    facts.manifest.status, facts.manifest.encoder = "failed", EncoderFacts()
    assert "**Encoder match: unknown** — the run stopped before both sides were embedded" in render(facts).text


def test_targets_without_label_skip_the_breakdown_in_one_sentence():
    facts = run_facts()
    facts.manifest.inputs.targets.has_label = False
    facts.target_labels = facts.mined_labels = None
    assert sections(render(facts).text)["Per-Label Breakdown"] == SKIP_SENTENCE


def test_the_breakdown_shows_labels_and_shares():
    rows = sections(render(run_facts()).text)["Per-Label Breakdown"]
    assert "| `a` | 2 | 3 | 4 | 50.0% |" in rows and "| `b` | 2 | 3 | 4 | 50.0% |" in rows


def test_warnings_the_run_recorded_become_findings():
    facts = run_facts()
    facts.warnings = [ToolWarning(code="selection_empty", message="iteration 2 selected nothing new")]
    rendered = render(facts)
    assert [(f.code, f.reason) for f in rendered.findings] == [("selection_empty", "iteration 2 selected nothing new")]
    assert rendered.verdict == "attention"
    assert "Warnings recorded for this run (1, each explained under Verdict): `selection_empty`." in rendered.text


@pytest.mark.parametrize("change", ["none", "failed", "no_manifest", "many_labels", "noop"])
def test_every_report_stays_within_the_word_budget(change):
    facts = run_facts()
    if change == "failed":
        facts.manifest.status, facts.manifest.encoder = "failed", EncoderFacts()
    elif change == "no_manifest":
        facts.has_manifest, facts.missing_facts = False, ["run.json", "status", "started_at", "host"]
    elif change == "many_labels":
        facts.target_labels = {f"label_{i:02d}": i + 1 for i in range(70)}
        facts.mined_labels = {f"label_{i:02d}": 2 * i for i in range(70)}
    elif change == "noop":
        facts.manifest.mining.label_filter = "noop"
        facts.manifest.inputs.source.has_label = False
    rendered = render(facts)
    assert MIN_WORDS <= rendered.words <= MAX_WORDS and rendered.words == count_words(rendered.text)
    if change == "many_labels":
        assert "50 more labels are not shown" in rendered.text
    if change == "noop":
        assert "Label filter: **no-op**" in rendered.text and "deft-mine mine " in rendered.text


def test_the_same_facts_give_the_same_text():
    facts = run_facts()
    first = render(facts)
    assert render(copy.deepcopy(facts)).text == first.text == render(facts).text
    facts.manifest.mining.summary["mined"] = 7  # and different facts a different text
    assert render(facts).text != first.text


def test_findings_and_labels_shown_are_pure_helpers():
    assert findings(run_facts()) == []
    shown, rest = labels_shown({"a": 5, "b": 1, "c": 3}, None, limit=2)
    assert shown == ["a", "c"] and rest == ["b"]
    assert count_words("| Count | Value |\n|---|---|\n| `mined` | 6 |") == 4
