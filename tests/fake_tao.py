"""A test double of NVIDIA's TAO data-services image, for deft-mine's docker backend tests.

It is the ENTRYPOINT of a `docker import`ed image (tests/test_docker_tao.py), run by the host's
Python, which is bind-mounted read-only. It reproduces what can be observed of the real image
(NVIDIA-TAO/tao-data-services, `nvidia_tao_ds/mining/` and `core/entrypoint/`, release/7.1.0 and
main), and nothing of its code:

- `<entrypoint> <category> <action> -e SPEC.yaml [key=value ...]` with `embedding
  image_embeddings` or `tmm nearest_neighbors`; `--cfg=job` prints the resolved config (YAML,
  every schema key, `???` for an unset required one) and exits.
- Two processes, as there: the entrypoint runs the Hydra script as a child, relays its merged
  output, and prints `Execution status: PASS`, or `Execution status: FAIL` and exits 1. The relay
  has the real one's quirk: a line holding `[...]` (every logging line, tqdm's bar) is written as
  `\\r` + line with no newline, so such lines run together until the next plain line.
- Hydra: no `experiment_specs/` in the working directory → `Primary config directory not
  found`; the schemas refuse unknown keys (OmegaConf's messages), convert values as OmegaConf
  does, refuse null, and a required key left unset fails when the script reads it.
- `--user UID:GID` with no /etc/passwd entry for UID: the embedding script's `transformers`
  import dies in `pwd.getpwuid` (KeyError: 'getpwuid(): uid not found: N'). The mining script
  imports no transformers.
- The embedding opens each `filepath` as written (relative ones against the working directory;
  an unreadable image crashes the step), writes `filepath`, `embedding` (list<double>) and every
  other input column, and no encoder identity. The encoder is deft-mine's weight-free
  `thumbnail` whatever `model` names, so results compare with `--backend local model=thumbnail`.
- The mining: brute-force k-NN (ties to the lower source row), the label post-filter, main's
  distance_threshold, the mined parquet (`filepath` only) and each release's mining_summary.txt.

Flavours: `7.1.0`, `main`, and `main-lies` (main, but its entrypoint prints
`Execution status: FAIL` and still exits 0), from $FAKE_TAO_FLAVOUR or a first argument.
Not reproduced: GPUs (`nvidia-smi -L`), CLIP/SigLIP/TAO checkpoints, text embeddings,
unique_neighbor_matching, telemetry beyond its printed lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

FLAVOURS = ("7.1.0", "main", "main-lies")
MISSING = "???"

# The schemas: key -> (type, default); MISSING marks a required key.
EMBEDDING_SCHEMA = {
    "input_parquet": (str, MISSING), "output_parquet": (str, MISSING), "model": (str, MISSING),
    "model_path": (str, MISSING), "model_config_path": (str, ""), "batch_size": (int, 64)}
MINING_SCHEMA_7_1_0 = {
    "source_parquet": (str, MISSING), "target_parquet": (str, MISSING), "output_parquet": (str, MISSING),
    "topn": (int, 5), "knn_metric": (str, "euclidean"), "source_embed_column_name": (str, "embedding"),
    "target_embed_column_name": (str, "embedding"), "filter_by_label": (str, "false")}
MINING_SCHEMA_MAIN = {**MINING_SCHEMA_7_1_0, "distance_threshold": (float, -1.0)}
SCHEMA_NAMES = {"embedding": "ImageEmbeddingsConfig", "tmm": "NearestNeighborsConfig"}
ACTIONS = {"embedding": ("image_embeddings",), "tmm": ("nearest_neighbors",)}
# The real relay's test for a progress-bar line.
PROGRESS_BAR = re.compile(r"Epoch \d+: \s*\d+%|\[.*\]")
HYDRA_HINT = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


class ConfigError(Exception):
    """An OmegaConf/Hydra configuration error: its message as Hydra prints it."""


# ---------------------------------------------------------------- the entrypoint (parent process)

def entrypoint(flavour: str, argv: list[str]) -> int:
    """The category console script: checks -e, runs the Hydra script as a child with its output
    relayed, then the telemetry lines and the status line. A missing -e or spec file raises
    before any of that (a traceback, exit 1, no status line), as there."""
    category = argv[0] if argv and argv[0] in ACTIONS else None
    if category is None:
        print(f"usage: <entrypoint> {{{','.join(ACTIONS)}}} ACTION -e SPEC [key=value ...]", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=category)
    parser.add_argument("subtask", choices=ACTIONS[category])
    parser.add_argument("-e", "--experiment_spec_file", required=False)
    args, unknown = parser.parse_known_args(argv[1:])
    if args.experiment_spec_file is None:
        raise ValueError(f"The subtask `{args.subtask}` requires the following argument: -e/--experiment_spec_file")
    if not os.path.exists(args.experiment_spec_file):
        raise FileNotFoundError(f"Experiment spec file was not found at {args.experiment_spec_file}")
    child = [sys.executable, os.path.abspath(__file__), "--task", flavour, category,
             os.path.realpath(args.experiment_spec_file), *unknown]
    passed = relay(child) == 0
    if flavour == "7.1.0":  # its telemetry import succeeds; sending fails without a network
        print("Telemetry data couldn't be sent, but the command ran successfully.")
        print("[Error]: <urlopen error [Errno -3] Temporary failure in name resolution>")
    else:
        print("Telemetry module not available, skipping telemetry data.")
        print("Telemetry data couldn't be sent, but the command ran successfully.")
        print("[Error]: nvidia_tao_core.telemetry is not available")
    if flavour == "main-lies":  # a test-only liar: the log says FAIL, the exit code says 0
        print("Execution status: FAIL")
        return 0
    print("Execution status: PASS" if passed else "Execution status: FAIL")
    return 0 if passed else 1


def relay(command: list[str]) -> int:
    """Run the child with stderr merged into stdout, reading lines in universal-newline mode, and
    write each as the real entrypoint does: a bar-looking line as '\\r' + line, no newline."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                            universal_newlines=True, env=env)
    for line in proc.stdout:
        if "\r" in line or PROGRESS_BAR.search(line):
            sys.stdout.write("\r" + line.strip())
        else:
            sys.stdout.write(line)
        sys.stdout.flush()
    return proc.wait()


