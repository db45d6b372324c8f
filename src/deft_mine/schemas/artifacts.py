"""The file names of a run folder (the TAO contract's, plus ours): one place for all of them."""

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
