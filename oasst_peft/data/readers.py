"""Reading raw rows from local files (jsonl, json, gz, parquet, csv) or the hub, each with its location.

Every row comes with ``where`` (``file:line``, ``file: item N`` or ``hub-id: row N``) so a bad row can be
named. A malformed row goes to ``Problems.bad``: counted and skipped, or raised with ``on_error: fail``.
A corrupt gzip or an unreadable file is one OasstError line.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft.errors import OasstError, Unavailable
from oasst_peft.offline import hub_offline

MALFORMED = "malformed_row"
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Excel and some editors write at the start of a file


@dataclass
class Problems:
    """Counts dropped rows by reason for one dataset, or raises on the first with ``on_error: fail``."""

    key: str
    on_error: str = "skip"
    dropped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def bad(self, where: str, msg: str, reason: str = MALFORMED) -> None:
        """A row that cannot be used: fail, or count it (the first location is kept for messages)."""
        if self.on_error == "fail":
            raise OasstError(f"{where}: {msg} ({self.key}; set on_error: skip to skip and count such rows)")
        self.dropped[reason] += 1
        self.first.setdefault(reason, f"{where}: {msg}")


def expand_files(key: str, option: str, paths: list[str]) -> list[Path]:
    """Local paths (globs allowed) that exist; a missing one is an OasstError naming the recipe key."""
    out: list[Path] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p))
            if not matches:
                raise OasstError(f"datasets: {key}: {option}: no file matches {p}")
            out.extend(Path(m) for m in matches)
        elif Path(p).is_file():
            out.append(Path(p))
        elif Path(p).is_dir():
            raise OasstError(
                f"datasets: {key}: {option}: {p} is a folder; name its files, or a glob such as {Path(p) / '*.jsonl'}"
            )
        else:
            raise OasstError(f"datasets: {key}: {option}: file not found: {p}")
    return out


def _suffixes(path: Path) -> list[str]:
    return [s.lower() for s in path.suffixes]


def _gzip_error(path: Path, e: Exception) -> OasstError:
    return OasstError(f"{path}: corrupt or truncated gzip file ({e}); download it again or give the .jsonl")


def _read_error(path: Path, e: Exception) -> OasstError:
    """A corrupt gzip stream (gzip's own errors carry no errno), or a file that cannot be read."""
    is_gz = _suffixes(path)[-1:] == [".gz"]
    if isinstance(e, EOFError | zlib.error) or (is_gz and isinstance(e, OSError) and e.errno is None):
        return _gzip_error(path, e)
    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return OasstError(f"{path}: cannot read ({why}); check that it is a readable file")


def open_binary(path: Path):
    """The file's bytes, transparently decompressed when its name ends in .gz."""
    if _suffixes(path)[-1:] == [".gz"]:
        return gzip.open(path, "rb")
    return open(path, "rb")


def _first_char(path: Path) -> bytes:
    try:
        with open_binary(path) as f:
            head = f.read(4096)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from None
    stripped = head.removeprefix(BOM).lstrip(b" \t\r\n")
    return stripped[:1]


def _json_lines(path: Path, problems: Problems) -> Iterator[tuple[str, object]]:
    try:
        with open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1:
                    line = line.removeprefix(BOM)
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except UnicodeDecodeError as e:
                    problems.bad(
                        f"{path}:{lineno}", f"not UTF-8 text (byte {e.start}); save the file as UTF-8"
                    )
                except ValueError as e:  # JSONDecodeError
                    if lineno == 1 and _whole_file_is_an_object(path):
                        raise OasstError(
                            f'{path}: one JSON object (such as {{"data": [...]}}); give a JSON list of rows '
                            "or one JSON object per line"
                        ) from None
                    problems.bad(f"{path}:{lineno}", f"not valid JSON ({_short(e)})")
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from None


WHOLE_FILE_CHECK_BYTES = 64 * 2**20  # above this, only the file's opening is looked at


def _whole_file_is_an_object(path: Path) -> bool:
    """A pretty-printed JSON object, whose first line alone is not JSON (not a JSON-lines file).

    A file up to ``WHOLE_FILE_CHECK_BYTES`` is parsed whole; a bigger one counts when it opens with ``{``
    alone on its line followed by an indented ``"key":``, so that one bad first line of a big JSON-lines
    file never reads it all.
    """
    try:
        if path.stat().st_size <= WHOLE_FILE_CHECK_BYTES:
            with open_binary(path) as f:
                return isinstance(json.loads(f.read().removeprefix(BOM)), dict)
        with open_binary(path) as f:
            head = f.read(4096).removeprefix(BOM).decode("utf-8", errors="replace").splitlines()
        return (
            len(head) > 1 and head[0].strip() == "{" and head[1][:1].isspace() and head[1].lstrip()[:1] == '"'
        )
    except (OSError, EOFError, zlib.error, ValueError):
        return False


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    try:
        with open_binary(path) as f:
            data = json.loads(f.read().removeprefix(BOM))
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from None
    except ValueError as e:
        raise OasstError(f"{path}: not a valid JSON file ({_short(e)})") from None
    if not isinstance(data, list):
        raise OasstError(f"{path}: expected a JSON list of rows or one JSON object per line")
    for i, item in enumerate(data):
        yield f"{path}: item {i}", item


def _parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}: row {i}", row
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise OasstError(f"{path}: not a readable parquet file ({_short(e)})") from None


def _csv(path: Path, problems: Problems) -> Iterator[tuple[str, object]]:
    try:
        with open_binary(path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # Excel writes a BOM
            reader = csv.DictReader(text)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or None in row.values():  # a cut or shifted line: more or fewer fields
                    problems.bad(
                        where, f"has a different number of fields than the header ({len(reader.fieldnames)})"
                    )
                    continue
                yield where, dict(row)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise OasstError(f"{path}: not a readable CSV file ({_short(e)})") from None


def iter_file_rows(path: Path, problems: Problems) -> Iterator[tuple[str, object]]:
    """``(where, value)`` for every row of one local file; the format comes from the name and content."""
    sfx = _suffixes(path)
    if ".parquet" in sfx:
        yield from _parquet(path)
    elif ".csv" in sfx:
        yield from _csv(path, problems)
    elif _first_char(path) == b"[":
        yield from _json_array(path)
    else:
        yield from _json_lines(path, problems)


def iter_hub_rows(
    key: str, option: str, hub_id: str, config: str | None, split: str, data_files=None, **kwargs
) -> Iterator[tuple[str, object]]:
    """Rows of a hub dataset; offline or unreachable is one OasstError naming the local-file key."""
    if hub_offline(datasets=True):
        raise Unavailable(
            f"datasets: {key}: needs {hub_id} from the hub, which is offline here (HF_HUB_OFFLINE); "
            f"download it and set {option}: PATH under {key} in the recipe"
        )
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split, data_files=data_files, **kwargs)
    except Exception as e:  # any hub/network/format failure becomes one line
        raise Unavailable(
            f"datasets: {key}: could not load {hub_id} from the hub ({type(e).__name__}: {_short(e)}); "
            f"set {option}: PATH to a local copy"
        ) from None
    for i, row in enumerate(ds):
        yield f"{hub_id}: row {i}", row


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
