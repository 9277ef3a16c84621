"""The data mix: every dataset read, converted, checked, split and sampled, deterministically for a seed.

``load_mix(specs, seed)`` returns a ``Mix``: per dataset key its train and validation conversations
and the rows dropped, by reason. Options, applied in this order:

* ``val_split``: share of conversations (oasst_export: of trees) held out for validation; at least
  one when the share is above 0 and there are two or more, never all of them;
* ``fraction``: share of the training conversations kept (a seeded draw, once; the Open-Assistant
  trainer redrew it every epoch and only with ``use_custom_sampler``);
* ``max_train_set`` / ``max_val_set``: caps on each split (seeded draws; the rest is not used).

Drops found while reading, before the split, are counted under ``train``; what sampling leaves out
is counted too (reasons ``fraction``, ``max_train_set``, ``max_val_set``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft.data.conversation import check_conversation
from oasst_peft.data.readers import MALFORMED, Problems, expand_files, iter_file_rows, iter_hub_rows
from oasst_peft.data.registry import Context, DatasetInfo, get_dataset_info
from oasst_peft.data.sources import FORMATS
from oasst_peft.data.spec import DatasetSpec
from oasst_peft.errors import OasstError

SPLITS = ("train", "validation")


@dataclass
class DatasetPart:
    """One dataset of the mix after loading: its conversations per split and what was dropped."""

    key: str
    spec: DatasetSpec | None
    train: list[list[dict]]
    validation: list[list[dict]]
    dropped: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    first_problem: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> list[list[dict]]:
        return self.train if name == "train" else self.validation


@dataclass
class Mix:
    """Per dataset key (``vicuna``, ``vicuna#2`` ...), train and validation conversations."""

    parts: dict[str, DatasetPart]
    seed: int = 0

    @property
    def train(self) -> dict[str, list[list[dict]]]:
        return {k: p.train for k, p in self.parts.items()}

    @property
    def validation(self) -> dict[str, list[list[dict]]]:
        return {k: p.validation for k, p in self.parts.items()}

    def dropped(self, key: str, split: str = "train") -> dict[str, int]:
        return dict(self.parts[key].dropped[split])

    def fingerprint(self) -> str:
        """Digest of every conversation, in order, per dataset and split (keys the tokenized cache)."""
        h = hashlib.sha256()
        for key, part in self.parts.items():
            h.update(json.dumps(["dataset", key]).encode())
            for split in SPLITS:
                convs = part.split(split)
                h.update(f"\x00{split}:{len(convs)}\x00".encode())
                for conv in convs:
                    for m in conv:
                        h.update(m["role"].encode())
                        h.update(b"\x01")
                        h.update(m["content"].encode("utf-8", "surrogatepass"))
                        h.update(b"\x02")
                    h.update(b"\x03")
        return "sha256:" + h.hexdigest()

    @classmethod
    def from_conversations(
        cls, train: dict[str, list], validation: dict[str, list] | None = None, seed: int = 0
    ) -> Mix:
        """A mix built in Python from ready conversations (checked and counted like loaded ones)."""
        validation = validation or {}
        parts = {}
        for key in dict.fromkeys([*train, *validation]):
            part = DatasetPart(key, None, [], [])
            part.train = _checked(list(train.get(key, [])), part.dropped["train"])
            part.validation = _checked(list(validation.get(key, [])), part.dropped["validation"])
            parts[key] = part
        return cls(parts, seed)


def derive_seed(*parts) -> int:
    """A 64-bit seed from any JSON-able parts (stable across runs and Python versions)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(spec: DatasetSpec, seed: int, purpose: str) -> random.Random:
    base = ("manual", spec.manual_seed) if spec.manual_seed is not None else ("mix", seed, spec.key)
    return random.Random(derive_seed(*base, purpose))


def split_items(items: list, val_split: float, rng: random.Random) -> tuple[list, list]:
    """(train, validation) keeping the input order within each; see the module docstring for sizes."""
    n = len(items)
    n_val = round(n * val_split) if val_split > 0 else 0
    if val_split > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    rng.shuffle(order)
    val_idx = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val


def subsample(items: list, k: int, rng: random.Random) -> list:
    """A seeded subset of ``k`` items, in their original order."""
    if k >= len(items):
        return items
    keep = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in keep]


def _checked(convs: list, dropped: Counter) -> list:
    out = []
    for c in convs:
        reason = check_conversation(c)
        if reason:
            dropped[reason] += 1
        else:
            out.append(c)
    return out


def _rows(spec: DatasetSpec, info: DatasetInfo | None, problems: Problems) -> Iterator[tuple[str, object]]:
    files = spec.files()
    if files:
        for path in expand_files(spec.key, spec.file_key(), files):
            yield from iter_file_rows(Path(path), problems)
        return
    hub_id = spec.hf_dataset_name or (info.hub_id if info else None)
    if not hub_id:
        raise OasstError(
            f"datasets: {spec.key}: no data: set data_files: PATH (local {spec.format or 'messages'} "
            "files) or hf_dataset_name"
        )
    own_hub = info is not None and spec.hf_dataset_name in (None, info.hub_id)
    yield from iter_hub_rows(
        spec.key,
        spec.file_key(),
        hub_id,
        spec.hf_config or (info.hub_config if own_hub else None),
        info.hub_split if info else "train",
        data_files=info.hub_data_files if own_hub else None,
        **(dict(info.hub_kwargs) if own_hub else {}),
    )


def _convert_rows(spec: DatasetSpec, info: DatasetInfo | None, seed: int, problems: Problems) -> list:
    convert = FORMATS[spec.format] if spec.format else info.convert
    finish = None if spec.format else info.finish
    ctx = Context(spec=spec, rng=_rng(spec, seed, "convert"), dropped=problems.dropped)
    convs: list = []
    for where, row in _rows(spec, info, problems):
        if not isinstance(row, dict):
            problems.bad(where, f"a row must be a JSON object, got {type(row).__name__}")
            continue
        before = sum(ctx.dropped.values())
        try:
            result = convert(row, ctx)
        except KeyError as e:
            problems.bad(where, f"missing field {e}")
            continue
        except (TypeError, ValueError, AttributeError) as e:
            problems.bad(where, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            continue
        if result is None:
            if sum(ctx.dropped.values()) == before and finish is None:
                ctx.drop("rejected_by_converter")
        elif result and isinstance(result[0], list):
            convs.extend(result)
        else:
            convs.append(result)
    if finish is not None:
        convs.extend(finish(ctx))
    return convs


def skipped_lines(mix: Mix) -> list[str]:
    """One line per dataset that skipped rows it could not read, with the first one's file and line."""
    lines = []
    for key, part in mix.parts.items():
        n = part.dropped["train"][MALFORMED] + part.dropped["validation"][MALFORMED]
        if n and MALFORMED in part.first_problem:
            rows = "row" if n == 1 else "rows"
            lines.append(
                f"data: {key}: skipped {n:,} malformed {rows}; first: {part.first_problem[MALFORMED]} "
                "(on_error: fail stops at the first)"
            )
    return lines


def _emptied(part: DatasetPart, what: str) -> OasstError:
    reasons = part.dropped["train"] + part.dropped["validation"]
    files = part.spec.files()
    source = ", ".join(files) if files else (part.spec.hf_dataset_name or part.spec.name)
    why = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(6)) or f"{source} has no rows"
    first = next((part.first_problem[r] for r, _ in reasons.most_common() if r in part.first_problem), "")
    hint = f"; first: {first}" if first else ""
    return OasstError(f"datasets: {part.key}: {what} ({why}){hint}")