# ---------------------------------------------------------------- the Hydra script (child process)

def task(flavour: str, category: str, spec_path: str, overrides: list[str]) -> int:
    """The script under hydra_runner: the embedding's transformers import first (getpwuid), then
    the config directory, composition (errors printed Hydra's way, exit 1), --cfg=job, the job."""
    if category == "embedding":
        import pwd

        pwd.getpwuid(os.getuid())  # what importing torch/transformers does; dies as a traceback
    cfg_job = _pop_cfg_job(overrides)
    config_dir = Path.cwd() / "experiment_specs"
    if not config_dir.is_dir():
        print(f"Primary config directory not found.\nCheck that the config directory '{config_dir}' exists "
              f"and readable\n{HYDRA_HINT}", file=sys.stderr)
        return 1
    schema = EMBEDDING_SCHEMA if category == "embedding" else (
        MINING_SCHEMA_7_1_0 if flavour == "7.1.0" else MINING_SCHEMA_MAIN)
    try:
        cfg = compose(schema, SCHEMA_NAMES[category], spec_path, overrides)
    except ConfigError as exc:
        print(f"{exc}\n{HYDRA_HINT}", file=sys.stderr)
        return 1
    if cfg_job:
        print(to_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - [%(name)s] - %(levelname)s - %(message)s "
                        "(%(filename)s:%(lineno)d)")
    job = Config(cfg, SCHEMA_NAMES[category])
    try:
        embed_images(job) if category == "embedding" else nearest_neighbors(job, flavour)
    except Exception:  # noqa: BLE001 - Hydra reports any error of the job, then exits 1
        print(f"Error executing job with overrides: {overrides}\n{traceback.format_exc()}{HYDRA_HINT}",
              file=sys.stderr)
        return 1
    return 0


def _pop_cfg_job(overrides: list[str]) -> bool:
    """Hydra's `--cfg=job` / `--cfg job` / `-c job` (removed from the overrides)."""
    for i, arg in enumerate(overrides):
        if arg == "--cfg=job":
            del overrides[i]
            return True
        if arg in ("--cfg", "-c") and overrides[i + 1:i + 2] == ["job"]:
            del overrides[i:i + 2]
            return True
    return False


