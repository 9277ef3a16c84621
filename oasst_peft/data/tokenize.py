"""Tokenize a loaded mix once (loss masks included), cache it on disk, and reuse it.

``tokenize_mix(mix, tokenizer, max_length)`` renders every conversation with the tokenizer's chat
template (``oasst_peft.template.tokenize_with_mask``) and returns a ``TokenizedMix``: ``.train`` is
one ``datasets.Dataset`` with columns ``input_ids`` and ``assistant_masks`` (what TRL's SFTTrainer
takes pre-tokenized), ``.validation`` one such Dataset per dataset key, ``.stats`` the counts
``oasst-peft data stats`` prints.

Over-long conversations follow ``excess_length``: ``truncate`` (default) cuts at a turn boundary so
the last kept turn is a whole assistant turn (dropped if even the first exchange is too long),
``drop`` drops them, ``error`` stops. Conversations left with no trained token never reach training.
Every drop and cut is counted.

The cache key is a digest of the loaded conversations (so of the recipe's data section, the files
and the seed), the tokenizer with its chat template, ``max_length`` and ``excess_length``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oasst_peft.data.mix import SPLITS, Mix
from oasst_peft.data.stats import build_stats
from oasst_peft.errors import OasstError
from oasst_peft.locks import exclusive
from oasst_peft.template import tokenize_with_mask

CACHE_VERSION = 1
COLUMNS = ["input_ids", "assistant_masks"]
POLICIES = ("truncate", "drop", "error")
TOO_LONG = "longer_than_max_length"
CANNOT_CUT = "first_exchange_longer_than_max_length"
NO_TRAINED = "no_trained_tokens"
_PARALLEL_MIN = 512  # below this many conversations one process is faster than starting workers


@dataclass
class TokenizedMix:
    """Tokenized train (one Dataset) and validation (per dataset key), with stats and provenance."""

    train: object
    validation: dict[str, object]
    stats: dict
    parts: dict[str, dict[str, object]] = field(default_factory=dict)
    mix: Mix | None = None
    cache_path: Path | None = None
    from_cache: bool = False

    def train_sizes(self) -> dict[str, int]:
        """Training conversations per dataset key."""
        return {k: len(p["train"]) for k, p in self.parts.items()}

    def validation_size(self, key: str) -> int:
        """Validation conversations of one dataset key."""
        return len(self.parts[key]["validation"])


def default_cache_dir() -> Path:
    """``$OASST_PEFT_CACHE``, else ``$XDG_CACHE_HOME/oasst-peft``, else ``~/.cache/oasst-peft``."""
    if os.environ.get("OASST_PEFT_CACHE"):
        return Path(os.environ["OASST_PEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "oasst-peft"


def cache_key(mix: Mix, tokenizer, max_length: int, excess_length: str) -> str:
    """Digest naming the cache entry for this mix, tokenizer (with template) and length policy."""
    from oasst_peft.fingerprint import tokenizer_fingerprint

    text = json.dumps(
        {
            "version": CACHE_VERSION,
            "mix": mix.fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
            "excess_length": excess_length,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# ------------------------------------------------------------------ encoding one conversation


def encode(tokenizer, conv: list[dict], max_length: int, policy: str):
    """(reason | None, ids, mask, messages kept, truncated?, full length) for one conversation."""
    ids, mask = tokenize_with_mask(tokenizer, conv)
    full = len(ids)
    kept, cut = len(conv), False
    if full > max_length:
        if policy != "truncate":
            return (TOO_LONG if policy == "drop" else "error"), None, None, 0, False, full
        ends = [i + 1 for i, m in enumerate(conv[:-1]) if m["role"] == "assistant"]
        best = None
        lo, hi = 0, len(ends) - 1
        while lo <= hi:  # prefix lengths grow with the prefix: binary search the longest that fits
            mid = (lo + hi) // 2
            p_ids, p_mask = tokenize_with_mask(tokenizer, conv[: ends[mid]])
            if len(p_ids) <= max_length:
                best = (ends[mid], p_ids, p_mask)
                lo = mid + 1
            else:
                hi = mid - 1
        if best is None:
            return CANNOT_CUT, None, None, 0, False, full
        kept, ids, mask = best
        cut = True
    if not any(mask):
        return NO_TRAINED, None, None, 0, False, full
    return None, ids, mask, kept, cut, full


_WORK: dict = {}


def _encode_range(bounds: tuple[int, int]):
    tok, convs, max_length, policy = _WORK["args"]
    lo, hi = bounds
    ids_all: list[int] = []
    mask_all: list[int] = []
    lengths, kept, cut, reasons, fulls = [], [], [], [], []
    for conv in convs[lo:hi]:
        reason, ids, mask, n_msg, was_cut, full = encode(tok, conv, max_length, policy)
        reasons.append(reason)
        fulls.append(full)
        if reason is None:
            ids_all.extend(ids)
            mask_all.extend(mask)
            lengths.append(len(ids))
            kept.append(n_msg)
            cut.append(was_cut)
    return (
        np.asarray(ids_all, dtype=np.int32),
        np.asarray(mask_all, dtype=np.int8),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(kept, dtype=np.int32),
        np.asarray(cut, dtype=bool),
        reasons,
        fulls,
    )


def _default_procs(n: int, num_proc: int | None) -> int:
    if num_proc is not None:
        return max(1, num_proc)
    if n < _PARALLEL_MIN or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def encode_all(tokenizer, convs: list, max_length: int, policy: str, num_proc: int | None = None):
    """Encode many conversations, in worker processes (fork) when there are enough and cores allow."""
    procs = _default_procs(len(convs), num_proc)
    _WORK["args"] = (tokenizer, convs, max_length, policy)
    try:
        if procs <= 1 or len(convs) < 2:
            chunks = [_encode_range((0, len(convs)))]
        else:
            step = max(1, -(-len(convs) // (procs * 4)))
            ranges = [(i, min(i + step, len(convs))) for i in range(0, len(convs), step)]
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                with multiprocessing.get_context("fork").Pool(procs) as pool:
                    chunks = pool.map(_encode_range, ranges)
            finally:
                if old is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = old
    finally:
        _WORK.clear()
    return chunks


def _gather(chunks):
    """The workers' results joined: flat ids/masks, per kept row arrays, and per conversation reasons."""
    parts = list(zip(*chunks, strict=True)) if chunks else [[] for _ in range(7)]
    cat = [np.concatenate(p) if len(p) else np.zeros(0) for p in parts[:5]]
    ids, mask, lengths, kept, cut = cat
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    reasons = [r for c in parts[5] for r in c]
    fulls = [f for c in parts[6] for f in c]
    return (
        ids.astype(np.int32),
        mask.astype(np.int8),
        offsets,
        kept.astype(np.int32),
        cut.astype(bool),
        reasons,
        fulls,
    )


