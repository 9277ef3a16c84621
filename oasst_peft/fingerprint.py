"""Run fingerprints: what a checkpoint was trained with, so ``--resume`` refuses to continue a different run.

A fingerprint hashes three things: the recipe (every key that shapes training, not paths, logging or
options that only add output), the tokenized training data (token ids and loss masks, in order) and the
tokenizer (vocabulary, added tokens, chat template). Beside them it records what the run decided on the
host that changes the batches or the maths: the batching (packing, length-grouped or random), the
attention implementation and the TRL version (``runtime``), and the number of processes with whether the
optimizer state is ZeRO-partitioned: only such a checkpoint must resume on as many ranks as wrote it. ``FingerprintCallback`` stores it in each checkpoint's
``trainer_state.json`` (under ``stateful_callbacks``, written in the same file the Trainer writes last);
``check_resume`` compares it with the current run and raises one clear line unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from oasst_peft.errors import OasstError

STATE_FILE = "trainer_state.json"
# Recipe keys that do not change what is trained: where things go, how often to log, eval or save.
BOOKKEEPING_KEYS = frozenset(
    {
        "output_dir",
        "log_dir",
        "report_to",
        "cache_dir",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "per_device_eval_batch_size",
        "sample_on_eval",  # adds generations to the eval log; training is the same
        "use_custom_sampler",  # accepted for OA recipes, changes nothing here
    }
)
# What the run decides on this host; compared only when both fingerprints carry the key.
RUNTIME_KEYS = ("trl", "batching", "attention")
DATA_COLUMNS = ("input_ids", "assistant_masks")


@dataclass(frozen=True)
class Fingerprint:
    """Digests of the recipe, training data and tokenizer, the process count, and the hashed recipe values."""

    recipe: str
    data: str
    tokenizer: str
    world_size: int = 1
    recipe_values: dict = field(default_factory=dict, compare=False)
    zero: bool = False
    runtime: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        return cls(
            recipe=str(d["recipe"]),
            data=str(d["data"]),
            tokenizer=str(d["tokenizer"]),
            world_size=int(d.get("world_size", 1)),
            recipe_values=dict(d.get("recipe_values") or {}),
            zero=bool(d.get("zero", False)),
            runtime=dict(d.get("runtime") or {}),
        )


def _digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def recipe_values(recipe, max_steps: int | None = None) -> dict:
    """The recipe's training-relevant values (bookkeeping keys dropped; ``max_steps`` as the run uses it)."""
    values = {k: v for k, v in recipe.to_dict().items() if k not in BOOKKEEPING_KEYS}
    if max_steps is not None:
        values["max_steps"] = max_steps
    return values


def recipe_fingerprint(recipe, max_steps: int | None = None) -> str:
    """Digest of ``recipe_values``."""
    text = json.dumps(recipe_values(recipe, max_steps), sort_keys=True, separators=(",", ":"), default=str)
    return _digest(text.encode("utf-8"))


def dataset_fingerprint(dataset) -> str:
    """Digest of a tokenized ``datasets.Dataset``'s token ids and loss masks, row by row in order."""
    import numpy as np
    import pyarrow.compute as pc

    h = hashlib.sha256()
    table = dataset.with_format("arrow")[:] if len(dataset) else None
    h.update(f"rows={len(dataset)}".encode())
    for name in DATA_COLUMNS:
        if table is None or name not in table.column_names:
            continue
        col = table.column(name).combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        h.update(name.encode())
        h.update(lengths.tobytes())
        h.update(values.tobytes())
    return "sha256:" + h.hexdigest()


def data_fingerprint(tokenized) -> str:
    """Digest of the training split of a tokenized mix (an object with ``.train``) or of one Dataset."""
    train = getattr(tokenized, "train", tokenized)
    return dataset_fingerprint(train)


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of the tokenizer's full definition, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
        "len": len(tokenizer),
    }
    return _digest(body.encode("utf-8") + json.dumps(extra, sort_keys=True).encode("utf-8"))


def trl_version() -> str:
    import trl

    return str(trl.__version__)


