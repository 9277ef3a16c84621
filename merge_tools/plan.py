"""The merge plan: for every tensor of the base, what the merged checkpoint holds and how to compute it.

``build_plan`` matches the adapter to the base (one clear ``MergeError`` when shapes, target modules
or vocab do not fit), grows the vocab tensors for the added tokens, marks the 4-bit weights of a
QLoRA base, and returns ``TensorJob``s in checkpoint order; ``merge_tools.produce`` computes and
writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merge_tools.adapter import Adapter, LoraModule, WholeLayer
from merge_tools.base import TensorStore
from merge_tools.errors import MergeError
from merge_tools.io import element_size, numel
from merge_tools.names import NameResolver
from merge_tools.signature import first_mismatch


@dataclass
class TensorJob:
    """One output tensor and where its values come from."""

    name: str
    src_dtype: torch.dtype
    src_shape: tuple[int, ...]
    out_dtype: torch.dtype
    out_shape: tuple[int, ...]
    lora: LoraModule | None = None
    nf4: bool = False
    bias_add: torch.Tensor | None = None  # added to a bias (peft lora_bias)
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, rows) replacing whole rows
    layer: WholeLayer | None = None  # a whole tensor from the adapter (frozen copy or trained replacement)

    @property
    def out_bytes(self) -> int:
        return numel(self.out_shape) * element_size(self.out_dtype)

    @property
    def whole(self) -> bool:
        return self.lora is not None or self.nf4 or self.bias_add is not None

    @property
    def changed(self) -> bool:
        return (
            self.whole
            or self.tokens is not None
            or self.layer is not None
            or self.out_shape != self.src_shape
        )


@dataclass
class Plan:
    jobs: list[TensorJob]
    base_rows: int | None
    vocab_rows: int | None
    merged_modules: int = 0
    token_rows: int = 0
    nf4_weights: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)


def _tied(config: dict) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _out_dtype(src: torch.dtype, out: torch.dtype) -> torch.dtype:
    return out if src.is_floating_point else src


def build_plan(
    store: TensorStore,
    adapter: Adapter | None,
    out_dtype: torch.dtype,
    *,
    record: dict | None = None,
    nf4_modules: list[str] | None = None,
    base_label: str = "the base",
) -> Plan:
    """Every output tensor's job; raises ``MergeError`` when the adapter does not fit the base."""
    jobs = {
        n: TensorJob(n, *store.info(n), _out_dtype(store.info(n)[0], out_dtype), store.info(n)[1])
        for n in store.names()
    }
    plan = Plan(jobs=list(jobs.values()), base_rows=None, vocab_rows=None)
    find_tensor = NameResolver(store)
    if nf4_modules:
        for module in nf4_modules:
            key = find_tensor(f"{module}.weight")
            if key is not None and jobs[key].src_dtype.is_floating_point:
                jobs[key].nf4 = True
                plan.nf4_weights += 1
    if adapter is None:
        return plan
    hint = f"the adapter was not trained on {base_label}; pass --base with the base it was trained on"
    tied = _tied(store.config)

    # 1. LoRA modules: shapes must fit the base weights.
    for module, lm in adapter.modules.items():
        key = find_tensor(f"{module}.weight")
        if key is None:
            raise MergeError(f"adapter targets {module}, which {base_label} does not have; {hint}")
        job = jobs[key]
        w = job.src_shape
        if lm.embedding or adapter.fan_in_fan_out:  # stored (in_features, out_features)
            want = (int(lm.a_ref.shape[1]), int(lm.b_ref.shape[0]))
        else:
            want = (int(lm.b_ref.shape[0]), int(lm.a_ref.shape[1]))
        if tuple(w) != want:
            raise MergeError(
                f"adapter does not fit {base_label}: {key} is {tuple(w)} there but the adapter expects {want}; {hint}"
            )
        job.lora = lm
        plan.merged_modules += 1
        if lm.bias is not None:
            bkey = find_tensor(f"{module}.bias")
            if bkey is None:
                raise MergeError(
                    f"adapter trains a bias for {module} (lora_bias) but {base_label} has no {module}.bias"
                )
            jobs[bkey].bias_add = lm.bias.float() * lm.scale

    # 2. Whole tensors the adapter carries (resized embeddings, modules_to_save, trained biases).
    for name, layer in adapter.layers.items():
        key = find_tensor(name)
        if key is None:
            if tied and _is_output_name(name):
                continue  # the tied output embedding is the input embedding in the checkpoint
            raise MergeError(f"adapter carries {name}, which {base_label} does not have; {hint}")
        job = jobs[key]
        if tuple(layer.shape[1:]) != tuple(job.src_shape[1:]) or layer.shape[0] < job.src_shape[0]:
            raise MergeError(
                f"adapter does not fit {base_label}: {key} is {tuple(job.src_shape)} there but "
                f"{tuple(layer.shape)} in the adapter; {hint}"
            )
        job.layer = layer
        job.out_shape = tuple(layer.shape)

    # 3. Trained token rows.
    for module, (ids, rows) in adapter.token_rows.items():
        key = find_tensor(f"{module}.weight")
        if key is None:
            if tied and _is_output_name(module):
                continue
            raise MergeError(
                f"adapter trains token rows of {module}, which {base_label} does not have; {hint}"
            )
        job = jobs[key]
        if rows.shape[1:] != tuple(job.src_shape[1:]):
            raise MergeError(
                f"adapter does not fit {base_label}: {key} rows are {tuple(job.src_shape[1:])} wide there but "
                f"{tuple(rows.shape[1:])} in the adapter; {hint}"
            )
        job.tokens = (ids, rows)
        plan.token_rows += int(ids.numel())

    # 4. Vocab: the base's rows and the trained model's rows.
    vocab_jobs = [
        j for j in jobs.values() if j.tokens is not None or (j.layer is not None and j.layer.frozen)
    ]
    if vocab_jobs:
        plan.base_rows = vocab_jobs[0].src_shape[0]
    want_rows = int(record["vocab_rows"]) if record and record.get("vocab_rows") else None
    rec_base = int(record["base_vocab_rows"]) if record and record.get("base_vocab_rows") else None
    if rec_base is not None and plan.base_rows is not None and rec_base != plan.base_rows:
        raise MergeError(
            f"vocab mismatch: {base_label} has {plan.base_rows} embedding rows but training started from "
            f"{rec_base}; {hint}"
        )
    _check_signature(store, vocab_jobs, record, base_label, hint)
    if not vocab_jobs and want_rows is not None and rec_base is not None and want_rows > rec_base:
        raise MergeError(
            f"the vocab grew from {rec_base} to {want_rows} rows in training but the adapter stores neither the "
            "new rows (trainable_token_indices) nor the resized embedding; it cannot be merged"
        )
    if want_rows is None and vocab_jobs:
        rows = [j.out_shape[0] for j in vocab_jobs] + [
            int(j.tokens[0].max()) + 1 for j in vocab_jobs if j.tokens
        ]
        want_rows = max(rows)
    if want_rows is not None and plan.base_rows is not None:
        if want_rows < plan.base_rows:
            raise MergeError(
                f"vocab mismatch: {base_label} has {plan.base_rows} rows, more than the trained {want_rows}; {hint}"
            )
        plan.vocab_rows = want_rows
        if tied and len(vocab_jobs) == 1:
            out_key = _output_key(store, vocab_jobs[0].name)
            if out_key is not None:  # a tied checkpoint that stores both copies: keep them equal
                src = vocab_jobs[0]
                jobs[out_key].tokens, jobs[out_key].layer = src.tokens, src.layer
                vocab_jobs.append(jobs[out_key])
        if not tied:
            out_key = _output_key(store, vocab_jobs[0].name)
            if out_key is not None and jobs[out_key] not in vocab_jobs and want_rows > plan.base_rows:
                raise MergeError(
                    f"the vocab grew from {plan.base_rows} to {want_rows} rows but the adapter stores no rows of "
                    f"{out_key}; the adapter is incomplete (train with train_new_tokens)"
                )
        for job in vocab_jobs:
            if job.src_shape[0] != plan.base_rows:
                raise MergeError(
                    f"vocab mismatch: {job.name} has {job.src_shape[0]} rows, not {plan.base_rows}; {hint}"
                )
            job.out_shape = (want_rows, *job.src_shape[1:])
            if job.layer is not None and job.layer.shape[0] != want_rows:
                raise MergeError(
                    f"vocab mismatch: the adapter's {job.name} has {job.layer.shape[0]} rows, the run "
                    f"recorded {want_rows}; the adapter files are inconsistent"
                )
            if job.tokens is not None and int(job.tokens[0].max()) >= want_rows:
                raise MergeError(
                    f"adapter trains token id {int(job.tokens[0].max())} of {job.name}, beyond {want_rows} rows"
                )
            covered = set(job.tokens[0].tolist()) if job.tokens is not None else set()
            missing = [r for r in range(plan.base_rows, want_rows) if r not in covered]
            if missing and job.layer is None:
                raise MergeError(
                    f"rows {missing[0]}..{missing[-1]} of {job.name} were added in training but the adapter stores "
                    "neither them (trainable_token_indices) nor the resized layer; it cannot be merged exactly"
                )
    return plan


def _check_signature(
    store: TensorStore, vocab_jobs: list[TensorJob], record, base_label: str, hint: str
) -> None:
    """The base's input embedding must be the one training started from (the run record's signature)."""
    saved = (record or {}).get("base_signature")
    inputs = [j for j in vocab_jobs if not _is_output_name(j.name)]
    if not saved or not inputs:
        return
    row = first_mismatch(saved, lambda a, b: store.read_rows(inputs[0].name, a, b))
    if row is not None:
        raise MergeError(
            f"{inputs[0].name} of {base_label} differs from the base the adapter was trained on (row {row}); {hint}"
        )


def _is_output_name(name: str) -> bool:
    return name.split(".")[-1] in ("lm_head", "embed_out", "output") or any(
        p in name for p in ("lm_head", "embed_out")
    )


def _output_key(store: TensorStore, input_key: str) -> str | None:
    """The output embedding of a checkpoint: a 2-D tensor with the input embedding's shape and an lm_head-like name."""
    shape = store.info(input_key)[1]
    hits = [n for n in store.names() if n != input_key and store.info(n)[1] == shape and _is_output_name(n)]
    return hits[0] if len(hits) == 1 else None