def _part_dataset(ids, mask, offsets, kept, cut, r0: int, r1: int, conv_index: np.ndarray):
    """Rows r0..r1 of the kept conversations as a Dataset (plus provenance columns)."""
    import pyarrow as pa
    from datasets import Dataset

    t0, t1 = offsets[r0], offsets[r1]
    offs = pa.array((offsets[r0 : r1 + 1] - t0).astype(np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offs, pa.array(ids[t0:t1])),
            "assistant_masks": pa.ListArray.from_arrays(offs, pa.array(mask[t0:t1])),
            "conv_index": pa.array(conv_index.astype(np.int32)),
            "n_messages": pa.array(kept[r0:r1]),
            "truncated": pa.array(cut[r0:r1]),
        }
    )
    return Dataset(table)


# ------------------------------------------------------------------ the mix


def _tokenize_parts(mix: Mix, tokenizer, max_length: int, policy: str, num_proc: int | None):
    flat: list = []
    spans: list[tuple[str, str, int, int]] = []
    for key, part in mix.parts.items():
        for split in SPLITS:
            convs = part.split(split)
            spans.append((key, split, len(flat), len(flat) + len(convs)))
            flat.extend(convs)
    chunks = encode_all(tokenizer, flat, max_length, policy, num_proc)
    ids, mask, offsets, kept, cut, reasons, fulls = _gather(chunks)
    if "error" in reasons:
        i = reasons.index("error")
        key, split, lo, _ = next(s for s in spans if s[2] <= i < s[3])
        raise OasstError(
            f"datasets: {key}: {split} conversation {i - lo} is {fulls[i]} tokens, over max_length "
            f"{max_length} (excess_length: error); raise max_length or set excess_length: truncate or drop"
        )
    parts: dict[str, dict[str, object]] = {}
    drops: dict[str, dict[str, Counter]] = {}
    row = 0
    for key, split, lo, hi in spans:
        index = np.asarray([i - lo for i in range(lo, hi) if reasons[i] is None], dtype=np.int32)
        parts.setdefault(key, {})[split] = _part_dataset(
            ids, mask, offsets, kept, cut, row, row + len(index), index
        )
        row += len(index)
        drops.setdefault(key, {})[split] = Counter(r for r in reasons[lo:hi] if r is not None)
    return parts, drops


