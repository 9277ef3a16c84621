"""Fold LoRA/QLoRA adapters (or ZeRO checkpoints) into plain Hugging Face checkpoints, streaming shard by shard.

Importable with torch, safetensors and peft alone; transformers, bitsandbytes and deepspeed are
imported only by the steps that need them (verify, GGUF bases, the NF4 round trip, ZeRO).

    from merge_tools import merge, format_report
    report = merge("runs/my-lora-run", "runs/my-lora-run-merged", dtype="bf16")

Importing the package itself is instant: ``MergeError`` needs nothing, and the names that need torch
are imported on first use (module ``__getattr__``), so the CLI can catch ``MergeError`` before any
command runs without paying for torch.
"""

from __future__ import annotations

import importlib
import sys
import types

from merge_tools.errors import MergeError

_LAZY = {
    "MergeReport": "merge_tools.merge",
    "format_report": "merge_tools.merge",
    "consolidate_zero_checkpoint": "merge_tools.zero",
}

__all__ = ["MergeError", "MergeReport", "consolidate_zero_checkpoint", "format_report", "merge"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'merge_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``merge_tools.merge`` stays the function even after the submodule of that name is imported.

    (The import system binds a loaded submodule onto its package; the eager ``__init__`` used to
    rebind the function over it, which a lazy one cannot do.)
    """

    @property
    def merge(self):
        return importlib.import_module("merge_tools.merge").merge

    @merge.setter
    def merge(self, _submodule) -> None:
        pass


sys.modules[__name__].__class__ = _Package
