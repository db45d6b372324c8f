"""The in-process backend: Pillow + transformers/torch for embeddings, FAISS for k-NN."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv

from deft_mine.backends.base import BackendEmbed, BackendMatch, BackendMine, Capabilities, MineOutputs
from deft_mine.engine import tables
from deft_mine.engine.embedding import EmbedStats, embed_file, embed_texts
from deft_mine.engine.encoders import Encoder, build_encoder, build_text_encoder
from deft_mine.engine.listings import Listing
from deft_mine.engine.mining import MiningOutcome, mine_files
from deft_mine.engine.store import Shelf
from deft_mine.events import Events
from deft_mine.schemas.results import Check
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, UniqueMatchingSpec


class LocalBackend:
    name = "local"
    capabilities = Capabilities(writes_pairs=True, runs_tao_checkpoints=False, runs_unique_matching=True,
                                runs_text_embeddings=True, loads_encoders_here=True,
                                guards_in_search=True)

    def __init__(self) -> None:
        # A run embeds targets and pool with one encoder: load its weights once per process.
        self._encoders: dict[tuple[Any, ...], Encoder] = {}
        self._lock = threading.Lock()

    @classmethod
    @functools.cache  # one per process: its encoders' weights are loaded once
    def shared(cls) -> "LocalBackend":
        return cls()

    def check(self, output_dir: Path, store: Path | None = None) -> tuple[list[Check], list[str]]:
        try:
            import torch

            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            checks = [Check.of("torch", "ok" if gpu else "warn", f"torch {torch.__version__}; "
                               + (f"CUDA: {', '.join(gpu)}" if gpu else "no CUDA GPU: encoders run on the CPU"),
                               None if gpu else "fine for thumbnail and small pools; use a GPU machine "
                               "for SigLIP/CLIP on large pools")]
        except Exception as exc:  # a broken torch install is exactly what preflight is for
            gpu, checks = [], [Check.of("torch", "fail", f"cannot import torch: {exc}",
                                        "pip install torch (CPU: torch==2.13.0 from the constraints file)")]
        return [*checks, Check.of("thumbnail encoder", "ok", "always available (no weights)")], gpu

    def encoder(self, spec: EmbeddingSpec, events: Events) -> Encoder:
        key = (*spec.encoder_key(), spec.asked_pooling, spec.device)
        with self._lock:
            if key not in self._encoders:
                model_path = key[1]
                events.log("info", f"loading encoder {spec.model}" + (f" from {model_path}" if model_path else ""))
                t0 = time.perf_counter()
                self._encoders[key] = build_encoder(spec.model, model_path, spec.device, spec.pooling)
                events.log("info", f"encoder ready on {self._encoders[key].device} "
                                   f"in {time.perf_counter() - t0:.1f}s")
            return self._encoders[key]

    def accepts(self, spec: MiningSpec) -> None:
        """Every mining key runs here."""

    def embed(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
              store: Path | None) -> BackendEmbed:
        t0 = time.perf_counter()
        encoder = self.encoder(spec, events)
        load_seconds = time.perf_counter() - t0
        stats = embed_file(listing, output_path, encoder, batch_size=spec.batch_size, events=events,
                           shelf=Shelf(store, encoder.identity) if store else None)
        return embedded_with(encoder, stats, load_seconds)

    def mine(self, spec: MiningSpec, source_path: Path, target_path: Path, outputs: MineOutputs,
             events: Events) -> BackendMine:
        return write_mining(mine_files(source_path, target_path, spec, events=events), outputs)

    def accepts_text(self) -> None:
        """Sentences run here, in this process."""

    def embed_text(self, spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events,
                   store: Path | None) -> BackendEmbed:
        return text_step(spec, listing, output_path, events, store, spec.device)

    def match(self, spec: UniqueMatchingSpec, events: Events) -> BackendMatch:
        from deft_mine.engine.unique_matching import unique_match
        from deft_mine.engine.unique_outputs import write_outputs

        t0 = time.perf_counter()
        outcome = unique_match(spec)
        t1 = time.perf_counter()
        write_outputs(spec, outcome)
        t2 = time.perf_counter()
        return BackendMatch(outcome.summary, outcome.warnings, {"match": t1 - t0, "write": t2 - t1, "total": t2 - t0})


def text_step(spec: EmbeddingSpec, listing: Listing, output_path: Path, events: Events, store: Path | None,
              device: str) -> BackendEmbed:
    """Sentences through the model's text tower in this process (local, and the Ray text task). The
    store keys text vectors by SHA-256 of the UTF-8 text, on a shelf of their own (the identity with
    the tokenizer settings), so text and image vectors never share keys."""
    t0 = time.perf_counter()
    events.log("info", f"loading the text tower of {spec.model} from {spec.encoder_key()[1]}")
    encoder = build_text_encoder(spec.model, spec.encoder_key()[1], device)
    load_seconds = time.perf_counter() - t0
    shelf = Shelf(store, encoder.store_identity) if store is not None else None
    stats = embed_texts(listing, output_path, encoder, batch_size=spec.batch_size, events=events, shelf=shelf)
    return embedded_with(encoder, stats, load_seconds)


def embedded_with(encoder: Encoder, stats: EmbedStats, load_seconds: float) -> BackendEmbed:
    """What an in-process encoder's embedding step did (local and Ray alike)."""
    return BackendEmbed(stats, encoder.identity, encoder.dim, encoder.device,
                        {"load_encoder": load_seconds, **stats.timings})


def write_mining(outcome: MiningOutcome, outputs: MineOutputs) -> BackendMine:
    """Write a mining outcome's files (each atomically) and say what was found."""
    t0 = time.perf_counter()
    outcome.summary.saved_to = str(outputs.mined)
    write_floor_stage(outcome, outputs, raw_only=True)  # the stages in the loop's order: before the floor first
    tables.write_table_atomic(outputs.mined, outcome.mined)
    if outcome.near_duplicates is not None:
        tables.write_table_atomic(outputs.near_duplicates, outcome.near_duplicates)
    if outcome.leaks is not None and outcome.leaks.reported:
        tables.write_table_atomic(outputs.leaks, outcome.leaks.table)
    if outputs.pairs is not None:
        tables.write_table_atomic(outputs.pairs, outcome.pairs)
    tables.write_text_atomic(outputs.summary, outcome.summary.text())
    write_floor_stage(outcome, outputs)
    outcome.timings["write"] = time.perf_counter() - t0
    return BackendMine(**{name: getattr(outcome, name) for name in BackendMine.__dataclass_fields__
                          if hasattr(outcome, name)})


def write_floor_stage(outcome: MiningOutcome, outputs: MineOutputs, raw_only: bool = False) -> None:
    """The DEFT loop's floor-stage files, when the outputs want them and a floor was set:
    mined_raw.parquet (`raw_only`), else knn_summary.csv and, under best_target, its audit."""
    floor = outcome.floor
    if not outputs.loop_files or floor is None:
        return
    if raw_only:
        tables.write_table_atomic(outputs.raw, floor.raw)
        return
    with tables.atomic_output(outputs.knn_summary) as tmp:
        pacsv.write_csv(floor.knn_summary(), tmp)
    if floor.audit is not None:
        tables.write_text_atomic(outputs.cosine_filter, floor.cosine_filter_summary(outputs.mined))