def _assemble(parts: dict, stats: dict, mix, cache_path, from_cache) -> TokenizedMix:
    from datasets import concatenate_datasets

    train = concatenate_datasets([parts[k]["train"].select_columns(COLUMNS) for k in parts])
    validation = {
        k: p["validation"].select_columns(COLUMNS) for k, p in parts.items() if len(p["validation"]) > 0
    }
    return TokenizedMix(train, validation, stats, parts, mix, cache_path, from_cache)


def _check_not_emptied(parts: dict, drops: dict, mix: Mix, max_length: int, policy: str) -> None:
    for key, by_split in parts.items():
        if len(by_split["train"]) == 0 and mix.parts[key].train:
            why = ", ".join(f"{r}: {n}" for r, n in drops[key]["train"].most_common())
            fix = "use excess_length: truncate" if policy != "truncate" else "shorten the first exchanges"
            raise OasstError(
                f"datasets: {key}: tokenizing left no training conversation ({why}; max_length {max_length}, "
                f"excess_length: {policy}); raise max_length or {fix}"
            )


def _empty_part():
    """A zero-row part with the same columns."""
    none = np.zeros(0, dtype=np.int32)
    return _part_dataset(
        none, none.astype(np.int8), np.zeros(1, np.int64), none, none.astype(bool), 0, 0, none
    )


def _load_cached(entry: Path):
    from datasets import load_from_disk

    manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    parts = {}
    for i, key in enumerate(manifest["keys"]):
        parts[key] = {}
        for split in SPLITS:
            n = manifest["sizes"][key][split]
            ds = load_from_disk(str(entry / f"part-{i}-{split}")) if n else _empty_part()
            if len(ds) != n:
                raise ValueError(f"cache entry {entry} holds {len(ds)} rows for {key}/{split}, expected {n}")
            parts[key][split] = ds
    return parts, manifest["stats"]


def _save_cache(entry: Path, parts: dict, stats: dict) -> None:
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name[:12]}-", dir=entry.parent))
    bars_were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        for i, key in enumerate(parts):
            for split in SPLITS:
                if len(parts[key][split]):  # (datasets cannot load an empty saved dataset back)
                    parts[key][split].save_to_disk(str(tmp / f"part-{i}-{split}"))
        sizes = {k: {split: len(p[split]) for split in SPLITS} for k, p in parts.items()}
        manifest = {"version": CACHE_VERSION, "keys": list(parts), "sizes": sizes, "stats": stats}
        (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            enable_progress_bars()


def tokenize_mix(
    mix: Mix,
    tokenizer,
    max_length: int,
    excess_length: str = "truncate",
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    use_cache: bool = True,
) -> TokenizedMix:
    """Tokenize every conversation of ``mix`` (see the module docstring); reuse the cache when warm."""
    if excess_length not in POLICIES:
        raise OasstError(f"excess_length: '{excess_length}' is not one of {', '.join(POLICIES)}")
    if not tokenizer.chat_template:
        raise OasstError("the tokenizer has no chat template: call oasst_peft.template.setup_tokenizer first")
    if not use_cache:
        return _tokenize_and_store(None, mix, tokenizer, max_length, excess_length, num_proc)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = root / "tokenized" / cache_key(mix, tokenizer, max_length, excess_length)
    with contextlib.ExitStack() as held:
        try:  # one writer per entry: concurrent runs on the same mix wait, then reuse what the first stored
            held.enter_context(exclusive(root / "locks" / f"{entry.name}.lock"))
        except OSError as e:
            raise OasstError(
                f"cache_dir: cannot write the tokenized cache under {entry.parent} ({e.strerror or e}); "
                "set cache_dir to a writable folder"
            ) from None
        return _tokenize_and_store(entry, mix, tokenizer, max_length, excess_length, num_proc)


def _tokenize_and_store(entry, mix, tokenizer, max_length, excess_length, num_proc) -> TokenizedMix:
    if entry is not None and (entry / "manifest.json").is_file():
        try:
            parts, stats = _load_cached(entry)
            if list(parts) == list(mix.parts):
                return _assemble(parts, stats, mix, entry, True)
        except (OSError, ValueError, KeyError, FileNotFoundError):
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry is rebuilt
    parts, drops = _tokenize_parts(mix, tokenizer, max_length, excess_length, num_proc)
    _check_not_emptied(parts, drops, mix, max_length, excess_length)
    stats = build_stats(mix, parts, drops)
    if entry is not None:
        try:
            _save_cache(entry, parts, stats)
        except OSError as e:
            raise OasstError(
                f"cache_dir: cannot write the tokenized cache under {entry.parent} ({e.strerror or e}); "
                "set cache_dir to a writable folder"
            ) from None
        parts, stats = _load_cached(entry)  # memory-mapped from disk, like a warm start
    return _assemble(parts, stats, mix, entry, False)
