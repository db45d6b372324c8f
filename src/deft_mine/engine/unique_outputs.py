"""Unique matching's files: the per-pass parquets, final_unique_files.parquet and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from deft_mine.engine import tables
from deft_mine.engine.unique_matching import PassRecord, UniqueOutcome, parquet_files
from deft_mine.schemas import artifacts
from deft_mine.schemas.specs import UniqueMatchingSpec


def pass_table(outcome_pool: list[str], targets: list[str], record: PassRecord,
               vectors: dict[str, np.ndarray] | None = None) -> pa.Table:
    """A pass as the container writes it: target_filepath, then top{i}_source_filepath and
    top{i}_distance for i in 1..topn (with save_embeddings, the vectors too)."""
    columns: dict[str, pa.Array] = {"target_filepath": pa.array([targets[t] for t in record.target_rows], pa.string())}
    if vectors is not None:
        columns["target_embedding"] = tables.vector_array(vectors["target"][record.target_rows]) \
            if record.target_rows else pa.array([], pa.list_(pa.float32()))
    for i in range(record.topn):
        columns[f"top{i + 1}_source_filepath"] = pa.array([outcome_pool[r[i]] for r in record.pool_rows], pa.string())
        columns[f"top{i + 1}_distance"] = pa.array([d[i] for d in record.distances], pa.float64())
        if vectors is not None:
            picked = [r[i] for r in record.pool_rows]
            columns[f"top{i + 1}_embed"] = tables.vector_array(vectors["source"][picked]) if picked else \
                pa.array([], pa.list_(pa.float32()))
    return pa.table(columns)


def _raw_vectors(files: list[Path], column: str) -> np.ndarray:
    """A side's vectors as written (save_embeddings keeps the container's: not normalised)."""
    blocks = [tables.vectors_from_column(tables.read_columns(f, [column]).column(column), path=f, name=column,
                                         first_row=0, dim=None) for f in files]
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def write_outputs(spec: UniqueMatchingSpec, outcome: UniqueOutcome) -> Path:
    """The per-pass parquets, then final_unique_files.parquet, then summary.json (each atomic);
    `visualize`'s pictures are the tool's (report/match_pictures.py), drawn from these files."""
    out = Path(spec.output_dir).expanduser()
    vectors = None
    if spec.save_embeddings:
        vectors = {"source": _raw_vectors(parquet_files(spec.source_path, "source_path"), spec.source_embedding_column),
                   "target": _raw_vectors(parquet_files(spec.target_path, "target_path"), spec.target_embedding_column)}
    for record in outcome.passes:
        tables.write_table_atomic(out / record.name, pass_table(outcome.pool_paths, outcome.target_paths, record, vectors))
    if outcome.near_duplicates is not None:
        tables.write_table_atomic(out / artifacts.NEAR_DUPLICATES, outcome.near_duplicates)
    if outcome.leaks is not None and outcome.leaks.reported:
        tables.write_table_atomic(out / artifacts.LEAKS, outcome.leaks.table)
    tables.write_table_atomic(out / artifacts.UNIQUE_FINAL, outcome.selected)
    tables.write_text_atomic(out / artifacts.UNIQUE_SUMMARY, json.dumps(outcome.summary, indent=2, default=str))
    return out
