"""A test double of NVIDIA's TAO data-services image, for deft-mine's docker backend tests.

It is the ENTRYPOINT of a `docker import`ed image (tests/test_docker_tao.py), run by the host's
Python, which is bind-mounted read-only. It reproduces what can be observed of the real image
(NVIDIA-TAO/tao-data-services, `nvidia_tao_ds/mining/` and `core/entrypoint/`, release/7.1.0 and
main), and nothing of its code:

- `<entrypoint> <category> <action> -e SPEC.yaml [key=value ...]` with the flavour's actions:
  `embedding image_embeddings` and `tmm nearest_neighbors` in each, `embedding text_embeddings`
  from 7.1.0 on, `tmm unique_neighbor_matching` in main alone; an action the flavour lacks is
  argparse's `invalid choice` (exit 2, no status line). `--cfg=job` prints the resolved config
  (YAML, every schema key, `???` for an unset required one, `null` for an unset optional one) and
  exits.
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
- The text embedding (`TextEmbeddingsConfig`, the same in 7.1.0 and main): the `text` column
  only, `model` CLIP | SigLIP | SigLIP2 (any case, `-`/`_` ignored; else NotImplementedError),
  `model_path` a Hugging Face folder; the output holds `text`, `embedding`, then every other input
  column joined by position. The vectors are deft-mine's text tower's (its engine, called here:
  the container's tokenisation, but L2-normalised where the container keeps get_text_features as
  they are), so they compare with `--backend local`. A null text fails the step, as the
  container's tokenizer does.
- The unique matching (main's `UniqueNeighborMatchingConfig`): runs deft-mine's engine
  (called here; it reads the COCO/KITTI files the container's way) and writes what the container writes: the per-pass parquets
  `<subset>_iteration_<n>_topn_<k>.parquet`, `final_unique_files.parquet` (the source filepath
  column alone, sorted) and summary.json with the container's keys only. class_stratified needs
  rare_class_list, both detection files and detection_format (a ValueError otherwise, as there):
  the container takes no class from a `label` column.
- The schemas' value types as OmegaConf's: str, int, float, bool (true/false/yes/no/on/off/1/0)
  and Optional[str] (null allowed) for the keys the real ones declare so.
- deft_mine, which the jobs call, is imported from the folder the caller mounted that holds it
  (read from /proc/self/mountinfo), before the interpreter's own path: the host's checkout, even
  where the mounted virtual environment's editable install names another one.

Flavours: `7.0.2` (7.1.0 before text embeddings: release/7.0.2), `7.1.0`, `main`, and
`main-lies` (main, but its entrypoint prints `Execution status: FAIL` and still exits 0), from
$FAKE_TAO_FLAVOUR or a first argument.
Not reproduced: GPUs (`nvidia-smi -L`), CLIP/SigLIP/TAO checkpoints for images,
visualisations, telemetry beyond its printed lines.
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

FLAVOURS = ("7.0.2", "7.1.0", "main", "main-lies")
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
TEXT_SCHEMA = {"input_parquet": (str, MISSING), "output_parquet": (str, MISSING), "model": (str, MISSING),
               "model_path": (str, MISSING), "batch_size": (int, 64)}
OPTIONAL = None  # the default of an Optional[str] key: null, and null may be given
UNIQUE_SCHEMA = {
    "source_path": (str, MISSING), "target_path": (str, MISSING), "output_dir": (str, MISSING),
    "desired_unique_count": (int, MISSING), "allocation_policy": (str, "global"), "distance_metric": (str, "euclidean"),
    "candidate_expansion_factor": (int, 5), "source_embedding_column": (str, "embedding"),
    "target_embedding_column": (str, "embedding"), "source_filepath_column": (str, "filepath"),
    "target_filepath_column": (str, "filepath"), "exclude_path": (str, OPTIONAL),
    "source_detection_file": (str, OPTIONAL), "target_detection_file": (str, OPTIONAL),
    "detection_format": (str, OPTIONAL), "rare_class_list": (str, ""), "save_embeddings": (bool, False),
    "visualize": (bool, False)}
# (category, action) -> the schema's class name
SCHEMA_NAMES = {("embedding", "image_embeddings"): "ImageEmbeddingsConfig",
                ("embedding", "text_embeddings"): "TextEmbeddingsConfig",
                ("tmm", "nearest_neighbors"): "NearestNeighborsConfig",
                ("tmm", "unique_neighbor_matching"): "UniqueNeighborMatchingConfig"}
ACTIONS_7_0_2 = {"embedding": ("image_embeddings",), "tmm": ("nearest_neighbors",)}
ACTIONS_7_1_0 = {"embedding": ("image_embeddings", "text_embeddings"), "tmm": ("nearest_neighbors",)}
ACTIONS_MAIN = {"embedding": ("image_embeddings", "text_embeddings"),
                "tmm": ("nearest_neighbors", "unique_neighbor_matching")}
ACTIONS = ACTIONS_MAIN  # the categories (each flavour's actions: actions())
RELEASES_7_1 = ("7.0.2", "7.1.0")  # their mining (and telemetry lines) are 7.1.0's
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
    parser.add_argument("subtask", choices=actions(flavour)[category])
    parser.add_argument("-e", "--experiment_spec_file", required=False)
    args, unknown = parser.parse_known_args(argv[1:])
    if args.experiment_spec_file is None:
        raise ValueError(f"The subtask `{args.subtask}` requires the following argument: -e/--experiment_spec_file")
    if not os.path.exists(args.experiment_spec_file):
        raise FileNotFoundError(f"Experiment spec file was not found at {args.experiment_spec_file}")
    child = [sys.executable, os.path.abspath(__file__), "--task", flavour, category, args.subtask,
             os.path.realpath(args.experiment_spec_file), *unknown]
    passed = relay(child) == 0
    if flavour in RELEASES_7_1:  # its telemetry import succeeds; sending fails without a network
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


def actions(flavour: str) -> dict[str, tuple[str, ...]]:
    """The flavour's subtasks per category (the real entrypoint lists its scripts package)."""
    return ACTIONS_7_0_2 if flavour == "7.0.2" else ACTIONS_7_1_0 if flavour == "7.1.0" else ACTIONS_MAIN


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

