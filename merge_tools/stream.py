"""Merging at disk speed: reused buffers, a fused LoRA row kernel and a writer thread that overlaps disk and math.

Profiling a 1.1B merge (cProfile, 4-layer copy of the benchmark model) showed where the time went
beyond the copy's: fresh tensors for every chunk (each one page-faulted in by the kernel: the rank-64
``B @ A`` ran at a third of its speed into new memory), three passes per chunk (``B @ A``, ``* scale``,
``W +``), and a single thread doing math, page-cache writes and a final ``fsync`` one after the other,
so the disk sat idle while the CPU worked and the CPU while the disk flushed.

Here the main thread computes into a ``BufferPool`` (a few fixed chunk buffers, handed back by the
writer thread once their bytes are written) with one ``addmm_`` per row block, while ``ShardPipeline``'s
thread writes them, asks the kernel to start writeback as it goes, copies unchanged tensors file to file
(``os.copy_file_range``, no user-space copy), and closes (fsyncs) each shard while the next is computed.
The values are those of ``merge_tools.lora.merge_linear``: float32 math, one cast to the output dtype.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.io import CHUNK_BYTES, SafetensorsWriter, human, shard_names

POOL_BUFFERS = 4  # chunks in flight: one computed, up to three queued or being written


@dataclass(frozen=True)
class FileRange:
    """``n`` bytes of ``path`` from ``offset``: an unchanged tensor, copied by the kernel."""

    path: Path
    offset: int
    n: int


class BufferPool:
    """Fixed chunk buffers lent to the producer and returned by the writer; plus per-key scratch buffers."""

    def __init__(self, count: int = POOL_BUFFERS, nbytes: int = CHUNK_BYTES):
        self.nbytes = nbytes
        self._count = count
        self._made: dict[int, torch.Tensor] = {}
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._scratch: dict[str, torch.Tensor] = {}
        self.failed: Callable[[], BaseException | None] = lambda: None

    def take(self, n: int) -> torch.Tensor:
        """A uint8 buffer of ``n`` bytes, owned by the caller until ``give_back`` (blocks while all are lent)."""
        if n > self.nbytes:
            return torch.empty(n, dtype=torch.uint8)
        if len(self._made) < self._count and self._free.empty():
            buf = torch.empty(self.nbytes, dtype=torch.uint8)
            self._made[buf.data_ptr()] = buf
            return buf[:n]
        while True:
            try:
                return self._free.get(timeout=0.2)[:n]
            except queue.Empty:
                err = self.failed()
                if err is not None:
                    raise err from None

    def give_back(self, chunk: torch.Tensor) -> None:
        buf = self._made.get(chunk.untyped_storage().data_ptr())
        if buf is not None:
            self._free.put(buf)

    def scratch(self, key: str, n: int) -> torch.Tensor:
        """A uint8 buffer of ``n`` bytes kept for the producer's own reuse (never lent to the writer)."""
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(max(n, self.nbytes), dtype=torch.uint8)
        return buf[:n]


def lora_rows_into(
    pool: BufferPool, f, job, A: torch.Tensor, B: torch.Tensor, a: int, b: int
) -> torch.Tensor:
    """Rows ``a:b`` of ``W + scale * B @ A`` (DoRA-normalised when the module has a magnitude), cast once.

    ``f`` is the base's ``SafetensorsFile``; returns a pooled tensor the writer gives back.
    """
    lm = job.lora
    n, cols = b - a, job.src_shape[1]
    w = pool.scratch("w32", n * cols * 4).view(torch.float32).view(n, cols)
    if job.src_dtype == torch.float32:
        f.read_rows_into(job.name, a, b, w)
    else:
        raw = pool.scratch("src", n * cols * job.src_dtype.itemsize).view(job.src_dtype).view(n, cols)
        f.read_rows_into(job.name, a, b, raw)
        w.copy_(raw)
    w.addmm_(B[a:b], A, alpha=lm.scale)
    if lm.magnitude is not None:
        w.mul_((lm.magnitude[a:b].float() / torch.linalg.norm(w, dim=1)).view(-1, 1))
    out = pool.take(n * cols * job.out_dtype.itemsize).view(job.out_dtype).view(n, cols)
    out.copy_(w)
    return out


class ShardPipeline:
    """A writer thread: chunks and file ranges go to their shard's ``SafetensorsWriter``; shards close in order."""

    def __init__(self, pool: BufferPool, depth: int = POOL_BUFFERS - 1):
        self.pool = pool
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._done: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._open: list[SafetensorsWriter] = []
        pool.failed = lambda: self.error
        self._thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread raises it
            op, writer, payload = item
            try:
                if op == "chunk":
                    writer.write(payload)
                    self.pool.give_back(payload)
                elif op == "range":
                    writer.copy_range(payload.path, payload.offset, payload.n)
                else:
                    writer.close()
                    self._done.put(writer)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _put(self, item) -> None:
        while True:
            self._raise()
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def open(self, path: Path, plan) -> SafetensorsWriter:
        writer = SafetensorsWriter(path, plan)
        writer.plan = plan
        self._open.append(writer)
        return writer

    def submit(self, writer: SafetensorsWriter, chunk) -> None:
        if isinstance(chunk, FileRange):
            self._put(("range", writer, chunk))
        else:
            self._put(("chunk", writer, chunk))

    def close(self, writer: SafetensorsWriter) -> None:
        self._put(("close", writer, None))

    def closed(self) -> list[SafetensorsWriter]:
        """Shards whose close (fsync) finished since the last call, in order."""
        got = []
        while True:
            try:
                got.append(self._done.get_nowait())
            except queue.Empty:
                return got

    def finish(self) -> None:
        """Wait until every queued write and close is done; raise the writer thread's error if it had one."""
        self._put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the thread (queued work is dropped) and close every open file unchecked."""
        if self.error is None:
            self.error = RuntimeError("merge aborted")
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(timeout=30)
        for w in self._open:
            w.abort()


def write_jobs(jobs: list, folder, max_bytes: int, chunks, say=None) -> tuple[dict[str, str], int]:
    """Group ``jobs`` into shards of at most ``max_bytes`` and write them; ``chunks(job, pool)`` yields each one's bytes.

    Returns (weight_map, total bytes). Every shard is fsynced before this returns; on any error (or
    Ctrl-C) the writer thread is stopped and the files are closed unchecked.
    """
    groups: list[list] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.out_bytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.out_bytes
    weight_map: dict[str, str] = {}
    total = 0
    pool = BufferPool()
    pipe = ShardPipeline(pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(math_threads(threads))

    def report_closed() -> None:
        for w in pipe.closed():
            if say is not None:
                say(f"wrote {w.path.name} ({len(w.plan)} tensors, {human(w.total)})")

    try:
        for fname, group in zip(shard_names(len(groups)), groups, strict=True):
            writer = pipe.open(Path(folder) / fname, [(j.name, j.out_dtype, j.out_shape) for j in group])
            for job in group:
                for chunk in chunks(job, pool):
                    pipe.submit(writer, chunk)
                weight_map[job.name] = fname
            pipe.close(writer)
            total += writer.total
            report_closed()
        pipe.finish()
    except BaseException:
        pipe.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    report_closed()
    return weight_map, total


def math_threads(threads: int) -> int:
    """Threads for the merge math: all but one core, which the writer thread keeps busy with I/O.

    Measured on the 2-core machine (4-layer copy of the benchmark model, under load): one math thread used
    1.85 s of CPU and 7-8 s wall, two used 3.0 s and 11-17 s (the second spun waiting for the busy core).
    """
    return max(1, min(threads, os.cpu_count() or 1) - 1)
