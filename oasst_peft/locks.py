"""File locks: one ``train`` per output dir, and one writer per tokenized-cache entry.

``holds_output_dir``: a lock held for a run's whole lifetime, released on any exit.

The lock is ``fcntl.flock`` on a small file beside the output dir (``.<name>.oasst-lock``), so the
kernel drops it when the process ends however it ends (an exception, Ctrl-C, ``kill -9``): a lock left
by a killed run is stale by construction and the next run takes it. The file holds the holder's pid,
host and start time, which the refusal names. A clean exit removes the file. Under a launcher only
rank 0 takes it (the other ranks belong to the same run).

``exclusive(path)``: a blocking lock for a short critical section (several processes tokenizing the
same mix into one cache: the first builds the entry, the others wait and then reuse it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from pathlib import Path

from oasst_peft.errors import OasstError

_HELD: dict[str, int] = {}  # lock path -> fd, for the runs this process holds


def lock_path(out: Path) -> Path:
    """The lock file of output dir ``out``: a hidden sibling, so the dir itself stays as the run left it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.oasst-lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(out: Path) -> Path | None:
    """Take the lock of ``out`` for this process, or raise one line naming who holds it.

    Returns the lock file, or None when this process already holds it.
    """
    import fcntl

    path = lock_path(out)
    if str(path) in _HELD:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OasstError(
            f"output_dir: cannot create {path.parent} ({e.strerror or e}); choose another --output-dir"
        ) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OasstError(
                f"output_dir: cannot create the run lock {path} ({e.strerror or e}); choose another --output-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OasstError(
                f"output_dir: {Path(out)} is in use by another run ({_holder(path)}); wait for it to end "
                "or choose another --output-dir"
            ) from None
        try:  # the holder before us may have removed the file between our open and our flock: retry
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "output_dir": str(out)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _HELD[str(path)] = fd
    return path


def release(path: Path | None) -> None:
    """Give the lock back and remove its file (a no-op for None or a lock this process does not hold)."""
    if path is None:
        return
    fd = _HELD.pop(str(path), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still locked: a run waiting on the old file sees it gone and retries
    os.close(fd)


def holds_output_dir(train):
    """Decorator for ``train(recipe, *, output_dir=None, dry_run=False, ...)``: the lock around the call.

    A dry run writes nothing and takes no lock; nor do ranks other than 0 under a launcher.
    """

    @functools.wraps(train)
    def locked(recipe, *args, **kwargs):
        if kwargs.get("dry_run") or os.environ.get("RANK", "0") != "0":
            return train(recipe, *args, **kwargs)
        path = acquire(recipe.output_path(kwargs.get("output_dir")))
        try:
            return train(recipe, *args, **kwargs)
        finally:
            release(path)

    return locked


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold ``flock`` on ``path`` (created if needed) for the ``with`` block; waits for other holders."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the small file stays (removing it would race)
