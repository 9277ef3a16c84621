"""Merging at disk speed: LoRA row blocks computed and written by every core, each at its own file offset.

Profiling the 1.1B merge of ``benchmarks/merge.py`` (perf, cProfile) showed where the time went beyond
the copy's. One thread did all the math (``B @ A``, two dtype casts) while another did every write, so
each waited on the other. The kernel's copy into the page cache (``write``) cost as much CPU as the
``B @ A`` itself. And 16 MB blocks made every pass over a block stream through main memory, while 1 MiB
blocks meant so many small torch calls that handing the GIL between threads (futex wake-ups) cost more
than the casts: 4 MiB was fastest (2.1 s against 3.1 s at 1 MiB and 2.6 s at 8 MiB, same machine).

Here the main thread only plans: it walks the tensors in shard order and reserves each chunk's place
in its shard (``SafetensorsWriter.reserve``). Worker threads, one per core, each with torch's
intra-op threads set to 1, take the chunks in turn. For a LoRA row block (``RowBlock``, 4 MiB of
float32, which stays in the CPU's cache from the read to the write) a worker reads the base
rows, runs one ``addmm_`` and one cast, and writes the block at its offset. A large shard is written
with direct I/O (``merge_tools.direct``): the cast goes straight into its write windows, and unchanged
tensors are read into them from the base file. A small one goes through the page cache, with
unchanged tensors copied file to file by the kernel (``os.copy_file_range``). A closer thread fsyncs
each shard as soon as its last chunk is written, while the next shard is computed. The values are
those of ``merge_tools.lora.merge_linear``: float32 math, one cast to the output dtype.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.errors import MergeError
from merge_tools.io import human, shard_names
from merge_tools.writer import SafetensorsWriter

TILE_BYTES = 2**22  # float32 bytes of one LoRA row block (measured: see the module doc)
MAX_WORKERS = 8


@dataclass(frozen=True)
class FileRange:
    """``n`` bytes of ``path`` from ``offset``: an unchanged tensor, copied by the kernel."""

    path: Path
    offset: int
    n: int


class Scratch:
    """One worker's reusable buffers, by name: no fresh (page-faulted) memory per block."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = n * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(max(nbytes, TILE_BYTES), dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


