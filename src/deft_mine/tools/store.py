"""The store tools: what the embedding store holds (per encoder) and pruning it."""

from __future__ import annotations

import re
import shutil

from deft_mine.engine import store as stores
from deft_mine.errors import DeftError
from deft_mine.schemas.inputs import StoreInfoInput, StorePruneInput
from deft_mine.schemas.results import StoreInfoResult, StorePruneResult
from deft_mine.tools.registry import Tool, ToolContext, register

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def describe_store(inputs: StoreInfoInput, ctx: ToolContext) -> StoreInfoResult:
    """Where the embedding store is, how big, how much disk is free, and how many vectors it
    holds per encoder (with the fingerprints `store prune` takes)."""
    root = ctx.store_for(inputs.store, False)
    assert root is not None
    if root.exists():
        stores.open_store(root)  # refuses a file, or a folder that is not a store
    shelves = stores.describe(root)
    existing = root if root.exists() else next(p for p in root.parents if p.exists())
    return StoreInfoResult(store=str(root), bytes=sum(s.bytes for s in shelves), encoders=shelves,
                           free_bytes=shutil.disk_usage(existing).free)


def prune_store(inputs: StorePruneInput, ctx: ToolContext) -> StorePruneResult:
    """Remove one encoder's vectors, or shards older than an age, or both."""
    root = ctx.store_for(inputs.store, False)
    assert root is not None
    age = None
    if inputs.older_than is not None:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", inputs.older_than)
        if not match:
            raise DeftError("spec_invalid", f"older_than {inputs.older_than!r} is not an age",
                            fix="write it as 30d, 12h, 45m or 90s", field="older_than")
        age = float(match[1]) * _UNITS[match[2] or "d"]
    removed, freed = stores.prune(root, inputs.encoder, age)
    return StorePruneResult(store=str(root), removed_shards=removed, freed_bytes=freed)


store_info = register(Tool("store_info", "Show the embedding store", "size, free disk and vectors per encoder",
                           StoreInfoInput, StoreInfoResult, describe_store, read_only=True))
store_prune = register(Tool("store_prune", "Prune the embedding store",
                            "remove one encoder's vectors or shards older than an age",
                            StorePruneInput, StorePruneResult, prune_store, mcp=False))