def task(flavour: str, category: str, action: str, spec_path: str, overrides: list[str]) -> int:
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
    release = "7.1.0" if flavour in RELEASES_7_1 else "main"
    schema = {"image_embeddings": EMBEDDING_SCHEMA, "text_embeddings": TEXT_SCHEMA,
              "unique_neighbor_matching": UNIQUE_SCHEMA,
              "nearest_neighbors": MINING_SCHEMA_7_1_0 if release == "7.1.0" else MINING_SCHEMA_MAIN}[action]
    name = SCHEMA_NAMES[(category, action)]
    try:
        cfg = compose(schema, name, spec_path, overrides)
    except ConfigError as exc:
        print(f"{exc}\n{HYDRA_HINT}", file=sys.stderr)
        return 1
    if cfg_job:
        print(to_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - [%(name)s] - %(levelname)s - %(message)s "
                        "(%(filename)s:%(lineno)d)")
    job = Config(cfg, name)
    jobs = {"image_embeddings": embed_images, "text_embeddings": embed_texts, "unique_neighbor_matching":
            unique_neighbor_matching, "nearest_neighbors": lambda c: nearest_neighbors(c, release)}
    try:
        jobs[action](job)
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
            cfg[key] = convert(schema[key], key, value)
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
            cfg[key] = convert(schema[key], key, parse_override(text))
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


def convert(field: tuple, key: str, value):
    """OmegaConf's typed nodes: str takes any scalar as its text; int takes an int or digits;
    float an int, a float or its text; bool a bool, 0/1 or its words; null only an Optional key
    (its default null); `???` is unset."""
    kind, default = field
    if value is None:
        if default is OPTIONAL:
            return None
        raise ConfigError(f"field '{key}' is not Optional")
    if value == MISSING:
        return MISSING
    if isinstance(value, (dict, list)):
        raise ConfigError(f"Cannot assign {type(value).__name__} to a {kind.__name__} field")
    if kind is str:
        return str(value)
    if kind is bool:
        words = {"true": True, "yes": True, "on": True, "y": True, "1": True,
                 "false": False, "no": False, "off": False, "n": False, "0": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, int) or str(value).lower() in words:
            return bool(value) if isinstance(value, int) else words[str(value).lower()]
        raise ConfigError(f"Value '{value}' is not a valid bool (type {type(value).__name__})")
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


def embed_texts(cfg: Config) -> None:
    """`embedding text_embeddings`: the `text` column in batches through the model's text tower
    (deft-mine's, see the module docstring); `text`, `embedding`, then the other input columns
    joined by position, written by pandas."""
    import pandas as pd

    from deft_mine.engine.encoders import build_text_encoder

    log = logging.getLogger("__main__")
    input_parquet, output_parquet, model, model_path = cfg.input_parquet, cfg.output_parquet, cfg.model, cfg.model_path
    batch_size = cfg.batch_size
    Path(output_parquet).parent.mkdir(parents=True, exist_ok=True)
    texts = pd.read_parquet(input_parquet, columns=["text"])["text"].tolist()
    log.info("Total texts to process: %d", len(texts))
    key = str(model).upper().replace("-", "").replace("_", "")
    if key not in ("CLIP", "SIGLIP", "SIGLIP2"):
        log.error("Embedding model %s is not valid", model)
        raise NotImplementedError(f"Embedding model {model} is not valid")
    encoder = build_text_encoder("CLIP" if key == "CLIP" else "SigLIP", model_path, "cpu")
    log.info("Tokenizing text with max_length=%d", encoder.max_length)
    vectors = []
    for start in range(0, len(texts), int(batch_size)):
        batch = texts[start:start + int(batch_size)]
        if not all(isinstance(text, str) for text in batch):  # the tokenizer's refusal
            raise ValueError("text input must be of type `str` (single example), `List[str]` (batch or single "
                             "pretokenized example) or `List[List[str]]` (batch of pretokenized examples).")
        vectors += list(encoder.encode(batch))
    output = pd.DataFrame({"text": texts, "embedding": vectors})
    source = pd.read_parquet(input_parquet).reset_index(drop=True)
    extra = [c for c in source.columns if c not in ("text", "embedding")]
    if extra:
        output = pd.concat([output.reset_index(drop=True), source[extra]], axis=1)
    output.to_parquet(output_parquet)


