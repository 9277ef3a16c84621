"""Writing one safetensors shard: the header from the planned shapes, then each tensor's bytes at its offset.

The main thread reserves each chunk's place in plan order (``reserve``); the bytes may then arrive from
any thread, in any order (``write_at``, ``copy_range``), since each lands at its own offset. ``close``
checks that every planned byte was written before it fsyncs. A shard of ``merge_tools.direct.MIN_BYTES``
or more is written with direct I/O where the filesystem allows it (``merge_tools.direct``); otherwise
through the page cache, with writeback to the disk started every ``WRITEBACK_BYTES`` so the final fsync
does not flush the whole shard at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from pathlib import Path

import torch

from merge_tools.direct import DirectFile
from merge_tools.errors import MergeError
from merge_tools.io import CHUNK_BYTES, TORCH_TO_ST, element_size, numel

WRITEBACK_BYTES = 64 * 2**20  # start the disk writing every this many bytes, not all at the final fsync
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_START_WRITEBACK = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to begin writing a file's dirty pages now (returns at once; ``fsync`` still makes it durable)."""
    if _START_WRITEBACK is not None:
        _START_WRITEBACK(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_EMPTY = torch.empty(0, dtype=torch.uint8)


def _as_bytes(chunk) -> memoryview:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(chunk).cast("B")


class SafetensorsWriter:
    """One safetensors file from a plan of ``(name, dtype, shape)``: places reserved in plan order, bytes written at them."""

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in plan:
            n = numel(shape) * element_size(dtype)
            header[name] = {
                "dtype": TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._sizes.append((name, n))
            offset += n
        self.total = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        head = struct.pack("<Q", len(raw)) + raw
        self._direct = DirectFile.open(self.path, len(head) + offset)
        if self._direct is not None:
            self._fd = self._direct.fd
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._closed = False
        self._next = len(head)  # the file offset of the next reserved byte
        self._end = len(head) + offset
        self._index = 0
        self._in_tensor = 0  # bytes of the current tensor reserved so far
        self._lock = threading.Lock()
        self._written = 0
        self._unflushed = 0
        self._pwrite(memoryview(head), 0)

    def reserve(self, n: int) -> int:
        """The file offset of the current tensor's next ``n`` bytes (plan order; refuses more than planned)."""
        while self._index < len(self._sizes) and self._sizes[self._index][1] == 0:
            self._index += 1
        if self._index >= len(self._sizes):
            raise RuntimeError(f"{self.path}: more data than planned")
        name, size = self._sizes[self._index]
        if self._in_tensor + n > size:
            raise RuntimeError(f"{self.path}: tensor {name} got more bytes than its planned shape")
        at = self._next
        self._next += n
        self._in_tensor += n
        if self._in_tensor == size:
            self._index += 1
            self._in_tensor = 0
        return at

    @property
    def direct(self) -> bool:
        """True while this shard is written with direct I/O."""
        return self._direct is not None and self._direct.direct

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if self._direct is not None:
            data = view if not view.readonly else bytearray(view)
            self._direct.write(torch.frombuffer(data, dtype=torch.uint8) if len(view) else _EMPTY, offset)
            return
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            e.filename = e.filename or str(self.path)
            raise

    def _count(self, n: int) -> None:
        with self._lock:
            self._written += n
            self._unflushed += n
            flush = self._unflushed >= WRITEBACK_BYTES
            if flush:
                self._unflushed = 0
        if flush and self._direct is None:
            start_writeback(self._fd)

    @property
    def casts(self) -> bool:
        """True when ``write_at`` can cast while it writes (direct I/O: straight into the write windows)."""
        return self._direct is not None

    def write_at(self, chunk, offset: int, dtype: torch.dtype | None = None) -> None:
        """``chunk``'s bytes (a tensor or a buffer) at ``offset``, a place ``reserve`` gave; any thread.

        ``dtype``: the tensor's values cast to it on the way (``casts``: without an extra copy).
        """
        if self._direct is not None and isinstance(chunk, torch.Tensor):
            data = chunk.detach().contiguous().reshape(-1)
            self._direct.write(data, offset, dtype)
            self._count(data.numel() * (dtype or data.dtype).itemsize)
            return
        if dtype is not None:
            chunk = chunk.to(dtype)
        view = _as_bytes(chunk)
        self._pwrite(view, offset)
        self._count(len(view))

    def write(self, chunk) -> None:
        """Append ``chunk``'s bytes to the current tensor (moves on to the next one when it is complete)."""
        view = _as_bytes(chunk)
        self.write_at(view, self.reserve(len(view)))

    def copy_range(self, path: Path, offset: int, n: int, at: int | None = None) -> None:
        """``n`` bytes of the file ``path`` from ``offset``, copied by the kernel to ``at`` (default: reserved now)."""
        at = self.reserve(n) if at is None else at
        src = os.open(path, os.O_RDONLY)
        try:
            if self._direct is not None:
                got = self._direct.read_into(src, offset, n, at)
                self._count(got)
                if got < n:
                    raise MergeError(f"{path}: file is truncated (tensor data ends early)")
                return
            done = 0
            while done < n:
                step = min(n - done, 1 << 30)
                try:
                    got = os.copy_file_range(src, self._fd, step, offset + done, at + done)
                except (AttributeError, OSError):  # another filesystem or an old kernel: copy through memory
                    got = len(data := os.pread(src, min(step, CHUNK_BYTES), offset + done))
                    self._pwrite(memoryview(data), at + done)
                if not got:
                    raise MergeError(f"{path}: file is truncated (tensor data ends early)")
                done += got
                self._count(got)
        finally:
            os.close(src)

    def abort(self) -> None:
        """Close without checks (the caller is unwinding an error)."""
        if not self._closed:
            self._closed = True
            if self._direct is not None:
                self._direct.abort()
            else:
                os.close(self._fd)

    def close(self) -> None:
        """Check every planned byte was written, then flush to disk."""
        complete = self._written == self.total and self._next == self._end
        if self._direct is not None and complete:
            try:
                self._direct.close()  # writes the last windows, cuts the padding, fsyncs
            finally:
                self.abort()
        else:
            os.fsync(self._fd)
            self.abort()
        if not complete:
            missing = next((name for name, size in self._sizes[self._index :] if size), None)
            what = f"tensor {missing}" if missing else f"{self.total - self._written} bytes"
            raise RuntimeError(f"{self.path}: {what} was not written completely")
