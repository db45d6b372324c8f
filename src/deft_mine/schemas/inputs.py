"""One input model per tool: the MCP arguments, the command-line options and the Python call.

A field's `Cli` marker says how the command line spells it (no marker: not on the command line);
its `PathField` marker makes the allowed-roots policy check it at the door; `Internal` keeps a
field for Python callers only (neither MCP nor the command line shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line: option flags, or a positional when none."""

    flags: tuple[str, ...] = ()
    help: str | None = None  # default: the field's description
    required: bool = False
    group: str | None = None  # a required, mutually exclusive group of options
    metavar: str | None = None  # default: the last flag, upper-cased
    repeat: bool = False  # the option may be given again, each value added to a list
    choices: tuple[str, ...] | None = None


def cli(*flags: str, **kwargs: Any) -> Cli:
    return Cli(tuple(flags), **kwargs)


class PathField:
    """A path the caller names: checked against the allowed roots before the tool runs."""


class Internal:
    """Set by other tools (e.g. run → select), never by a client."""


BackendName = Literal["local", "docker", "ray"]  # backends/ registers exactly these
Overrides = Annotated[
    dict[str, Any] | list[str] | None,
    # MCP clients send a mapping; the command line passes its key=value words as they are.
    WithJsonSchema({"anyOf": [{"additionalProperties": True, "type": "object"}, {"type": "null"}]}),
    Field(description="spec keys as in the YAML, e.g. {\"model\": \"thumbnail\", \"topn\": 10}; "
                      "they win over the spec file")]
Backend = Annotated[BackendName, Field(description="where the work runs; local = in-process, docker = the "
                                                  "TAO container, ray = a Ray cluster")]
Image = Annotated[str | None, Field(
    description="docker backend: image URI (default: TAO versions.yaml, else deft-mine:latest)")]
Mounts = Annotated[list[str] | None, Field(description="docker backend: extra read-only mounts at identical paths"),
                   PathField()]
RayAddress = Annotated[str | None, Field(
    description="ray backend: the cluster's address (host:port of the head, ray://host:10001 or auto; "
                "default: $RAY_ADDRESS, else a Ray started on this machine)")]
# Not a PathField: the server's own store may lie outside the roots (the tools check the rest).
Store = Annotated[str | None, Field(
    description="embedding store: vectors reused across rounds, keyed by encoder and image bytes "
                "(default: $DEFT_MINE_STORE, else ~/.cache/deft-mine)"), cli("--store")]
NoStore = Annotated[bool, Field(description="embed every image afresh, neither reading nor writing the store"),
                    cli("--no-store")]
class LedgerFormat(StrEnum):
    """How a history ledger is written: ours, or the DEFT loop's `mining_history.json`."""

    deft_mine = "deft-mine"  # {"format": "deft-mine-ledger", ...}: absolute normalised paths
    tao_skill = "tao-skill"  # {"version": 1, "identity": "filepath", ...}: paths normalised as written


LedgerFormatField = Annotated[LedgerFormat | None, Field(
    description="format of a NEW ledger: deft-mine (ours) or tao-skill (the DEFT loop's mining_history.json); "
                "an existing ledger keeps its own (asking for the other is refused); default deft-mine"),
    cli("--ledger-format", choices=tuple(f.value for f in LedgerFormat))]
MaxCumulativeFraction = Annotated[float | None, Field(
    description="selection budget: all iterations together select at most floor(fraction × pool rows) "
                "images, in (0, 1]; new candidates past it are left out and counted"),
    cli("--max-cumulative-fraction")]


class PassGolden(StrEnum):
    """What a PASS row of a ChangeNet pool without a golden image gets as its golden in the training rows."""

    none = "none"  # nothing: the row is left out and warned
    self = "self"  # its own image directory (an OK-only pool), said in the report


