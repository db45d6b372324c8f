"""Golden folders: what the tests' runs wrote, recorded so a refactor can be shown to change none of it.

Record (each test's files under its tmp_path, normalised, into DIR/<test id>/):
    DEFT_MINE_GOLDEN=DIR pytest -p no:cacheprovider -m "not e2e"
Compare two recordings (exit 1 and the differing files when they differ):
    python tests/golden.py BEFORE AFTER

Parquet files are written out as their schema (with key-value metadata) and rows; text files as
they are. What differs from one run to the next by nature (temp folder, clock, durations, host) is
masked, nothing else.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path

_TEXT = {".txt", ".md", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".log"}
_MAX_BYTES = 8 << 20
_RUN_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d{6}")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?")
_DATE = re.compile(r"\b\d{4}-\d\d-\d\d( \d\d:\d\d(:\d\d)?)?\b")
_SECONDS = re.compile(r"\b\d+(\.\d+)?(e-?\d+)? ?(s|ms|min|seconds?)\b")
_PYTEST_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+|/tmp/deft-golden-[\w-]+")
# sha256 of files that hold temp paths; the hashed files are compared themselves.
_VOLATILE_KEYS = {"sha256", "timings", "started_at", "finished_at", "host", "seconds_saved", "time", "elapsed",
                  "seconds", "duration", "load_seconds", "pid", "hostname", "cpu", "created"}


def normalise(text: str, tmp: str) -> str:
    text = text.replace(tmp, "<TMP>")
    text = _PYTEST_TMP.sub("<PYTEST>", text)
    text = _RUN_STAMP.sub("<RUN>", text)
    text = _ISO.sub("<ISO>", text)
    text = _DATE.sub("<DATE>", text)
    return _SECONDS.sub("<DUR>", text)


def _mask_json(value: object) -> object:
    if isinstance(value, dict):
        return {k: ("<VOLATILE>" if k in _VOLATILE_KEYS else _mask_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    return value


def _parquet_text(path: Path) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    lines = [str(table.schema.remove_metadata())]  # the metadata follows, whole (its repr is cut by length)
    for key, value in sorted((table.schema.metadata or {}).items()):
        lines.append(f"meta {key.decode(errors='replace')} = {value.decode(errors='replace')}")
    for row in table.to_pylist():
        lines.append(json.dumps(row, default=repr, sort_keys=False))
    return "\n".join(lines) + "\n"


def _file_text(path: Path) -> str | None:
    if path.suffix == ".parquet":
        try:
            return _parquet_text(path)
        except Exception as exc:  # a deliberately broken parquet is recorded as such
            return f"unreadable parquet: {type(exc).__name__}\n"
    if path.suffix not in _TEXT:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".json", ".jsonl"):
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else [json.loads(text)]
            return "\n".join(json.dumps(_mask_json(d), indent=1, sort_keys=True) for d in docs) + "\n"
        except ValueError:
            return text
    return text


def record(tmp_path: Path, dest: Path) -> None:
    """Every run output under `tmp_path` (images and the store left out), normalised, into `dest`."""
    tmps = sorted({str(tmp_path), str(tmp_path.resolve())}, key=len, reverse=True)
    for path in sorted(tmp_path.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_BYTES:
            continue
        rel = path.relative_to(tmp_path).as_posix()
        if "store" in rel.split("/")[0] or "/.store" in rel:
            continue
        try:
            text = _file_text(path)
        except OSError:
            continue
        if text is None:
            continue
        for tmp in tmps:
            text = text.replace(tmp, "<TMP>")
        out = dest / _RUN_STAMP.sub("RUN", rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(normalise(text, tmps[0]), encoding="utf-8")


def compare(before: Path, after: Path) -> int:
    files = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    files |= {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    bad = 0
    for rel in sorted(files):
        a, b = before / rel, after / rel
        if not a.exists() or not b.exists():
            print(f"only in {'after' if b.exists() else 'before'}: {rel}")
            bad += 1
            continue
        if a.read_bytes() != b.read_bytes():
            bad += 1
            print(f"differs: {rel}")
            diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), lineterm="", n=1)
            print("\n".join(list(diff)[:40]))
    print(f"{len(files)} files compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
