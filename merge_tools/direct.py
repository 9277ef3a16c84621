"""Writing a large file with direct I/O: bytes gathered in aligned windows, each sent from memory to the disk.

A buffered ``write`` copies every byte into freshly allocated page-cache pages. Profiling the 1.1B merge
of ``benchmarks/merge.py`` (perf) showed that copy as the largest single cost, larger than ``B @ A``, and
two workers writing one file spinning on its inode lock. With ``O_DIRECT`` the disk reads the bytes
from this process's buffers instead, and the merged model does not push the rest out of the page cache.

``O_DIRECT`` wants file offsets, lengths and memory aligned to the disk's blocks, while tensors start
anywhere. So the file is cut into ``WINDOW_BYTES`` windows (page-aligned anonymous maps, reused). Any
thread copies a chunk's bytes into the windows it covers, at any offset, in any order; a window whose
bytes are all in goes to this file's I/O thread, which writes it. The last window is padded to the
block size and the file is cut back to its size on ``close``, which then fsyncs.

Where the filesystem refuses ``O_DIRECT`` (tmpfs, some FUSE and network filesystems), ``DirectFile.open``
returns None and the caller writes through the page cache; if a direct write itself is refused, the
file drops ``O_DIRECT`` and goes on with the same windows. ``OASST_PEFT_DIRECT_IO=0`` turns direct I/O
off (for a filesystem that accepts it but is slow with it).
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import torch

WINDOW_BYTES = 4 * 2**20  # one direct write (a multiple of ALIGN)
ALIGN = 4096  # the largest logical block size in common use: 512-byte disks accept it too
QUEUED_WINDOWS = 4  # complete windows waiting for the disk: the memory bound when the disk is slower
MIN_BYTES = 64 * 2**20  # smaller files go through the page cache: a thread per file is not worth it
OFF_ENV = "OASST_PEFT_DIRECT_IO"  # "0": every file through the page cache


class _Window:
    __slots__ = ("buf", "filled", "length", "start", "tensor")

    def __init__(self, buf: mmap.mmap, start: int, length: int):
        self.buf, self.start, self.length, self.filled = buf, start, length, 0
        self.tensor = torch.frombuffer(buf, dtype=torch.uint8)


class DirectFile:
    """A file of known ``size`` written with ``O_DIRECT`` through aligned windows; ``write`` and ``read_into`` from any thread."""

    @classmethod
    def open(cls, path, size: int) -> DirectFile | None:
        """The file created for direct writes, or None where this platform or filesystem has no ``O_DIRECT``."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or size < MIN_BYTES or os.environ.get(OFF_ENV, "").strip() == "0":
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        return cls(fd, size, path)

    def __init__(self, fd: int, size: int, path=None):
        self.fd, self.size, self.path = fd, size, path
        self.direct = True
        self._windows: dict[int, _Window] = {}
        self._complete: set[int] = set()  # windows handed to the I/O thread
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._full: queue.Queue = queue.Queue(maxsize=QUEUED_WINDOWS)
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._write_windows, name="direct-io", daemon=True)
        self._thread.start()

    # -- filling windows (any thread) --

    def _window(self, i: int) -> _Window:
        with self._lock:
            w = self._windows.get(i)
            if w is None:
                buf = self._free.pop() if self._free else mmap.mmap(-1, WINDOW_BYTES)
                start = i * WINDOW_BYTES
                w = self._windows[i] = _Window(buf, start, min(WINDOW_BYTES, self.size - start))
            return w

    def _added(self, w: _Window, n: int) -> None:
        with self._lock:
            w.filled += n
            full = w.filled == w.length
            if full:
                del self._windows[w.start // WINDOW_BYTES]
                self._complete.add(w.start // WINDOW_BYTES)
        if full:
            while True:  # wait for room, unless the I/O thread has failed (it would never make room)
                self._raise()
                try:
                    self._full.put(w, timeout=0.2)
                    return
                except queue.Full:
                    continue

    def _pieces(self, offset: int, n: int):
        """(window, offset in it, offset in the data, length) for ``n`` bytes at file ``offset``."""
        if offset < 0 or offset + n > self.size:
            raise RuntimeError(
                f"direct write of {n} bytes at {offset} is outside the file's {self.size} bytes"
            )
        done = 0
        while done < n:
            at = offset + done
            i, inner = divmod(at, WINDOW_BYTES)
            step = min(n - done, WINDOW_BYTES - inner)
            yield self._window(i), inner, done, step
            done += step

    def write(self, data: torch.Tensor, offset: int, dtype: torch.dtype | None = None) -> None:
        """The 1-D tensor ``data`` at file ``offset``: its bytes, or its values cast to ``dtype`` straight into the windows.

        Copied now: ``data`` may be reused at once.
        """
        self._raise()
        size = dtype.itemsize if dtype is not None else data.element_size()
        if offset % size:  # the windows cannot hold these elements whole: write the bytes
            data, dtype, size = (data if dtype is None else data.to(dtype)).view(torch.uint8), None, 1
        for w, inner, at, step in self._pieces(offset, data.numel() * size):
            dst = w.tensor[inner : inner + step]
            src = data[at // size : (at + step) // size]
            if dtype is None:
                dst.copy_(src.view(torch.uint8))  # torch lets go of the GIL
            else:
                dst.view(dtype).copy_(src)
            self._added(w, step)

    def read_into(self, src_fd: int, src_offset: int, n: int, offset: int) -> int:
        """``n`` bytes of the open file ``src_fd`` from ``src_offset``, read straight into the windows at ``offset``."""
        self._raise()
        for w, inner, at, step in self._pieces(offset, n):
            view = memoryview(w.buf)[inner : inner + step]
            got = 0
            while got < step:
                k = os.preadv(src_fd, [view[got:]], src_offset + at + got)
                if not k:
                    return at + got  # the source ended early: the caller says which file
                got += k
            view.release()
            self._added(w, step)
        return n

    # -- the I/O thread --

    def _write_windows(self) -> None:
        while True:
            w = self._full.get()
            if w is None:
                return
            try:
                if self.error is None:
                    self._write(w)
            except BaseException as e:  # noqa: BLE001 - raised in the writing threads
                if isinstance(e, OSError) and e.filename is None and self.path is not None:
                    e.filename = str(self.path)
                if self.error is None:
                    self.error = e
            finally:
                with self._lock:
                    self._free.append(w.buf)

    def _write(self, w: _Window) -> None:
        n = -(-w.length // ALIGN) * ALIGN  # the last window is padded; close() cuts the file back
        view = memoryview(w.buf)[:n]
        done = 0
        try:
            while done < n:
                try:
                    done += os.pwrite(self.fd, view[done:], w.start + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    self._drop_direct()  # the filesystem took the flag but not the write
        finally:
            view.release()

    def _drop_direct(self) -> None:
        import fcntl  # (O_DIRECT exists only where fcntl does)

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # -- the end --

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def close(self) -> None:
        """Write what is queued, check every window was filled, cut the padding, fsync, close."""
        try:
            self._stop()
            self._raise()
            gap = next((i for i in range(-(-self.size // WINDOW_BYTES)) if i not in self._complete), None)
            if gap is not None:
                raise RuntimeError(f"bytes from offset {gap * WINDOW_BYTES} on were never written")
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the I/O thread (queued windows are dropped) and close the file unchecked."""
        if self._closed:
            return
        self._closed = True
        if self.error is None:
            self.error = RuntimeError("direct file aborted")
        while True:  # drop queued windows so the thread sees the stop at once
            try:
                self._full.get_nowait()
            except queue.Empty:
                break
        self._full.put(None)
        self._thread.join(timeout=30)
        os.close(self.fd)