def tile_rows(cols: int) -> int:
    """Rows of a LoRA row block for a weight of ``cols`` columns."""
    return max(1, TILE_BYTES // max(1, cols * 4))


@dataclass(frozen=True)
class RowBlock:
    """Rows ``a:b`` of ``W + scale * B @ A`` (DoRA-normalised when the module has a magnitude), computed by a worker.

    ``f`` is the base's ``SafetensorsFile``, ``job`` the tensor's plan entry (``merge_tools.plan.TensorJob``).
    """

    f: object
    job: object
    A: torch.Tensor
    B: torch.Tensor
    a: int
    b: int

    @property
    def nbytes(self) -> int:
        return (self.b - self.a) * self.job.src_shape[1] * self.job.out_dtype.itemsize

    def compute(self, scratch: Scratch) -> torch.Tensor:
        """The block in the output dtype, in ``scratch`` (valid until the worker's next block)."""
        w = self.merged32(scratch)
        if self.job.out_dtype == torch.float32:
            return w
        out = scratch.get("out", w.numel(), self.job.out_dtype).view(w.shape)
        out.copy_(w)
        return out

    def merged32(self, scratch: Scratch) -> torch.Tensor:
        """The block in float32, before the one cast to the output dtype, in ``scratch``."""
        job, lm = self.job, self.job.lora
        n, cols = self.b - self.a, job.src_shape[1]
        w = scratch.get("w32", n * cols, torch.float32).view(n, cols)
        if job.src_dtype == torch.float32:
            self.f.read_rows_into(job.name, self.a, self.b, w)
        else:
            raw = scratch.get("src", n * cols, job.src_dtype).view(n, cols)
            self.f.read_rows_into(job.name, self.a, self.b, raw)
            w.copy_(raw)
        w.addmm_(self.B[self.a : self.b], self.A, alpha=lm.scale)
        if lm.magnitude is not None:
            w.mul_((lm.magnitude[self.a : self.b].float() / torch.linalg.norm(w, dim=1)).view(-1, 1))
        return w


def workers() -> int:
    """Worker threads: one per core this process may use, up to ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class ShardPipeline:
    """Worker threads write chunks at the places the main thread reserved; a closer thread fsyncs shards in order."""

    def __init__(self, n_workers: int | None = None):
        n = n_workers or workers()
        self._q: queue.Queue = queue.Queue(maxsize=n + 2)  # bounds the memory of queued tensor chunks
        self._closing: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._pending: dict[int, int] = {}  # id(writer) -> chunks queued or being written
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._open: list[SafetensorsWriter] = []
        self._workers = [
            threading.Thread(target=self._work, name=f"merge-worker-{i}", daemon=True) for i in range(n)
        ]
        self._closer = threading.Thread(target=self._close_in_order, name="merge-closer", daemon=True)
        for t in (*self._workers, self._closer):
            t.start()

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = e
            self._cond.notify_all()

    def _work(self) -> None:
        scratch = Scratch()
        while True:
            item = self._q.get()
            if item is None:
                return
            op, writer, at, payload = item
            try:
                if self.error is None:
                    if op == "block" and writer.casts:  # cast on the way into the write windows
                        writer.write_at(payload.merged32(scratch), at, dtype=payload.job.out_dtype)
                    elif op == "block":
                        writer.write_at(payload.compute(scratch), at)
                    elif op == "range":
                        writer.copy_range(payload.path, payload.offset, payload.n, at=at)
                    else:
                        writer.write_at(payload, at)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._fail(e)
            finally:
                with self._cond:
                    self._pending[id(writer)] -= 1
                    if not self._pending[id(writer)]:  # only the closer waits, and only for zero
                        self._cond.notify_all()

    def _close_in_order(self) -> None:
        while True:
            writer = self._closing.get()
            if writer is None:
                return
            with self._cond:
                self._cond.wait_for(lambda w=writer: self._pending[id(w)] == 0 or self.error is not None)
            if self.error is not None:
                continue
            try:
                writer.close()
                self._done.put(writer)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._fail(e)

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
        self._pending[id(writer)] = 0
        return writer

    def submit(self, writer: SafetensorsWriter, chunk) -> None:
        """Reserve ``chunk``'s place now (plan order) and queue its writing: a ``RowBlock``, ``FileRange`` or tensor."""
        if isinstance(chunk, RowBlock):
            op, n = "block", chunk.nbytes
        elif isinstance(chunk, FileRange):
            op, n = "range", chunk.n
        else:
            op, n = "chunk", chunk.numel() * chunk.element_size()
        at = writer.reserve(n)
        with self._cond:
            self._pending[id(writer)] += 1
        try:
            self._put((op, writer, at, chunk))
        except BaseException:
            with self._cond:
                self._pending[id(writer)] -= 1
            raise

    def close(self, writer: SafetensorsWriter) -> None:
        """fsync and close ``writer`` once its queued chunks are written (in the closer thread)."""
        self._raise()
        self._closing.put(writer)

    def closed(self) -> list[SafetensorsWriter]:
        """Shards whose close (fsync) finished since the last call, in order."""
        got = []
        while True:
            try:
                got.append(self._done.get_nowait())
            except queue.Empty:
                return got

    def finish(self) -> None:
        """Wait until every queued write and close is done; raise a worker's error if one had one."""
        for _ in self._workers:
            self._put(None)
        for t in self._workers:
            t.join()
        self._closing.put(None)
        self._closer.join()
        self._raise()

    def abort(self) -> None:
        """Stop the threads (queued work is dropped) and close every open file unchecked."""
        self._fail(RuntimeError("merge aborted"))
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with self._cond:
                    self._pending[id(item[1])] -= 1
        for _ in self._workers:
            with contextlib.suppress(queue.Full):
                self._q.put_nowait(None)
        self._closing.put(None)
        for t in (*self._workers, self._closer):
            t.join(timeout=30)
        for w in self._open:
            w.abort()


def _one_line(e: OSError, folder) -> MergeError:
    where = Path(e.filename).name if e.filename else str(folder)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MergeError(
            f"{e.strerror} while writing {where}: free space on the disk of {Path(folder).parent} or pass "
            "--out on another disk; nothing was written to the output folder"
        )
    return MergeError(f"{e.filename or folder}: {e.strerror or e}")


def write_jobs(jobs: list, folder, max_bytes: int, chunks, say=None) -> tuple[dict[str, str], int]:
    """Group ``jobs`` into shards of at most ``max_bytes`` and write them; ``chunks(job)`` yields each one's pieces.

    Returns (weight_map, total bytes). Every shard is fsynced before this returns; on any error (or
    Ctrl-C) the threads are stopped and the files are closed unchecked.
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel across blocks, one core each: no intra-op thread spinning
    pipe = ShardPipeline()

    def report_closed() -> None:
        for w in pipe.closed():
            if say is not None:
                say(f"wrote {w.path.name} ({len(w.plan)} tensors, {human(w.total)})")

    try:
        for fname, group in zip(shard_names(len(groups)), groups, strict=True):
            writer = pipe.open(Path(folder) / fname, [(j.name, j.out_dtype, j.out_shape) for j in group])
            for job in group:
                for chunk in chunks(job):
                    pipe.submit(writer, chunk)
                weight_map[job.name] = fname
            pipe.close(writer)
            total += writer.total
            report_closed()
        pipe.finish()
    except OSError as e:
        pipe.abort()
        raise _one_line(e, folder) from None
    except BaseException:
        pipe.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    report_closed()
    return weight_map, total
