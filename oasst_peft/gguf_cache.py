"""A GGUF base dequantized once into a safetensors model folder, reused by train, sample, chat, merge and export.

Loading a ``.gguf`` with transformers dequantizes every tensor and converts the tokenizer, each time.
``cached_model_dir(path)`` does that once and saves the result (config, ``model.safetensors``,
tokenizer, generation config) under ``<cache>/gguf/<sha256 of the file>-v1/``; later loads read the
safetensors folder like any local model, which also lets QLoRA quantize it. The cache root is
``$OASST_PEFT_CACHE``, else ``$XDG_CACHE_HOME/oasst-peft``, else ``~/.cache/oasst-peft``. The folder
is written beside its final name and renamed into place, so a crash or a concurrent writer never
leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from oasst_peft.errors import GGUF_INSTALL, OasstError, require_module

CACHE_ENV = "OASST_PEFT_CACHE"
FORMAT = "v1"  # part of each entry's name: a change in what is stored starts new entries
_DONE = "oasst_gguf.json"  # written last: an entry without it is incomplete
_hashes: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """Where cached models live: the project's one cache root, shared with the tokenized-data cache."""
    from oasst_peft.data.tokenize import default_cache_dir

    return default_cache_dir()


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per process for a given (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def cache_dir_for(path: str | Path) -> Path:
    """The cache folder a GGUF file maps to (it may not exist yet)."""
    return cache_root() / "gguf" / f"{file_sha256(Path(path))}-{FORMAT}"


def cached_if_present(path: str | Path) -> Path | None:
    """The finished cache folder of the GGUF file at ``path``, or None (nothing is dequantized here)."""
    target = cache_dir_for(path) if Path(path).is_file() else None
    return target if target is not None and (target / _DONE).is_file() else None


def cached_model_dir(path: str | Path, say=None) -> Path:
    """The safetensors folder for the GGUF file at ``path``, dequantizing it first if it is not cached."""
    src = Path(path)
    if not src.is_file():
        raise OasstError(f"model_name: GGUF file not found: {src}")
    target = cache_dir_for(src)
    if (target / _DONE).is_file():
        return target
    require_module("gguf", f"reading {src.name}", GGUF_INSTALL)  # transformers reads GGUF with it
    if say:
        say(f"gguf: dequantizing {src.name} once into {target} (later loads read the safetensors copy)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:12]}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise OasstError(
            f"gguf cache: cannot write under {target.parent} ({e.strerror}); set {CACHE_ENV} to a writable folder"
        ) from None
    try:
        try:
            _dequantize(src, tmp)
        except OSError as e:  # a full disk or a quota, while writing the copy (nothing is kept of it)
            why = e.strerror or type(e).__name__
            raise OasstError(
                f"gguf cache: cannot write the dequantized copy of {src.name} under {target.parent} ({why}); "
                f"free space there or set {CACHE_ENV} to a folder with room"
            ) from None
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same entry first (the target is a non-empty folder): use it.
            if not (target / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize(src: Path, out: Path) -> None:
    """Load the GGUF with transformers and save it as a plain safetensors model folder in ``out``."""
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "dequantizing" line instead of three progress bars
    try:
        # Rebuilding the model initializes it randomly first: on the caller's seeded RNG that would shift
        # every later draw (LoRA init, new token rows), so a run on a cold cache would train differently.
        with torch.random.fork_rng(devices=[]):
            _convert(src, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _convert(src: Path, out: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, kwargs = str(src.parent), {"gguf_file": src.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(first, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(first, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OasstError(f"model_name: cannot read the GGUF file {src}: {detail}") from None
    # A GGUF-loaded model keeps GGUF loading state and will not save_pretrained: rebuild it from its
    # config (without the GGUF quantization entry: the weights are plain floats now, and trainable)
    # and weights, in the dtype they were dequantized to, then save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=next(loaded.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {"source": str(src.resolve()), "sha256": file_sha256(src), "size": src.stat().st_size}
    (out / _DONE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