def compute(
    recipe, tokenizer, tokenized, max_steps: int | None = None, world_size: int = 1, zero: bool = False
) -> Fingerprint:
    """The fingerprint of a run about to train (``zero``: under DeepSpeed, optimizer states partitioned per rank).

    Its ``runtime`` holds the TRL version; ``with_batching`` adds what is decided once the model is loaded.
    """
    return Fingerprint(
        recipe=recipe_fingerprint(recipe, max_steps),
        data=data_fingerprint(tokenized),
        tokenizer=tokenizer_fingerprint(tokenizer),
        world_size=world_size,
        recipe_values=recipe_values(recipe, max_steps),
        zero=zero,
        runtime={"trl": trl_version()},
    )


def with_batching(fp: Fingerprint, batching: str, attention: str | None) -> Fingerprint:
    """``fp`` with the run's batching decision (``speed.Batching.name``) and attention implementation."""
    runtime = {**fp.runtime, "batching": batching, "attention": attention or "default"}
    return replace(fp, runtime=runtime)


class FingerprintCallback(TrainerCallback, ExportableState):
    """Stores the run's fingerprint in every checkpoint's ``trainer_state.json``."""

    def __init__(self, fingerprint: dict | None = None):
        self.fingerprint = fingerprint or {}

    def state(self) -> dict:
        return {"args": {"fingerprint": self.fingerprint}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A state restored from a checkpoint written without this callback has no slot for it.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        return control


def read_fingerprint(checkpoint: str | Path) -> Fingerprint | None:
    """The fingerprint stored in ``checkpoint``, or None when it has none."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = (state.get("stateful_callbacks") or {}).get(FingerprintCallback.__name__)
    if isinstance(entry, list):
        entry = entry[-1] if entry else None
    fp = ((entry or {}).get("args") or {}).get("fingerprint")
    if not fp:
        return None
    try:
        return Fingerprint.from_dict(fp)
    except (KeyError, TypeError, ValueError):
        return None


def _recipe_changes(old: dict, new: dict, limit: int = 3) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [
        f"{k}: {json.dumps(old.get(k), default=str)} -> {json.dumps(new.get(k), default=str)}" for k in keys
    ]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown[:limit]) + more


def differences(saved: Fingerprint, current: Fingerprint) -> list[str]:
    """What changed between the checkpoint's run and this one, one phrase each (empty: the same run)."""
    out = []
    if saved.recipe != current.recipe:
        changes = _recipe_changes(saved.recipe_values, current.recipe_values)
        out.append(f"the recipe changed ({changes})" if changes else "the recipe changed")
    if saved.data != current.data:
        out.append("the tokenized training data changed")
    if saved.tokenizer != current.tokenizer:
        out.append("the tokenizer changed")
    if saved.world_size != current.world_size and (saved.zero or current.zero):
        out.append(
            f"it was written by {saved.world_size} process(es), this run has {current.world_size} "
            "(a ZeRO checkpoint resumes on as many)"
        )
    return out + runtime_differences(saved, current)


def runtime_differences(saved: Fingerprint, current: Fingerprint) -> list[str]:
    """The host decisions that differ (batching, attention, TRL version), for keys both fingerprints carry."""
    names = {"trl": "the TRL version", "batching": "the batching", "attention": "the attention"}
    out = []
    for key in RUNTIME_KEYS:
        old, new = saved.runtime.get(key), current.runtime.get(key)
        if old is not None and new is not None and old != new:
            out.append(f"{names[key]} changed ({old} -> {new})")
    return out


def check_resume(
    checkpoint: str | Path, current: Fingerprint, force: bool = False, say=print, runtime_only: bool = False
) -> None:
    """Refuse to resume ``checkpoint`` when its fingerprint differs from ``current`` (``force``: warn and go on).

    ``runtime_only``: compare only the host decisions (the second check, once the model is loaded).
    """
    name = Path(checkpoint).name
    saved = read_fingerprint(checkpoint)
    if saved is None:
        if runtime_only:
            return
        problems = ["it holds no oasst-peft fingerprint (written by another tool or an older version)"]
    elif runtime_only:
        problems = runtime_differences(saved, current)
    else:
        problems = differences(saved, current)
    if not problems:
        return
    what = "; ".join(problems)
    if force:
        say(f"resume: {name}: {what}; resuming anyway (--force)")
        return
    raise OasstError(
        f"--resume: {name} cannot continue this run: {what}. Resume with the recipe, data, tokenizer and "
        "host setup it was trained with, or add --force to resume anyway"
    )
