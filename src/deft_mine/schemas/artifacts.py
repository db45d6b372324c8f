"""The run folder's files (the TAO contract's, plus ours) and the mining summary's format."""

import re

EMBEDDING_SPEC = "embedding_spec.yaml"
MINING_SPEC = "mining_spec.yaml"
TARGET_EMBEDDINGS = "target_embeddings.parquet"
SOURCE_EMBEDDINGS = "source_embeddings.parquet"
MINED = "mined.parquet"
CANDIDATES = "mined_candidates.parquet"  # with a history ledger: mined before selection
SUMMARY = "mining_summary.txt"
# Ours:
PAIRS = "mined_pairs.parquet"  # every (target, neighbour) pair: what the report draws
MANIFEST = "run.json"  # every fact the report states
REPORT = "Mining_Report.md"
# Provenance, written with the report (TAO's packaging hook did the same):
MINING_CONFIG = "mining_config"  # the specs as resolved, environment.json, invocation.json
ENVIRONMENT = "environment.json"  # versions of deft-mine, Python and the packages; the device
INVOCATION = "invocation.json"  # the exact command or MCP call that made the run
SESSION_LOG = "session.jsonl"  # one line per tool call of the MCP session (the CLI: the command)



def task_result(output_name: str) -> str:
    """deft-mine-task's result JSON (an EmbedResult or MineResult), hidden beside its output: the
    docker backend reads its facts from there instead of from the container's log."""
    return f".{output_name}.result.json"


# Spellings of summary keys other tools may use, mapped to ours.
SUMMARY_ALIASES = {"num_queries": "queries", "number_of_queries": "queries", "targets": "queries",
                   "neighbors_requested": "neighbours_requested", "duplicates": "duplicates_removed",
                   "kept": "kept_pairs", "dropped": "dropped_pairs", "unique_mined": "mined"}


def summary_text(summary: dict[str, int], label_filter: str) -> str:
    """mining_summary.txt: one `key: value` per line, the label filter's outcome last."""
    return "".join(f"{key}: {value}\n" for key, value in [*summary.items(), ("label_filter", label_filter)])


def parse_summary(text: str) -> tuple[dict[str, int], str | None]:
    """The counts and label filter of a mining summary, ours or another tool's (`key: value` or
    `key = value`; other spellings of our keys are mapped to ours)."""
    summary: dict[str, int] = {}
    label_filter = None
    for line in text.splitlines():
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
