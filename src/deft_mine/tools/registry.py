"""The tool registry: each tool declared once (input model, result model, function, annotations);
the MCP server, the command line and Python callers are all generated from it."""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from deft_mine.engine.store import default_location
from deft_mine.errors import DeftError
from deft_mine.events import Events, NullEvents, StageEvents
from deft_mine.report.provenance import Invocation, SessionLog
from deft_mine.schemas.inputs import ToolInput
from deft_mine.tools.guards import EncoderLock, PathPolicy, check_well_formed

InputT = TypeVar("InputT", bound=ToolInput)
ResultT = TypeVar("ResultT", bound=BaseModel)


@dataclass(frozen=True)
class ToolContext:
    """What a tool gets besides its inputs: where its events go, which paths it may touch
    (None: any), the session's encoder lock (None: no session) and the default store."""

    events: Events = field(default_factory=NullEvents)
    policy: PathPolicy | None = None
    lock: EncoderLock | None = None
    store: Path | None = None  # the server's embedding store (else $DEFT_MINE_STORE or the cache's)
    invocation: Invocation | None = None  # how this call came (a run folder records it)
    session: SessionLog | None = None  # the MCP session's calls (a run folder's session.jsonl)

    def stage(self, name: str) -> "ToolContext":
        """The same context, its events under a stage name (e.g. 'embed targets')."""
        return dataclasses.replace(self, events=StageEvents(self.events, name))

    def store_for(self, store: str | None, no_store: bool) -> Path | None:
        """Where embeddings are reused from and kept: None when switched off. A store the caller
        names must lie inside the roots, unless it is the server's own."""
        if no_store:
            return None
        default = self.store or default_location()
        if store is None:
            return default
        chosen = Path(store).expanduser().absolute()
        if self.policy is not None and chosen.resolve() != default.resolve():
            self.policy.check(chosen, "store")
        return chosen

    @property
    def image_allowed(self) -> Callable[[Path], bool] | None:
        """Which image files a picture may open (None: any)."""
        return self.policy.allows if self.policy is not None else None

    def check_paths(self, model: BaseModel) -> None:
        """A spec's paths, once loaded, pass the same door as the tool's own path arguments."""
        check_well_formed(model)
        if self.policy is not None:
            self.policy.check_model(model)


@dataclass(frozen=True)
class Tool(Generic[InputT, ResultT]):
    name: str
    title: str
    summary: str  # the command line's one-line help
    input: type[InputT]
    result: type[ResultT]
    fn: Callable[[InputT, ToolContext], ResultT]
    read_only: bool = False
    idempotent: bool = True
    mcp: bool = True  # False: the command line only (e.g. what deletes data)

    @property
    def description(self) -> str:
        """The function's docstring as one paragraph: what an agent reads about the tool."""
        return " ".join(inspect.cleandoc(self.fn.__doc__ or "").split())

    def invoke(self, inputs: InputT, ctx: ToolContext | None = None) -> ResultT:
        """Check the input's paths at the door, then run the tool."""
        ctx = ctx or ToolContext()
        ctx.check_paths(inputs)
        return self.fn(inputs, ctx)

    def __call__(self, *args: Any, events: Events | None = None, policy: PathPolicy | None = None,
                 lock: EncoderLock | None = None, invocation: Invocation | None = None, **fields: Any) -> ResultT:
        """The Python face: arguments by position (in the input model's field order) or name;
        `invocation` says how the call came when not from Python itself (e.g. `deft-mine demo`)."""
        fields.update(zip(self.input.model_fields, args))
        try:
            inputs = self.input(**{name: os.fspath(value) if isinstance(value, os.PathLike) else value
                                   for name, value in fields.items()})
        except ValidationError as exc:
            raise invalid_arguments(self.name, exc) from exc
        invocation = invocation or Invocation("python", self.name, inputs.model_dump(mode="json", exclude_none=True))
        return self.invoke(inputs, ToolContext(events or NullEvents(), policy, lock, invocation=invocation))


def invalid_arguments(tool: str, exc: ValidationError) -> DeftError:
    """Arguments that fail a tool's input model, the same from Python as over MCP."""
    first = exc.errors()[0]
    # The argument itself: pydantic's deeper loc parts name union members ("dict[str,any]").
    field = str(first["loc"][0]) if first["loc"] else "arguments"
    return DeftError("invalid_arguments", f"{tool}: {field}: {first['msg']}",
                     fix=f"give {field} as the tool's inputSchema describes it", field=field)


TOOLS: dict[str, Tool[Any, Any]] = {}


def register(tool: Tool[InputT, ResultT]) -> Tool[InputT, ResultT]:
    TOOLS[tool.name] = tool
    return tool