class BackendOptions(BaseModel):
    """Where the work runs: the one declaration of the backend options, resolved once into a
    backend (backends.resolve) that tools pass down. Tool inputs carry the same fields flat (the
    MCP arguments stay as they are); the command line adds these options to every working command."""

    model_config = ConfigDict(frozen=True)

    backend: Annotated[BackendName, cli("--backend", help="", choices=get_args(BackendName))] = "local"
    image: Annotated[str | None, cli("--image", help="docker backend: image URI (default: TAO versions.yaml "
                                     "under $TAO_SKILL_BANK_PATH, else deft-mine:latest)")] = None
    mounts: Annotated[list[str] | None, cli("--mount", metavar="PATH", repeat=True, help=(
        "docker backend: extra read-only bind mount at the identical path (repeatable)"))] = None
    ray_address: Annotated[str | None, cli("--ray-address", metavar="ADDRESS", help=(
        "ray backend: the cluster (host:port of the head, ray://host:10001 or auto; default: "
        "$RAY_ADDRESS, else a Ray started on this machine)"))] = None


# A ChangeNet CSV as a listing (engine/changenet.py): where its rows' images are and which lights.
ImagesDir = Annotated[str | None, Field(
    description="ChangeNet CSV: the images root its input_path/golden_path are relative to (default: the "
                "embedding spec's image_root, else the CSV's folder)"), PathField(), cli("--images-dir", metavar="DIR")]
Lights = Annotated[list[str] | None, Field(
    description="ChangeNet CSV: the lights, one listing row per CSV row and light (default: the keys of "
                "dataset.classify.input_map in changenet_spec, else SolderLight)"),
    cli("--light", metavar="LIGHT", repeat=True, help="ChangeNet CSV: a light (repeatable; default: the "
        "ChangeNet spec's dataset.classify.input_map keys, else SolderLight)")]
ImageExt = Annotated[str | None, Field(
    description="ChangeNet CSV: the image extension, .jpg or jpg (default: changenet_spec's "
                "dataset.classify.image_ext, else .jpg)"), cli("--image-ext", metavar="EXT")]
ChangeNetSpec = Annotated[str | None, Field(
    description="ChangeNet spec YAML: lights and image extension from its dataset.classify block"),
    PathField(), cli("--changenet-spec", metavar="YAML")]
SkipUnresolved = Annotated[bool, Field(
    description="ChangeNet CSV: leave out the rows whose image or golden resolves to no file or to "
                "several, counted as skip reason 'unresolved' (default: refuse them)"),
    cli("--skip-unresolved")]


class ChangeNetOptions(BaseModel):
    """How a ChangeNet CSV becomes a listing: the one declaration of these options; tool inputs
    carry the same fields flat, as they carry the backend options."""

    model_config = ConfigDict(frozen=True)

    images_dir: ImagesDir = None
    lights: Lights = None
    image_ext: ImageExt = None
    changenet_spec: ChangeNetSpec = None
    skip_unresolved: SkipUnresolved = False


class ToolInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def backend_options(self) -> BackendOptions:
        """This call's backend options (the defaults for a tool that has none of their fields)."""
        return BackendOptions(**{name: getattr(self, name) for name in BackendOptions.model_fields
                                 if name in type(self).model_fields})

    def changenet_options(self) -> ChangeNetOptions:
        """This call's ChangeNet options (the defaults for a tool that has none of their fields)."""
        return ChangeNetOptions(**{name: getattr(self, name) for name in ChangeNetOptions.model_fields
                                   if name in type(self).model_fields})


class PreflightInput(ToolInput):
    backend: Backend = "local"
    image: Annotated[str | None, Field(description="container image (docker backend)")] = None
    ray_address: RayAddress = None
    targets: Annotated[str | None, Field(
        description="target listing (parquet, CSV or ChangeNet CSV), to predict warnings"), PathField(),
        cli("--targets")] = None
    source: Annotated[str | None, Field(
        description="pool listing (parquet, CSV or ChangeNet CSV), to predict warnings"), PathField(),
        cli("--source")] = None
    mining_spec_path: Annotated[str | None, Field(description="mining spec YAML"), PathField(),
                                cli("-m", "--mining-spec")] = None
    overrides: Annotated[Overrides, cli(help="")] = None
    output_dir: Annotated[str | None, Field(
        description="where outputs will go (docker backend: disk space, writability)"), PathField(),
        cli("--output-dir", help="where outputs will go (disk space, writability)")] = None
    store: Store = None
    images_dir: ImagesDir = None
    lights: Lights = None
    image_ext: ImageExt = None
    changenet_spec: ChangeNetSpec = None
    skip_unresolved: SkipUnresolved = False


