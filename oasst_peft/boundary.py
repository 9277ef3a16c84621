"""The one boundary between a user's file and the library that reads it.

Wherever the project hands a user's file to a library (transformers, peft, tokenizers, gguf,
safetensors, json, yaml, DeepSpeed's JSON, jinja2), the call runs inside ``user_file(key, path, fix)``.
The library's *known* exception types for bad input become one ``OasstError`` line naming the recipe
key (or option) and the file, quoting the library's first line, and saying what to do:

    with user_file("model_name", folder, "point model_name at a Hugging Face model folder or a .gguf"):
        config = AutoConfig.from_pretrained(folder)

Anything else propagates untouched, with its traceback: a bug in the project stays a bug. The
converted error keeps the library's exception as its ``__cause__``, so ``--debug`` shows where it
came from.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from pathlib import Path

from oasst_peft.errors import OasstError, shown

_MAX_QUOTE = 200


def _library_types() -> tuple[type[BaseException], ...]:
    """The exception types the wrapped libraries raise for a bad file (imported only if already loaded)."""
    import sys

    kinds: list[type[BaseException]] = [
        OSError,  # missing/unreadable/truncated files (transformers, safetensors, gguf's memmap)
        ValueError,  # json.JSONDecodeError, unknown model_type, peft's target modules, gguf's magic
        KeyError,  # a config or checkpoint without a required field
        TypeError,  # a config field of the wrong type reaching a constructor
        IndexError,  # a truncated gguf header read past its end
        EOFError,
        UnicodeError,
        struct.error,
        zlib.error,
        RecursionError,  # a pathologically nested JSON/YAML
    ]
    if "yaml" in sys.modules:
        kinds.append(sys.modules["yaml"].YAMLError)
    if "jinja2" in sys.modules:
        kinds.append(sys.modules["jinja2"].TemplateError)
    if "safetensors" in sys.modules:
        err = getattr(sys.modules["safetensors"], "SafetensorError", None)
        if err is not None:
            kinds.append(err)
    return tuple(kinds)


def is_known(e: BaseException) -> bool:
    """True for a library's bad-input error; the Rust ``tokenizers`` raises a bare ``Exception``."""
    return isinstance(e, _library_types()) or type(e) is Exception


def quote(e: BaseException) -> str:
    """The first line of a library's message, shortened and printable."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing {text}"
    text = shown(text)
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


@contextlib.contextmanager
def user_file(key: str, path: object, fix: str, error: type[Exception] = OasstError, passes=()):
    """Run the ``with`` block; a known library error becomes ``error('<key>: cannot use <path>: ...; <fix>')``.

    ``passes``: exception types the caller handles itself (left untouched).
    """
    try:
        yield
    except OasstError:
        raise
    except Exception as e:
        if not is_known(e) or isinstance(e, (error, *_as_tuple(passes))):
            raise
        raise error(f"{key}: cannot use {path}: {quote(e)}; {fix}") from e


def _as_tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def read_json(path: str | Path, key: str, fix: str, shape: type = dict):
    """A JSON file of the expected top-level ``shape``, or one line naming ``key`` and the file."""
    with user_file(key, path, fix):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, shape):
        raise OasstError(f"{key}: {path} holds a JSON {type(data).__name__}, not a {shape.__name__}; {fix}")
    return data
