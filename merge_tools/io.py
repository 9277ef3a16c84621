"""Low-memory safetensors I/O, staged output folders (temp dir beside the target, renamed at the end) and disk checks.

``SafetensorsFile`` reads one tensor, or a range of its rows, straight from the file into a fresh
buffer (no mmap, so nothing but the tensor in hand counts against memory); ``merge_tools.writer``
writes shards.
``staged_dir`` gives a temp folder beside ``--out`` that is renamed into place only by ``publish``;
anything that stops the merge before that (an error, Ctrl-C, SIGTERM, a kill) leaves no ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.errors import MergeError

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
NAMED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in NAMED_DTYPES.items()}
CHUNK_BYTES = 16 * 2**20  # rows per read/convert step: small enough to keep peak memory flat


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize  # (no tensor made: this runs for every row block of a merge)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int, in bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MergeError(f"max_shard_size: '{size}' is not a size; use e.g. 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * powers[unit])


def human(n: float) -> str:
    """Bytes as a short human string (GB = 10^9 bytes)."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One safetensors file read without mmap: only the bytes asked for land in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("file shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > 100 * 2**20:
                    raise ValueError("header larger than 100 MB")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise MergeError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in ST_DTYPES:
                raise MergeError(
                    f"{self.path}: tensor {name} has dtype {entry['dtype']}, which is not supported"
                )
            a, b = entry["data_offsets"]
            self.tensors[name] = TensorInfo(
                ST_DTYPES[entry["dtype"]], tuple(entry["shape"]), base + a, base + b
            )

    def _read_into(self, buf: torch.Tensor, offset: int) -> None:
        """Positional reads (``preadv``) on a descriptor of this call's own: safe from several threads."""
        view = memoryview(buf.numpy()).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], offset + got)
                if not n:
                    raise MergeError(f"{self.path}: file is truncated (tensor data ends early)")
                got += n
        finally:
            os.close(fd)

    def read_rows_into(self, name: str, a: int, b: int, out: torch.Tensor) -> None:
        """Rows ``a:b`` of the tensor into ``out`` (contiguous, the tensor's dtype, ``b - a`` rows): no new memory."""
        info = self.tensors[name]
        row = numel(info.shape[1:]) * element_size(info.dtype)
        if out.dtype != info.dtype or out.nbytes != (b - a) * row or not out.is_contiguous():
            raise ValueError(f"{name}: buffer does not fit rows {a}:{b}")
        if out.nbytes:
            self._read_into(out.view(torch.uint8).reshape(-1), info.start + a * row)

    def read_bytes(self, offset: int, n: int) -> torch.Tensor:
        """``n`` raw bytes from absolute ``offset``, as a uint8 tensor."""
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            self._read_into(buf, offset)
        return buf

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        info = self.tensors[name]
        return self.read_bytes(info.start, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the tensor's first dimension."""
        info = self.tensors[name]
        row = numel(info.shape[1:]) * element_size(info.dtype)
        raw = self.read_bytes(info.start + a * row, (b - a) * row)
        return raw.view(info.dtype).reshape((b - a, *info.shape[1:]))


def shard_names(n: int) -> list[str]:
    """HF shard file names for ``n`` shards."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as transformers writes it."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a small text file and flush it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_free_disk(folder: Path, need: int, what: str = "--out") -> int:
    """Refuse when the filesystem holding ``folder`` has less than ``need`` bytes (plus 1% and 64 MB) free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(need * 1.01) + 64 * 2**20
    if free < want:
        raise MergeError(
            f"{what}: needs {human(want)} free on the disk of {probe}, only {human(free)} is free; "
            "free some space or choose another --out"
        )
    return free


# ---------------------------------------------------------------------------------------------- output dir

PARTIAL = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete temp folders of ``out`` left by merges that were killed (their process is gone)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}{PARTIAL}*"):
        m = re.search(rf"{re.escape(PARTIAL)}(\d+)-", p.name)
        if p.is_dir() and m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_out(out: Path, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an existing ``out`` without ``overwrite``, and ever an ``out`` that is or holds an input."""
    resolved = out.resolve()
    for p in protected:
        p = Path(p).resolve()
        if resolved == p or resolved in p.parents:
            raise MergeError(
                f"--out: {out} is (or contains) an input of this merge ({p}); choose another folder"
            )
    if out.exists() and not overwrite:
        raise MergeError(
            f"--out: {out} already exists; pass --overwrite to replace it or choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out: {out} exists and is not a folder; choose another path")


class _Terminated(BaseException):
    """SIGTERM during a staged write: unwinds like Ctrl-C so the temp folder is removed."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StagedDir:
    """A temp folder beside ``out``; ``publish()`` renames it to ``out`` (replacing an old one)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.published = False

    def publish(self) -> None:
        _fsync_dir(self.path)
        trash = None
        if self.out.exists():
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, trash)
        os.replace(self.path, self.out)
        _fsync_dir(self.out.parent)
        self.published = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[StagedDir]:
    """Yield a ``StagedDir``; unless it was published, it is removed however the block ends (SIGTERM included)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staged = StagedDir(out)
    staged.path.mkdir()
    try:
        with _sigterm_unwinds():
            yield staged
    except _Terminated:
        shutil.rmtree(staged.path, ignore_errors=True)
        raise MergeError("merge stopped by SIGTERM; nothing was written to --out") from None
    finally:
        if not staged.published:
            shutil.rmtree(staged.path, ignore_errors=True)


def existing_parent(out: Path) -> Path:
    """The folder ``out`` goes in, created if need be; one line when it cannot be (a file above it, no write access)."""
    parent = out.resolve().parent
    above = parent
    while not above.exists():  # the nearest folder that exists must be a folder, and writable
        above = above.parent
    if not above.is_dir():
        raise MergeError(
            f"--out: {above} is a file, so {out} cannot be created under it; choose another --out"
        )
    if not os.access(above, os.W_OK):
        raise MergeError(f"--out: {above} is not writable; choose another --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeError(f"--out: cannot create {parent} ({e.strerror or e}); choose another --out") from None
    return parent