def compose(schema: dict, schema_name: str, spec_path: str, overrides: list[str]) -> dict:
    """Schema defaults, then the spec file merged in, then the key=value overrides: unknown keys,
    nulls and values of the wrong type refused with OmegaConf's wording."""
    import yaml

    cfg = {key: default for key, (_, default) in schema.items()}
    loaded = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8")) or {}
    for key, value in loaded.items():
        if key not in schema:
            raise ConfigError(f"Error merging '{Path(spec_path).name}' with schema\nKey '{key}' not in "
                              f"'{schema_name}'\n    full_key: {key}\n    object_type={schema_name}")
        try:
            cfg[key] = convert(schema[key][0], key, value)
        except ConfigError as exc:
            raise ConfigError(f"Error merging '{Path(spec_path).name}' with schema\n{exc}\n"
                              f"    full_key: {key}\n    object_type={schema_name}") from None
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"Error parsing override '{override}'\nmissing EQUAL at '<EOF>'\n"
                              "See https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details")
        if key not in schema:
            raise ConfigError(f"Could not override '{key}'.\nTo append to your config use +{override}\n"
                              f"Key '{key}' is not in struct\n    full_key: {key}\n    object_type=dict")
        try:
            cfg[key] = convert(schema[key][0], key, parse_override(text))
        except ConfigError as exc:
            raise ConfigError(f"Could not override '{key}'.\nTo append to your config use +{override}\n"
                              f"{exc}\n    full_key: {key}\n    object_type=dict") from None
    return cfg


