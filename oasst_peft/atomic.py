"""Atomic file writes: new content goes to a temp file beside the target, then ``os.replace`` puts it in place.

A reader sees the old file or the new one, never half of one, and a failed write leaves no temp file behind.
Used for reports, transcripts, curves, trainer state and exports.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without error, fsync it and move it onto ``path``."""
    path = Path(path)
    while True:  # a fresh name, created with the usual permissions (umask), unlike mkstemp's 0600
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