def load_dataset(spec: DatasetSpec, seed: int) -> DatasetPart:
    """Read, convert, check, split and sample one dataset of the mix."""
    info = get_dataset_info(spec.name)
    problems = Problems(spec.key, spec.on_error)
    part = DatasetPart(spec.key, spec, [], [])
    split_rng = _rng(spec, seed, "split")
    if info is not None and info.split is not None and not spec.format:  # tree-shaped: split whole trees
        split = lambda kept: split_items(kept, spec.val_split, split_rng)  # noqa: E731
        train, val = info.split(spec, problems, split, part.dropped)
        part.dropped["train"].update(problems.dropped)
        part.first_problem = problems.first
        train = _checked(train, part.dropped["train"])
        val = _checked(val, part.dropped["validation"])
    else:
        convs = _convert_rows(spec, info, seed, problems)
        part.dropped["train"].update(problems.dropped)
        part.first_problem = problems.first
        convs = _checked(convs, part.dropped["train"])
        if not convs:
            raise _emptied(part, "no usable conversation")
        train, val = split_items(convs, spec.val_split, split_rng)
    if not train:
        raise _emptied(part, "no training conversation left")
    n = len(train)
    if spec.fraction < 1.0:
        k = max(1, round(n * spec.fraction))
        train = subsample(train, k, _rng(spec, seed, "fraction"))
        part.dropped["train"]["fraction"] += n - len(train)
    if spec.max_train_set is not None and len(train) > spec.max_train_set:
        n = len(train)
        train = subsample(train, spec.max_train_set, _rng(spec, seed, "max_train_set"))
        part.dropped["train"]["max_train_set"] += n - len(train)
    if spec.max_val_set is not None and len(val) > spec.max_val_set:
        n = len(val)
        val = subsample(val, spec.max_val_set, _rng(spec, seed, "max_val_set"))
        part.dropped["validation"]["max_val_set"] += n - len(val)
    part.train, part.validation = train, val
    return part


def load_mix(specs: list[DatasetSpec], seed: int) -> Mix:
    """Every dataset of the mix, loaded (see the module docstring). Deterministic for ``seed``."""
    if not specs:
        raise OasstError("datasets: the mix is empty: list at least one dataset")
    keys = [s.key or s.name for s in specs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise OasstError(
            f"datasets: '{dup}' appears twice with the same key; use parse_datasets to name them"
        )
    parts = {}
    for spec in specs:
        if not spec.key:
            spec = spec.model_copy(update={"key": spec.name})
        parts[spec.key] = load_dataset(spec, seed)
    return Mix(parts, seed)
