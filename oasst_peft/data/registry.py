"""The dataset registry: each name maps to a hub id, its real schema and a row -> conversation converter.

A user adds a dataset in a few lines::

    from oasst_peft.data import register_dataset

    @register_dataset("my_qa", hub_id="me/my-qa")
    def my_qa(row, ctx):
        return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]

The converter gets one raw row (a dict) and a ``Context`` (the dataset's spec, a seeded ``rng``, ``drop``
to count a row it rejects) and returns one conversation, a list of them, or None. A missing field
(``KeyError``) or a wrong type counts as a malformed row, with its file and line.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Conversation = list[dict[str, str]]
Converter = Callable[[dict, "Context"], Any]


@dataclass
class Context:
    """What a converter may use: the spec, a seeded rng, a scratch ``state`` and ``drop(reason)``."""

    spec: Any
    rng: random.Random
    dropped: Counter = field(default_factory=Counter)
    state: dict = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` rows rejected for ``reason`` (shown by ``oasst-peft data stats``)."""
        self.dropped[reason] += n


@dataclass(frozen=True)
class DatasetInfo:
    """One registered dataset: where it lives on the hub and how its rows become conversations."""

    name: str
    convert: Converter | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_data_files: str | None = None
    hub_kwargs: tuple[tuple[str, Any], ...] = ()
    options: tuple[str, ...] = ()
    finish: Callable[[Context], Iterable[Conversation]] | None = None
    description: str = ""
    # A source whose rows are not conversations one by one (message trees): ``split(spec, problems, split,
    # dropped) -> (train, validation)`` reads it and splits whole units with ``split(items) -> (train, val)``.
    split: Callable[..., tuple[list, list]] | None = None


_REGISTRY: dict[str, DatasetInfo] = {}
_FAMILIES: list[tuple[re.Pattern, Callable[[re.Match], DatasetInfo], str]] = []


def register_dataset(
    name: str,
    *,
    hub_id: str | None = None,
    hub_config: str | None = None,
    hub_split: str = "train",
    hub_data_files: str | None = None,
    options: Iterable[str] = (),
    finish: Callable[[Context], Iterable[Conversation]] | None = None,
    description: str = "",
):
    """Decorator: register ``fn(row, ctx) -> conversation | [conversations] | None`` under ``name``."""

    def deco(fn: Converter) -> Converter:
        _REGISTRY[name] = DatasetInfo(
            name=name,
            convert=fn,
            hub_id=hub_id,
            hub_config=hub_config,
            hub_split=hub_split,
            hub_data_files=hub_data_files,
            options=tuple(options),
            finish=finish,
            description=description or _first_line(fn.__doc__),
        )
        return fn

    return deco


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def register_info(info: DatasetInfo) -> DatasetInfo:
    """Register a fully built ``DatasetInfo`` (a tree-shaped source such as oasst_export gives ``split``)."""
    _REGISTRY[info.name] = info
    return info


def register_family(pattern: str, make: Callable[[re.Match], DatasetInfo], example: str) -> None:
    """Register names matching ``pattern`` (e.g. ``wmt2019_zh-en``); ``make(match)`` builds the info."""
    _FAMILIES.append((re.compile(pattern), make, example))


def get_dataset_info(name: str) -> DatasetInfo | None:
    """The registered dataset called ``name`` (exact names first, then families), or None.

    The built-in datasets register when ``oasst_peft.data`` is imported (its ``sources`` and ``oasst_export``).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    for pattern, make, _ in _FAMILIES:
        m = pattern.fullmatch(name)
        if m:
            return make(m)
    return None


def dataset_names() -> list[str]:
    """Every registered name, with one example name per family."""
    return sorted(set(_REGISTRY) | {example for _, _, example in _FAMILIES})
