"""The report tool: Mining_Report.md and its pictures for a run folder, with or without run.json."""

from __future__ import annotations

from pathlib import Path

from deft_mine.report import write_report
from deft_mine.schemas.inputs import ReportInput
from deft_mine.schemas.results import ReportResult
from deft_mine.tools.registry import Tool, ToolContext, register


def write_mining_report(inputs: ReportInput, ctx: ToolContext) -> ReportResult:
    """Write Mining_Report.md (seven sections, every number from the run's recorded facts)
    and its pictures (contact sheet, score histogram, per-label bars) into a run folder;
    `run` already does this as its last step. Works on folders without run.json too and
    says which facts were unavailable. Returns the report path, word count, verdict and
    warnings."""
    # write_report refuses a run_dir that is not a folder (report_no_run).
    return write_report(Path(inputs.run_dir), ctx.events, ctx.image_allowed, ctx.invocation, ctx.session)


report = register(Tool("report", "Write the mining report",
                       "write Mining_Report.md and its pictures for a run folder",
                       ReportInput, ReportResult, write_mining_report))