class EmbedInput(ToolInput):
    input_parquet: Annotated[str | None, Field(
        description="listing: parquet or CSV with a filepath column, or a ChangeNet CSV (else the spec's "
                    "input_parquet)"), PathField()] = None
    output_parquet: Annotated[str | None, Field(
        description="embedding parquet to write (atomically; else the spec's output_parquet)"), PathField()] = None
    spec_path: Annotated[str | None, Field(description="embedding spec YAML (TAO format)"), PathField(),
                         cli("-e", "--spec", help="embedding spec YAML")] = None
    overrides: Annotated[Overrides, cli(
        help="e.g. input_parquet=targets.parquet output_parquet=t_emb.parquet model=CLIP")] = None
    backend: Backend = "local"
    image: Image = None
    mounts: Mounts = None
    ray_address: RayAddress = None
    store: Store = None
    no_store: NoStore = False
    images_dir: ImagesDir = None
    lights: Lights = None
    image_ext: ImageExt = None
    changenet_spec: ChangeNetSpec = None
    skip_unresolved: SkipUnresolved = False


class MineInput(ToolInput):
    source_parquet: Annotated[str | None, Field(
        description="pool embedding parquet (else the spec's source_parquet)"), PathField()] = None
    target_parquet: Annotated[str | None, Field(
        description="target embedding parquet (else the spec's target_parquet)"), PathField()] = None
    output_parquet: Annotated[str | None, Field(
        description="mined parquet to write; mining_summary.txt goes beside it"), PathField()] = None
    spec_path: Annotated[str | None, Field(description="mining spec YAML (TAO format)"), PathField(),
                         cli("-e", "--spec", help="mining spec YAML")] = None
    overrides: Annotated[Overrides, cli(
        help="e.g. source_parquet=… target_parquet=… output_parquet=mined.parquet topn=10")] = None
    backend: Backend = "local"
    image: Image = None
    mounts: Mounts = None
    ray_address: RayAddress = None


class MatchInput(ToolInput):
    spec_path: Annotated[str | None, Field(description="unique matching spec YAML (the TAO `tmm "
                                                       "unique_neighbor_matching` format)"), PathField(),
                         cli("-e", "--spec", help="unique matching spec YAML (TAO format)")] = None
    overrides: Annotated[Overrides, cli(
        help="e.g. source_path=pool_emb.parquet target_path=t_emb.parquet output_dir=matched "
             "desired_unique_count=500")] = None
    backend: Backend = "local"
    image: Image = None
    mounts: Mounts = None
    ray_address: RayAddress = None


