"""The report on a run folder: its facts gathered, its pictures drawn, Mining_Report.md written last."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from deft_mine.engine import tables
from deft_mine.events import Events
from deft_mine.report.facts import gather, locate
from deft_mine.report.pictures import draw
from deft_mine.report.provenance import Invocation, SessionLog, write_provenance
from deft_mine.report.render import render
from deft_mine.schemas import artifacts
from deft_mine.schemas.results import ReportResult
from deft_mine.schemas.warnings import report_finding


def write_report(folder: Path, events: Events, image_allowed: Callable[[Path], bool] | None = None,
                 invocation: Invocation | None = None, session: SessionLog | None = None,
                 producing: bool = False) -> ReportResult:
    """Write the pictures and the provenance (mining_config/, session.jsonl), then
    Mining_Report.md, into `folder` (`producing`: as the last step of the call that made the
    run); return what was written. The contact sheet draws only the
    images `image_allowed` admits (the others as grey tiles)."""
    folder = Path(folder).expanduser().absolute()
    manifest, files, missing = locate(folder)
    events.progress("report", 0, 4)
    facts = gather(folder, manifest, files, missing, events)
    if image_allowed is not None:
        facts.image_allowed = image_allowed
    events.progress("report", 1, 4)
    failures = draw(facts, events)
    events.progress("report", 3, 4)
    rendered = render(facts)
    unavailable = write_provenance(folder, manifest, invocation, session, producing)
    path = folder / artifacts.REPORT
    tables.write_text_atomic(path, rendered.text)  # last: its presence means everything else is there
    events.progress("report", 4, 4)
    events.log("info", f"wrote {path} ({rendered.words} words, verdict {rendered.verdict})")

    recorded = {w.code for w in facts.warnings}  # a run warning already says what its finding would
    warnings = facts.warnings + [report_finding(f.code, f.reason, f.severity, f.action)
                                 for f in rendered.findings if f.code not in recorded]
    return ReportResult(report_path=str(path), words=rendered.words, verdict=rendered.verdict,
                        pictures=sorted(facts.pictures.values()), missing_facts=facts.missing_facts,
                        provenance_unavailable=unavailable,
                        warnings=warnings + failures)
