"""The merged tensors' bytes: each ``TensorJob`` of the plan as chunks, and the shards they are written to.

``produce(job)`` yields a tensor in chunks (row ranges for copies and vocab tensors, row blocks for
LoRA-adapted linears, whole for the rest), so no more than one weight matrix is held at a time;
``write_shards`` hands them to ``merge_tools.stream``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from merge_tools.base import ShardedStore, TensorStore
from merge_tools.errors import MergeError
from merge_tools.io import CHUNK_BYTES, element_size, numel
from merge_tools.lora import merge_embedding, merge_linear, nf4_roundtrip, set_rows
from merge_tools.plan import TensorJob
from merge_tools.qlora import NF4Settings
from merge_tools.stream import FileRange, RowBlock, tile_rows, write_jobs


def _row_chunks(n_rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, row_elems * 4))
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def produce(
    job: TensorJob,
    store: TensorStore,
    *,
    nf4: NF4Settings | None = None,
    fan_in_fan_out: bool = False,
    pipelined: bool = False,
) -> Iterator[torch.Tensor | FileRange | RowBlock]:
    """The merged tensor, as chunks whose bytes concatenate to the output tensor.

    ``pipelined`` (``write_shards``): LoRA row blocks come as ``RowBlock``s for the writer's workers to
    compute, and unchanged tensors of a safetensors base as ``FileRange``s to copy file to file.
    """
    if job.whole and _by_rows(job, fan_in_fan_out):
        yield from _lora_rows(job, store, pipelined)
        return
    if job.whole:
        yield _whole(job, store, nf4, fan_in_fan_out).to(job.out_dtype)
        return
    if not job.changed:
        if pipelined and job.src_dtype == job.out_dtype and isinstance(store, ShardedStore):
            f = store.file_of(job.name)
            info = f.tensors[job.name]
            yield FileRange(f.path, info.start, info.nbytes)
            return
        yield from _copy(job, store)
        return
    row_elems = numel(job.out_shape[1:])
    base_rows = job.src_shape[0]
    for a, b in _row_chunks(job.out_shape[0], row_elems):
        chunk = _rows(job, store, a, b, base_rows)
        if job.tokens is not None:
            chunk = set_rows(chunk, job.tokens[0], job.tokens[1], first_row=a)
        yield chunk.to(job.out_dtype)


def _by_rows(job: TensorJob, fan_in_fan_out: bool) -> bool:
    """A plain LoRA/DoRA linear merges row block by row block (each output row needs only its own B rows)."""
    lm = job.lora
    return (
        lm is not None
        and not lm.embedding
        and not job.nf4
        and not fan_in_fan_out
        and job.bias_add is None
        and job.tokens is None
        and job.out_shape == job.src_shape
        and len(job.src_shape) == 2
    )


def _lora_rows(job: TensorJob, store: TensorStore, pipelined: bool) -> Iterator[torch.Tensor | RowBlock]:
    lm = job.lora
    A, B = lm.A.float(), lm.B.float()
    if pipelined and isinstance(store, ShardedStore) and job.src_dtype.is_floating_point:
        f = store.file_of(job.name)
        rows, step = job.src_shape[0], tile_rows(job.src_shape[1])
        for a in range(0, rows, step):
            yield RowBlock(f, job, A, B, a, min(rows, a + step))
        return
    for a, b in _row_chunks(job.src_shape[0], job.src_shape[1]):
        magnitude = lm.magnitude[a:b] if lm.magnitude is not None else None
        W = store.read_rows(job.name, a, b)
        yield merge_linear(W, A, B[a:b], lm.scale, magnitude=magnitude).to(job.out_dtype)


def _copy(job: TensorJob, store: TensorStore) -> Iterator[torch.Tensor]:
    if job.src_dtype == job.out_dtype and isinstance(store, ShardedStore):
        f = store.file_of(job.name)
        info = f.tensors[job.name]
        for off in range(info.start, info.end, CHUNK_BYTES):
            yield f.read_bytes(off, min(CHUNK_BYTES, info.end - off))
        return
    if len(job.src_shape) == 0:
        yield store.read(job.name).to(job.out_dtype)
        return
    for a, b in _row_chunks(job.src_shape[0], numel(job.src_shape[1:])):
        yield store.read_rows(job.name, a, b).to(job.out_dtype)


def _rows(job: TensorJob, store: TensorStore, a: int, b: int, base_rows: int) -> torch.Tensor:
    layer = job.layer
    if layer is not None and not layer.frozen:
        return layer.ref.rows(a, b).float()
    parts = []
    if a < base_rows:
        base = store.read_rows(job.name, a, min(b, base_rows))
        if layer is not None:
            _check_frozen(job.name, base, layer.ref.rows(a, min(b, base_rows)), a)
        parts.append(base.float())
    if b > base_rows:
        lo = max(a, base_rows)
        if layer is not None:
            parts.append(layer.ref.rows(lo, b).float())
        else:  # every such row is replaced by a trained token row (checked in build_plan)
            parts.append(torch.zeros((b - lo, *job.src_shape[1:]), dtype=torch.float32))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _check_frozen(name: str, base: torch.Tensor, saved: torch.Tensor, first: int) -> None:
    """The adapter's copy of a resized base layer must hold the base's own rows: else it is another base."""
    if saved.dtype != base.dtype:
        lower = saved.dtype if element_size(saved.dtype) <= element_size(base.dtype) else base.dtype
        same = torch.equal(base.to(lower), saved.to(lower))
    else:
        same = torch.equal(base, saved)
    if not same:
        diff = (
            (base.float() - saved.float()).abs().amax(dim=tuple(range(1, base.dim())))
            if base.dim() > 1
            else None
        )
        row = first + int(torch.nonzero(diff > 0)[0]) if diff is not None and (diff > 0).any() else first
        raise MergeError(
            f"the adapter's copy of {name} differs from the base at row {row}: the adapter was trained on another "
            "base; pass --base with the base it was trained on"
        )


def _whole(job: TensorJob, store: TensorStore, nf4: NF4Settings | None, fan_in_fan_out: bool) -> torch.Tensor:
    W = store.read(job.name)
    if job.nf4:
        s = nf4 or NF4Settings()
        W = nf4_roundtrip(
            W, dtype=s.dtype, quant_type=s.quant_type, double_quant=s.double_quant, blocksize=s.blocksize
        )
    else:
        W = W.float()
    if job.bias_add is not None:
        W = W + job.bias_add
    lm = job.lora
    if lm is not None:
        if lm.embedding:
            if job.out_shape[0] > job.src_shape[0]:
                raise MergeError(
                    f"LoRA on the resized embedding {job.name} cannot be merged; train token rows instead"
                )
            W = merge_embedding(W, lm.A, lm.B, lm.scale)
        else:
            W = merge_linear(W, lm.A, lm.B, lm.scale, fan_in_fan_out=fan_in_fan_out, magnitude=lm.magnitude)
    if job.tokens is not None:
        W = set_rows(W, job.tokens[0], job.tokens[1])
    return W


def write_shards(
    jobs: list[TensorJob], folder, max_bytes: int, store: TensorStore, say=None, **produce_kwargs
) -> tuple[dict[str, str], int]:
    """Write the jobs as HF safetensors shards (``model-0000i-of-0000n``) in ``folder``; returns (weight_map, bytes)."""

    def chunks(job: TensorJob):
        return produce(job, store, pipelined=True, **produce_kwargs)

    return write_jobs(jobs, folder, max_bytes, chunks, say=say)