class RunInput(ToolInput):
    # Targets: a listing, or sentences (exactly one; the tool refuses both or neither, naming both).
    targets: Annotated[str | None, Field(
        description="target listing: parquet or CSV (filepath; optional label), a ChangeNet CSV, or a text "
                    "parquet (a `text` column, no `filepath`: sentences); or give `text` instead"), PathField(),
        cli("--targets", help="target listing: parquet or CSV (column filepath; optional label), a ChangeNet "
                              "CSV, or a parquet of sentences (column text); or --text instead")] = None
    source: Annotated[str, Field(
        description="pool listing: parquet or CSV (column filepath), or a ChangeNet CSV"), PathField(),
        cli("--source", required=True, help="pool listing: parquet or CSV (column filepath), or a ChangeNet CSV")]
    output_dir: Annotated[str | None, Field(
        description="run goes to output_dir/mining_results/<timestamp>/"), PathField(),
        cli("--output-dir", group="where", help="the run goes to DIR/mining_results/<YYYY-MM-DD_HHMMSS>/")] = None
    run_dir: Annotated[str | None, Field(description="or exactly here (new or empty folder)"), PathField(),
                       cli("--run-dir", group="where", help="the run goes exactly here (new or empty folder)")] = None
    embedding_spec_path: Annotated[str | None, Field(description="embedding spec YAML"), PathField(),
                                   cli("-e", "--embedding-spec")] = None
    mining_spec_path: Annotated[str | None, Field(description="mining spec YAML"), PathField(),
                                cli("-m", "--mining-spec")] = None
    overrides: Annotated[Overrides, cli(
        help="any key of either spec, e.g. model=thumbnail topn=10 filter_by_label=true")] = None
    backend: Backend = "local"
    history: Annotated[str | None, Field(
        description="history ledger JSON: keep only images no earlier iteration selected"), PathField(),
        cli("--history", help="history ledger JSON: mine to mined_candidates.parquet, then keep only "
                              "images no earlier iteration selected in mined.parquet")] = None
    # inlined (no $ref): every tool's input schema stays self-contained for MCP clients
    pass_golden: Annotated[PassGolden, WithJsonSchema({"type": "string", "enum": [m.value for m in PassGolden]}), Field(
        description="ChangeNet pool: a mined PASS row without a golden image is left out (none) or uses its "
                    "own image directory as its golden (self) in mined_training_rows.csv"),
        cli("--pass-golden", choices=tuple(PassGolden), help="ChangeNet pool: a mined PASS row without a golden "
            "is left out and warned (none), or uses its own image directory as its golden (self)")] = PassGolden.none
    validation_csv: Annotated[str | None, Field(
        description="ChangeNet pool: the validation CSV; a training row equal to one of its rows on the "
                    "validator's keys is left out of mined_training_rows.csv as a train/val leak"), PathField(),
        cli("--validation-csv", help="ChangeNet pool: the validation CSV; training rows equal to one of its rows "
            "(input_path, golden_path, label, object_name, boardname) are left out as train/val leaks")] = None
    ledger_format: LedgerFormatField = None
    max_cumulative_fraction: MaxCumulativeFraction = None
    image: Image = None
    mounts: Mounts = None
    ray_address: RayAddress = None
    store: Store = None
    no_store: NoStore = False
    images_dir: ImagesDir = None
    lights: Lights = None
    image_ext: ImageExt = None
    changenet_spec: ChangeNetSpec = None
    skip_unresolved: SkipUnresolved = False
    text: Annotated[list[str] | None, Field(
        description="sentences to mine from instead of target images, e.g. [\"solder bridge between two pins\"]: "
                    "embedded by the text tower of the same SigLIP/CLIP model as the pool; not with targets"),
        cli("--text", metavar="SENTENCE", repeat=True, help="a sentence to mine from instead of target images "
            "(repeatable; SigLIP/CLIP only; not with --targets)")] = None
    protect: Annotated[list[str] | None, Field(
        description="listings (parquet/CSV with filepath, or a ChangeNet CSV) of images that must never enter "
                    "training, e.g. the validation and KPI test sets: a pool copy of one (identical bytes, or with "
                    "leak_similarity / leak_distance a vector within it) is never mined and is listed in "
                    "leaks.parquet; the targets are always protected"), PathField(),
        cli("--protect", metavar="PATH", repeat=True, help="a listing of images that must never enter training "
            "(repeatable): their pool copies are never mined (leaks.parquet)")] = None


class SelectInput(ToolInput):
    candidates: Annotated[str, Field(description="mined candidates parquet"), PathField(),
                          cli("--candidates", required=True, help="mined candidates parquet (filepath first)")]
    ledger: Annotated[str, Field(description="history ledger JSON (created on iteration 1)"), PathField(),
                      cli("--ledger", required=True)]
    # The schema asks for >= 1; a smaller number gets the ledger's own refusal, which says what to pass.
    iteration: Annotated[int, Field(description="the ledger's last iteration + 1, or its last to resume",
                                    json_schema_extra={"minimum": 1}),
                         cli("--iteration", required=True,
                             help="this iteration: the ledger's last + 1 (or its last, to resume)")]
    output: Annotated[str, Field(description="parquet of the selected rows (the round's mined.parquet)"),
                      PathField(), cli("--output", required=True,
                                       help="selected rows (the next round's mined.parquet)")]
    image_root: Annotated[str | None, Field(
        description="where relative filepaths resolve (default: the candidates' folder)"), PathField(),
        cli("--image-root")] = None
    # Recorded in the ledger (run passes the spec's); a tao-skill ledger needs it (its resume rule compares it).
    topn: Annotated[int | None, Field(description="the topn the candidates were mined with (required with a "
                                                  "tao-skill ledger)"), cli("--topn")] = None
    ledger_format: LedgerFormatField = None
    max_cumulative_fraction: MaxCumulativeFraction = None
    pool_size: Annotated[int | None, Field(description="rows of the pool the candidates were mined from "
                                                       "(needed with max_cumulative_fraction)"),
                         cli("--pool-size")] = None