def parse_override(text: str):
    """A Hydra override value: null, true/false (any case), an int, a float, a quoted or bare string."""
    if text.lower() == "null":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", text, re.I):
        return float(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def convert(kind: type, key: str, value):
    """OmegaConf's typed nodes: str takes any scalar as its text; int takes an int or digits;
    float an int, a float or its text; none takes null (no key is Optional); `???` is unset."""
    if value is None:
        raise ConfigError(f"field '{key}' is not Optional")
    if value == MISSING:
        return MISSING
    if isinstance(value, (dict, list)):
        raise ConfigError(f"Cannot assign {type(value).__name__} to a {kind.__name__} field")
    if kind is str:
        return str(value)
    word = {int: "Integer", float: "Float"}[kind]
    ok = (type(value) in (int, str)) if kind is int else (type(value) in (int, float, str))
    try:
        if ok:
            return kind(value)
    except ValueError:
        pass
    raise ConfigError(f"Value '{value}' of type '{type(value).__name__}' could not be converted to {word}")


def to_yaml(cfg: dict) -> str:
    """The config as OmegaConf.to_yaml prints it: schema order, `???` for unset keys."""
    import yaml

    return "".join(f"{key}: ???\n" if value == MISSING else yaml.safe_dump({key: value}, sort_keys=False)
                   for key, value in cfg.items())


class Config:
    """The resolved config as the job reads it: a required key still unset fails when read."""

    def __init__(self, values: dict, schema_name: str) -> None:
        self._values, self._schema_name = values, schema_name

    def __getattr__(self, key: str):
        value = self._values[key]
        if value == MISSING:
            raise ConfigError(f"Missing mandatory value: {key}\n    full_key: {key}\n"
                              f"    object_type={self._schema_name}")
        return value


# ---------------------------------------------------------------- the two jobs

def embed_images(cfg: Config) -> None:
    """`embedding image_embeddings`: every `filepath` opened as written (relative: against the
    working directory), encoded in batches with a tqdm-like bar; the output keeps every other
    input column (merged on filepath) and records no encoder identity."""
    import pandas as pd
    from PIL import Image

    from deft_mine.engine.encoders import build_encoder

    log = logging.getLogger("__main__")
    input_parquet, output_parquet = cfg.input_parquet, cfg.output_parquet  # any model: thumbnail here
    model_path, model_config_path, batch_size = cfg.model_path, cfg.model_config_path, cfg.batch_size
    Path(output_parquet).parent.mkdir(parents=True, exist_ok=True)
    files = pd.read_parquet(input_parquet, columns=["filepath"])["filepath"].tolist()
    log.info("Total images to process: %d", len(files))
    if Path(model_path).suffix.lower() in (".pth", ".ckpt"):  # a TAO checkpoint needs its spec
        if not model_config_path:
            raise ValueError("model_config_path is required when model_path is a TAO checkpoint")
        for path, what in ((model_path, "TAO checkpoint path"), (model_config_path, "TAO model_config_path")):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{what} does not exist: {path}")
    encoder = build_encoder("thumbnail", None, "cpu")
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    names, vectors = [], []
    for done, batch in enumerate(batches, 1):
        images = []
        for path in batch:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        vectors += encoder.encode(encoder.preprocess(images)).tolist()
        names += batch
        bar = "█" * (10 * done // len(batches))
        print(f"\r{100 * done // len(batches):3d}%|{bar:<10}| {done}/{len(batches)} [00:00<00:00, 9.99it/s]",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    output = pd.DataFrame({"filepath": names, "embedding": vectors})
    source = pd.read_parquet(input_parquet)
    extra = [c for c in source.columns if c not in ("filepath", "embedding")]
    if extra:
        output = output.merge(source[["filepath", *extra]], on="filepath", how="left")
    _write_parquet(output, output_parquet)


def nearest_neighbors(cfg: Config, flavour: str) -> None:
    """`tmm nearest_neighbors`: the top-`topn` source rows of each target, the label post-filter
    (`str(x).strip().upper()` on both sides: two nulls agree as NONE), main's distance_threshold,
    then the mined `filepath`s, unique in order of first appearance, and mining_summary.txt."""
    import pyarrow.parquet as pq

    log = logging.getLogger("__main__")
    threshold = cfg.distance_threshold if flavour != "7.1.0" else -1.0
    source_parquet, target_parquet, output_parquet = cfg.source_parquet, cfg.target_parquet, cfg.output_parquet
    topn, metric = cfg.topn, cfg.knn_metric
    if flavour != "7.1.0":
        if metric == "cosine" and threshold > 2.0:
            log.warning("The given distance threshold of %.4f exceeds the maximum cosine distance of 2.0 "
                        "— the filter will have no effect.", threshold)
        if threshold < 0 and threshold != -1.0:
            log.warning("The given distance threshold of %.4f is negative, so distance filtering is disabled. "
                        "Use -1.0 to explicitly disable.", threshold)
    output_path = Path(output_parquet)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("Loading target data from: %s", target_parquet)
    targets = pq.read_table(target_parquet)
    log.info("Loading source data from: %s", source_parquet)
    source = pq.read_table(source_parquet)
    log.info("Performing k-NN search (metric=%s, k=%d)...", metric, topn)
    distances, indices = knn(_vectors(source, cfg.source_embed_column_name),
                             _vectors(targets, cfg.target_embed_column_name), topn, metric)
    log.info("k-NN search completed!")
    asked = str(cfg.filter_by_label).lower() in ("true", "1", "yes")
    filtering = asked and "label" in source.column_names and "label" in targets.column_names
    if asked and not filtering:
        missing = [side for side, t in (("source", source), ("target", targets)) if "label" not in t.column_names]
        log.warning("filter_by_label is enabled but the 'label' column is missing from: %s. Skipping label "
                    "filtering — mined output will include cross-label pairs.", ", ".join(missing))
    if filtering:
        source_labels, target_labels = _labels(source), _labels(targets)
        log.info("Label columns found — filtering cross-label mismatches")
    paths = source.column("filepath").to_pylist()
    mined, mismatches, too_far = [], 0, 0
    for i in range(len(indices)):
        for j in range(topn):
            row = int(indices[i, j])
            if filtering and source_labels[row] != target_labels[i]:
                mismatches += 1
                continue
            if 0 <= threshold < float(distances[i, j]):
                too_far += 1
                continue
            mined.append(paths[row])
    log.info("Saving results...")
    unique = list(dict.fromkeys(mined))
    _write_parquet({"filepath": unique}, output_path)
    counts = dict(queries=targets.num_rows, topn=topn, pairs=len(indices) * topn, mismatches=mismatches,
                  too_far=too_far, candidates=len(mined), unique=len(unique))
    text = (summary_7_1_0 if flavour == "7.1.0" else summary_main)(counts, filtering, threshold, output_parquet)
    log.info("\n%s", text.strip())
    (output_path.parent / "mining_summary.txt").write_text(text, encoding="utf-8")
    log.info("Summary written to: %s", output_path.parent / "mining_summary.txt")


def _vectors(table, column: str):
    """A list column as one 2-D array (a missing column is a KeyError naming it, as cuDF's)."""
    import numpy as np

    if column not in table.column_names:
        raise KeyError(column)
    return np.array(table.column(column).to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)


def _labels(table) -> list[str]:
    """Each row's label as the container compares it: `str(value).strip().upper()` of the value
    pandas 2 hands over: None for a null text (so NONE), NaN for a null number (NAN; an integer
    column with nulls turns float)."""
    import pyarrow as pa

    column = table.column("label")
    values = column.to_pylist()
    if pa.types.is_integer(column.type) and column.null_count:
        values = [float(v) if v is not None else v for v in values]
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = [float("nan") if v is None else v for v in values]
    return [str(v).strip().upper() for v in values]


def _write_parquet(columns, path) -> None:
    """A parquet as pandas 2.3 (the image's) writes it: text as `string`, an empty text column
    inferred as `null`; a DataFrame keeps its pandas metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(columns) if not isinstance(columns, dict) else pa.table(
        {k: pa.array(v) for k, v in columns.items()})
    fields = [f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    pq.write_table(table.cast(pa.schema(fields, metadata=table.schema.metadata)), path)


def knn(source, targets, topn: int, metric: str):
    """Distances and indices of each target's `topn` nearest source rows, nearest first; ties go
    to the lower source row. cosine: 1 - similarity of L2-normalised vectors; euclidean: L2;
    manhattan: L1."""
    import numpy as np

    if metric not in ("euclidean", "cosine", "manhattan"):
        raise ValueError(f"Metric {metric} is not valid. Use sorted(cuml.neighbors.VALID_METRICS[brute])")
    if topn > len(source):
        raise ValueError(f"n_neighbors must be <= the number of samples in the index ({len(source)}), got {topn}")
    if metric == "cosine":
        unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)  # noqa: E731
        full = 1.0 - unit(targets) @ unit(source).T
    elif metric == "euclidean":
        full = np.sqrt(((targets[:, None, :] - source[None, :, :]) ** 2).sum(axis=2))
    else:
        full = np.abs(targets[:, None, :] - source[None, :, :]).sum(axis=2)
    order = np.argsort(full, axis=1, kind="stable")[:, :topn]
    return np.take_along_axis(full, order, axis=1), order


def summary_main(c: dict, filtering: bool, threshold: float, output_parquet: str) -> str:
    """main's mining_summary.txt: indented lines, Total pairs, the optional label and distance lines."""
    label_kept = c["pairs"] - c["mismatches"]
    lines = ["Summary:", f"  Target queries: {c['queries']}", f"  Similar items per query: {c['topn']}",
             f"  Total pairs: {c['pairs']}"]
    if filtering:
        lines.append(f"  After label mismatch filtering: kept {label_kept}/{c['pairs']} pairs, "
                     f"dropped {c['mismatches']} mismatches")
    if threshold >= 0:
        lines.append(f"  After distance filtering: kept {label_kept - c['too_far']}/{label_kept} pairs, "
                     f"dropped {c['too_far']} exceeding threshold {threshold:.4f}")
    lines += [f"  Total candidates: {c['candidates']}", f"  Duplicates removed: {c['candidates'] - c['unique']}",
              f"  Unique items saved: {c['unique']}", f"  Results saved to: {output_parquet}"]
    return "\n".join(lines) + "\n"


def summary_7_1_0(c: dict, filtering: bool, threshold: float, output_parquet: str) -> str:
    """7.1.0's mining_summary.txt: no Total pairs, no distance line; the label line unindented
    after `Results saved to`, then an empty line."""
    lines = ["Summary:", f"  Target queries: {c['queries']}", f"  Similar items per query: {c['topn']}",
             f"  Total candidates: {c['candidates']}", f"  Duplicates removed: {c['candidates'] - c['unique']}",
             f"  Unique items saved: {c['unique']}", f"  Results saved to: {output_parquet}"]
    if filtering:
        lines += [f"Label filtering: kept {c['candidates']}/{c['pairs']} pairs, dropped {c['mismatches']} "
                  "mismatches", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--task"]:  # the child: --task FLAVOUR CATEGORY SPEC [overrides]
        return task(argv[1], argv[2], argv[3], argv[4:])
    flavour = os.environ.get("FAKE_TAO_FLAVOUR", "main")
    if argv[:1] and argv[0] in FLAVOURS:
        flavour, argv = argv[0], argv[1:]
    if flavour not in FLAVOURS:
        print(f"fake_tao: unknown flavour {flavour!r} (one of {', '.join(FLAVOURS)})", file=sys.stderr)
        return 2
    return entrypoint(flavour, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
