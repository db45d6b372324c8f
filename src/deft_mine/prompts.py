"""MCP prompts for the two common starts of a DEFT round, so that clients without skills get the
guidance the Claude Code skill (skills/deft-mine/SKILL.md) gives. Plain text, no I/O: every tool,
argument and code named in backticks here is checked against the registry by the tests."""

from __future__ import annotations

import json
from typing import Annotated, Callable

from pydantic import Field

Targets = Annotated[str, Field(description="target parquet: the images the model is weakest on (filepath; optional label)")]
Source = Annotated[str, Field(description="pool parquet or CSV: the unused images to mine")]
OutputDir = Annotated[str, Field(description="folder under which the run folder is made (default: runs)")]
Model = Annotated[str, Field(description="encoder (SigLIP, CLIP, DINOv2, hf, thumbnail); default SigLIP")]

_PREFLIGHT = (
    "1. Call `preflight` with {args}. It writes nothing. If `ok` is false, show the user the `checks` "
    "whose status is fail, each with its `fix`, and stop. Its `warnings` predict what the run would warn "
    "about (`filter_by_label_noop`, `pool_exhausted`, `target_in_pool`, `images_skipped`, "
    "`provenance_unknown`): tell the user before running, and fix the inputs where the warning says so.\n")
_CLOSING = (  # both prompts end with the encoder rule and how refusals read
    "One session serves one encoder: the first `run` or `embed` fixes it, and a later call with another "
    "`model`, `model_path`, `model_config_path` or `pooling` is refused (`encoder_mismatch`). To compare "
    "encoders, use one session per encoder.\n"
    "A refused call comes back as isError with a stable `code` and a `fix`: apply the fix; do not retry "
    "unchanged. The resources deft-mine://references/troubleshooting.md and report-spec.md explain every "
    "code and the report.\n")


def _arguments(**given: object) -> str:
    """Tool arguments as the agent should send them (values as JSON, never in backticks)."""
    return ", ".join(f"{name}={json.dumps(value)}" for name, value in given.items())


def _overrides(model: str) -> dict[str, object]:
    return {"overrides": {"model": model}} if model else {}


def first_round(targets: Targets, source: Source, output_dir: OutputDir = "runs", model: Model = "",
                ledger: Annotated[str, Field(description="history ledger JSON; give one if more rounds will "
                                             "follow, so this round is recorded as iteration 1")] = "") -> str:
    """A first DEFT mining round: preflight, run, then read the warnings and the report."""
    common = {"targets": targets, "source": source, "output_dir": output_dir, **_overrides(model)}
    history = {"history": ledger} if ledger else {}
    return (
        f"Run a first DEFT mining round with the deft-mine tools: find, in the pool {source}, the images that "
        f"look most like the weak targets {targets}.\n\n"
        + f"0. A new pool: before its first round, call `choose` with "
        f"{_arguments(listing=source, targets=targets, output_dir=f'{output_dir}/choice')} (the pool, or a "
        "labelled sample of it, needs a `label` column). It scores the candidate encoders on these images and "
        "writes `embedding_spec.yaml` and `mining_spec.yaml`: pass their paths as `embedding_spec_path` and "
        "`mining_spec_path` below. Tell the user the `pick`, the `suggested_topn` and whether it is a "
        "`clear_winner`.\n"
        + _PREFLIGHT.format(args=_arguments(**common))
        + f"2. Call `run` with {_arguments(**common, **history)}. It embeds both sides with one encoder, mines "
        "and writes a new run folder with `Mining_Report.md`.\n"
        + ("   The ledger records this round as iteration 1, so later rounds skip what it selected.\n" if ledger
           else "   Without `history` this round is not recorded: if more rounds will follow, pass "
                "history=\"<ledger.json>\" now (a new ledger starts at iteration 1).\n")
        + "3. Read the result: `run_dir`, `mined` (unique images in `mined.parquet`), the counts of "
        "`mining_summary.txt` in `mine` (`summary`) and every entry of `warnings` (`code`, `message`, "
        "`details`). A warning means the run went on, but not quite as asked.\n"
        "4. Read `Mining_Report.md` in `run_dir`, Verdict first. Tell the user the verdict, the mined count, "
        "each warning with what to do, and the path of `mined.parquet`: the images for the next training "
        "round.\n\n"
        + _CLOSING)


def next_round(targets: Targets, source: Source,
               ledger: Annotated[str, Field(description="the history ledger JSON of the earlier rounds")],
               output_dir: OutputDir = "runs",
               model: Annotated[str, Field(description="the encoder of the earlier rounds (SigLIP, CLIP, DINOv2, "
                                           "hf, thumbnail); default SigLIP")] = "") -> str:
    """The next DEFT round with history: mine for the new weak targets, keeping only images no earlier
    round selected."""
    common = {"targets": targets, "source": source, "output_dir": output_dir, **_overrides(model)}
    return (
        f"Run the next DEFT round: mine the pool {source} for the new weak targets {targets}, keeping only "
        f"images that no earlier round recorded in the ledger {ledger} selected.\n\n"
        + _PREFLIGHT.format(args=_arguments(**common))
        + f"2. Call `run` with {_arguments(**common, history=ledger)}. The iteration number comes from the "
        "ledger (its last + 1). Mining writes `mined_candidates.parquet`; `mined.parquet` keeps only the "
        "candidates no earlier iteration selected, in the candidates' order. Zero rows is a valid answer "
        "(warning `selection_empty`): suggest a larger `topn` or a bigger pool.\n"
        "3. Use the encoder of the earlier rounds: the embedding store then supplies the vectors it already "
        "has (`reused` and `embedded` in `source_embed` and `target_embed`), so an unchanged pool is not "
        "embedded again.\n"
        "4. Read the result: `select` holds `iteration`, `previously_selected`, `newly_selected` and "
        "`cumulative_selected`; `warnings` as always. Read `Mining_Report.md` in `run_dir` (it gains a "
        "History section) and tell the user the verdict, the new images and the path of `mined.parquet`.\n"
        "5. A ledger refusal (`ledger_iteration_invalid`, `ledger_hash_mismatch`, `ledger_corrupt`, "
        "`ledger_busy`) leaves the ledger and the outputs untouched: follow its `fix`. To record a selection "
        "made outside `run`, call `select` with `candidates`, `ledger`, `iteration` and `output`.\n\n"
        + _CLOSING)


#: Each prompt with its title.
PROMPTS: dict[Callable[..., str], str] = {first_round: "DEFT: a first mining round",
                                          next_round: "DEFT: the next round, with history"}