def unique_neighbor_matching(cfg: Config) -> None:
    """`tmm unique_neighbor_matching` (main): class_stratified's prerequisites checked as there
    (classes from the COCO/KITTI files only); matched by deft-mine's engine, then final_unique_files.parquet and summary.json
    rewritten as the container writes them (its columns and keys only)."""
    import json

    import pandas as pd

    from deft_mine.engine.unique_matching import unique_match
    from deft_mine.engine.unique_outputs import write_outputs
    from deft_mine.schemas.specs import UniqueMatchingSpec

    log = logging.getLogger("__main__")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if not cfg.desired_unique_count:
        raise ValueError("desired_unique_count is required")
    rare = {c.strip().lower() for c in (cfg.rare_class_list or "").split(",") if c.strip()}
    if cfg.allocation_policy == "class_stratified":
        for key, why in (("rare_class_list", rare), ("source_detection_file", cfg.source_detection_file),
                         ("target_detection_file", cfg.target_detection_file)):
            if not why:
                raise ValueError(f"{key} is required when allocation_policy is class_stratified")
        if not cfg.detection_format:
            raise ValueError("detection_format (coco or kitti) is required when allocation_policy is class_stratified")
    keys = [k for k in UNIQUE_SCHEMA if k != "visualize" and getattr(cfg, k) not in (None, "")]
    spec = UniqueMatchingSpec(**{k: getattr(cfg, k) for k in keys})
    log.info("%s iterative TMM matching; desired unique count: %d", cfg.allocation_policy, spec.desired_unique_count)
    outcome = unique_match(spec)
    out = write_outputs(spec, outcome)
    chosen = sorted(outcome.selected.column(0).to_pylist())
    pd.DataFrame({cfg.source_filepath_column: chosen}).to_parquet(out / "final_unique_files.parquet", index=False)
    coverage = len(chosen) / spec.desired_unique_count * 100
    log.info("Matched %d/%d unique files (%.1f%% coverage) -> %s", len(chosen), spec.desired_unique_count,
             coverage, out / "final_unique_files.parquet")
    summary = {"allocation_policy": cfg.allocation_policy, "desired_unique_count": spec.desired_unique_count,
               "retrieved_unique_count": len(chosen), "coverage_pct": round(coverage, 2),
               "target_queries": len(outcome.target_paths), "rare_classes": sorted(rare)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    log.info("Summary saved to: %s", out / "summary.json")


def import_mounted_deft_mine() -> None:
    """Put the mounted folder holding deft_mine first on sys.path (see the module docstring)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if Path(point, "deft_mine", "__init__.py").is_file():
            sys.path.insert(0, point)
            return


def nearest_neighbors(cfg: Config, flavour: str) -> None:
    """`tmm nearest_neighbors`: the top-`topn` source rows of each target, the label post-filter
    (`str(x).strip().upper()` on both sides: two nulls agree as NONE), main's distance_threshold,
    then the mined `filepath`s, unique in order of first appearance, and mining_summary.txt."""
    import pyarrow.parquet as pq

    log = logging.getLogger("__main__")
    threshold = cfg.distance_threshold if flavour != "7.1.0" else -1.0  # the release
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
    if argv[:1] == ["--task"]:  # the child: --task FLAVOUR CATEGORY ACTION SPEC [overrides]
        import_mounted_deft_mine()
        return task(argv[1], argv[2], argv[3], argv[4], argv[5:])
    flavour = os.environ.get("FAKE_TAO_FLAVOUR", "main")
    if argv[:1] and argv[0] in FLAVOURS:
        flavour, argv = argv[0], argv[1:]
    if flavour not in FLAVOURS:
        print(f"fake_tao: unknown flavour {flavour!r} (one of {', '.join(FLAVOURS)})", file=sys.stderr)
        return 2
    return entrypoint(flavour, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
