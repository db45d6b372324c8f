"""`deft-mine-task`: the TAO data-services entrypoint contract (`<category> <action> -e SPEC k=v …`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas import artifacts
from deft_mine.schemas.specs import EmbeddingSpec, MiningSpec, UniqueMatchingSpec, _Spec, load_spec, spec_to_yaml
from deft_mine.stopping import exit_code, sigterm_unwinds, stop_signal
from deft_mine.tools.registry import ToolContext

TASKS = {("embedding", "image_embeddings"): EmbeddingSpec, ("tmm", "nearest_neighbors"): MiningSpec,
         ("embedding", "text_embeddings"): EmbeddingSpec,  # the container's keys: input/output_parquet, model…
         ("tmm", "unique_neighbor_matching"): UniqueMatchingSpec}


class _PrintEvents:
    """Container-style plain log lines on stdout (no terminal assumed)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        step = max(1, (total or 1) // 10)
        if done == total or done - self.last.get(stage, -step) >= step:
            self.last[stage] = done
            print(f"[{stage}] {done}/{total if total is not None else '?'}", flush=True)

    def log(self, level: str, message: str) -> None:
        print(f"{level.upper()}: {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one task; the last line says `Execution status: PASS` or `FAIL`, as the TAO container's
    entrypoint does (a caller trusts that line, not the exit code alone)."""
    code: int | None = 1
    try:
        code = _run(argv)
    finally:  # argparse's own exits (usage, --help) and an answered --cfg=job are not runs: no status
        if code is not None and not isinstance(sys.exc_info()[1], SystemExit):
            print(f"Execution status: {'PASS' if code == 0 else 'FAIL'}", flush=True)
    return 0 if code is None else code


def _run(argv: Sequence[str] | None) -> int | None:
    parser = argparse.ArgumentParser(prog="deft-mine-task", description=(
        "TAO-compatible entrypoint: `embedding image_embeddings -e spec.yaml key=value …` or "
        "`tmm nearest_neighbors -e spec.yaml key=value …`"))
    parser.add_argument("category", choices=sorted({c for c, _ in TASKS}))
    parser.add_argument("action", choices=sorted({a for _, a in TASKS}))
    parser.add_argument("-e", "--experiment_spec", dest="spec", help="spec YAML")
    parser.add_argument("--cfg", choices=["job"], help="print the resolved spec and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after options
    kind = TASKS.get((args.category, args.action))
    if kind is None:
        parser.error(f"unknown task {args.category} {args.action}; valid: "
                     + ", ".join(" ".join(t) for t in TASKS))
    try:
        if args.cfg == "job":  # a question, not a run: the resolved spec and nothing else
            print(_job_yaml(kind, args.spec, args.overrides), end="")
            return None
        from deft_mine.tools import embed, match, mine

        tool = {EmbeddingSpec: embed, MiningSpec: mine, UniqueMatchingSpec: match}[kind]
        # In a container the store is what the caller mounted and named, never a default folder.
        store = {"no_store": "DEFT_MINE_STORE" not in os.environ} if tool is embed else {}
        with sigterm_unwinds():  # `docker stop` unwinds the work (PID 1 would ignore SIGTERM)
            inputs = tool.input(spec_path=args.spec, overrides=args.overrides, **store)
            if args.action == "text_embeddings":  # the input read by its `text` column
                from deft_mine.tools.embed import embed_sentences

                result = embed_sentences(inputs, ToolContext(_PrintEvents()))
            else:
                result = tool.invoke(inputs, ToolContext(_PrintEvents()))
        print(result.text())
        for w in result.warnings:
            print(f"WARNING [{w.code}]: {w.message}", file=sys.stderr)
        output = Path(result.final_parquet if tool is match else result.output_parquet)
        tables.write_text_atomic(output.parent / artifacts.task_result(output.name), result.model_dump_json())
    except DeftError as exc:
        print(f"ERROR [{exc.code}]: {exc.message}" + (f"\n  fix: {exc.fix}" if exc.fix else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted by {stop_signal(exc).name}; unfinished files were not written", file=sys.stderr)
        return exit_code(exc)
    return 0


def _job_yaml(kind: type[_Spec], spec_path: str | None, overrides: list[str]) -> str:
    """--cfg=job: the resolved spec; one still missing a required value (an empty spec: how the
    docker backend asks an image for its keys) prints those as ??? with the defaults, as Hydra does."""
    try:
        return spec_to_yaml(load_spec(kind, spec_path, overrides))
    except DeftError as exc:
        required = {name for name, info in kind.model_fields.items() if info.is_required()}
        if exc.details.get("field") not in required or not exc.message.endswith("Field required"):
            raise  # a bad value is refused as in a run
    blank = kind.model_construct(**dict.fromkeys(required, "???"))
    return OmegaConf.to_yaml(OmegaConf.create(blank.model_dump(mode="json", warnings=False,
                                                                context={"all_keys": True})))


if __name__ == "__main__":
    sys.exit(main())