class ReportInput(ToolInput):
    run_dir: Annotated[str, Field(description="run folder (with run.json, or one the TAO container filled)"),
                       PathField(), cli(help="a run folder (with run.json, or one the TAO container filled)")]


class StoreInfoInput(ToolInput):
    store: Store = None


class StorePruneInput(ToolInput):
    store: Store = None
    encoder: Annotated[str | None, Field(description="remove this encoder's vectors: a fingerprint, model "
                                                     "name or model_path as `store info` lists them"),
                       cli("--encoder")] = None
    older_than: Annotated[str | None, Field(description="remove shards older than this: 30d, 12h, 45m or 90s"),
                          cli("--older-than")] = None


# One candidate encoder for `choose`: a model name, or the embedding spec's encoder keys.
EncoderChoice = Annotated[str | dict[str, Any], WithJsonSchema({"anyOf": [
    {"type": "string"}, {"additionalProperties": True, "type": "object"}]})]


class ChooseInput(ToolInput):
    @model_validator(mode="before")
    @classmethod
    def _unset_is_default(cls, data: Any) -> Any:
        """An option the command line was not given arrives as None: the field's default holds then."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        return data

    listing: Annotated[str, Field(
        description="labelled listing: parquet or CSV (filepath, label), or a ChangeNet CSV: the pool, or a "
                    "sample of it"), PathField(),
        cli("--listing", required=True, help="labelled listing: parquet or CSV (columns filepath, label), or a "
                                             "ChangeNet CSV")]
    output_dir: Annotated[str, Field(
        description="folder for choice.json, embedding_spec.yaml, mining_spec.yaml, Encoder_Choice.md, the plot "
                    "and each encoder's sample embeddings"), PathField(),
        cli("--output-dir", required=True, help="folder for choice.json, the two specs, Encoder_Choice.md and "
                                                "the plot")]
    targets: Annotated[str | None, Field(
        description="the round's labelled targets (optional): also scored by the share of each target's topn "
                    "sample neighbours that share its label"), PathField(),
        cli("--targets", help="the round's labelled targets (optional): each target's topn neighbours scored too")] = None
    encoders: Annotated[list[EncoderChoice] | None, Field(
        description="candidate encoders: model names (thumbnail, SigLIP, CLIP, DINOv2, hf) or spec keys, e.g. "
                    "{\"model\": \"DINOv2\", \"pooling\": \"mean\"} or {\"model\": \"hf\", \"model_path\": "
                    "\"/models/vit\"}; default: every built-in encoder whose weights load here, and thumbnail"),
        cli("--encoder", metavar="ENCODER", repeat=True, help="a candidate encoder: a model name, or its spec keys "
            "as 'model=DINOv2 pooling=mean' (repeatable; default: every built-in encoder whose weights load "
            "here, and thumbnail)")] = None
    sample: Annotated[int, Field(description="images in the label-stratified sample (every image when fewer), "
                                             "at least 10", json_schema_extra={"minimum": 10}),
                      cli("--sample")] = 2000
    k_max: Annotated[int, Field(description="agreement is scored for k = 1 … k_max neighbours (below the sample "
                                            "size)", json_schema_extra={"minimum": 1}), cli("--k-max")] = 20
    topn: Annotated[int, Field(description="the topn the round will mine with: the encoders are compared there "
                                           "(at most k_max)", json_schema_extra={"minimum": 1}), cli("--topn")] = 5
    tolerance: Annotated[float, Field(description="the suggested topn is the largest n whose agreement stays "
                                                  "within this of n = 1", ge=0.0, le=1.0),
                         cli("--tolerance")] = 0.05
    seed: Annotated[int, Field(description="the sample's seed: the same seed gives the same sample and scores"),
                    cli("--seed")] = 0
    image_root: Annotated[str | None, Field(
        description="folder the listing's relative filepaths resolve against (default: the listing's folder)"),
        PathField(), cli("--image-root")] = None
    backend: Backend = "local"
    image: Image = None
    mounts: Mounts = None
    ray_address: RayAddress = None
    store: Store = None
    no_store: NoStore = False
    images_dir: ImagesDir = None
    lights: Lights = None
    image_ext: ImageExt = None
    changenet_spec: ChangeNetSpec = None
    skip_unresolved: SkipUnresolved = False
