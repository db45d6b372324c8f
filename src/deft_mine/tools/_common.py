"""Small pieces every tool needs: spec loading with explicit per-run paths, input/output checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from deft_mine.engine import tables
from deft_mine.errors import DeftError
from deft_mine.schemas.specs import SpecT, _Spec, load_spec


def spec_with_paths(cls: type[SpecT], spec_path: str | Path | None,
                    overrides: Mapping[str, Any] | Sequence[str] | None, **paths: str | Path | None) -> SpecT:
    """Load a spec; explicit path arguments win over the file and the overrides."""
    spec = load_spec(cls, spec_path, overrides or ())
    for key, value in paths.items():
        if value is not None:
            setattr(spec, key, str(value))
    return spec


def required_path(spec: _Spec, field: str) -> Path:
    value = getattr(spec, field)
    if not value:
        raise DeftError("spec_missing_value", f"'{field}' is required but not set",
                        fix=f"pass {field}=PATH", field=field)
    return Path(value).expanduser().absolute()


def existing_input(spec: _Spec, field: str) -> Path:
    return tables.require_file(required_path(spec, field), field)


def distinct_output(output: Path, field: str, *inputs: Path) -> Path:
    for source in inputs:
        if output.resolve() == source.resolve():
            raise DeftError("output_is_input", f"{field} {output} is also an input; refusing to "
                            "overwrite it", fix=f"choose another {field}", field=field)
    if output.is_dir():
        raise DeftError("output_is_directory", f"{field} {output} is a directory",
                        fix=f"give a file name for {field}", field=field)
    return output
