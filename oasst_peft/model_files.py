"""The JSON files of a model or adapter folder, checked for shape before a library reads them.

transformers and peft read ``config.json``, the tokenizer files and ``adapter_config.json`` with
``dict.get`` and arithmetic on whatever is there, so a file that is a list, a folder, or holds a
string where a count belongs fails deep inside them (``AttributeError: 'list' object has no
attribute 'get'``) or, worse, loads. ``check_model_folder`` reads each file that is present and says
in one line which file and key is wrong.
"""

from __future__ import annotations

import math
from pathlib import Path

from oasst_peft.boundary import read_json, user_file
from oasst_peft.errors import OasstError, shown

FIX = "restore the file from the model's source (download it again) or fix the value"
_COUNT = "count"  # a whole number >= 1 (not a bool)
_NUMBER = "number"  # a finite number or a huge 'no limit' value, not a bool
_SCALE = "scale"  # a number > 0 and <= 1e6, not a bool, not null
# file -> {key: kind or tuple of allowed types}; keys in REQUIRED must be present.
SCHEMA: dict[str, dict[str, object]] = {
    "config.json": {
        "model_type": (str,),
        "vocab_size": _COUNT,
        "hidden_size": _COUNT,
        "num_hidden_layers": _COUNT,
        "num_attention_heads": _COUNT,
    },
    "tokenizer.json": {"model": (dict,), "added_tokens": (list,)},
    "tokenizer_config.json": {"tokenizer_class": (str, type(None)), "model_max_length": _NUMBER},
    "special_tokens_map.json": {},
    "generation_config.json": {},
    "adapter_config.json": {
        "peft_type": (str,),
        "r": _COUNT,
        "lora_alpha": _SCALE,
        "target_modules": (str, list, type(None)),
    },
}
REQUIRED = {
    "config.json": ("model_type",),
    "tokenizer.json": ("model",),
    "adapter_config.json": ("peft_type",),
}


def _ok(value, kind) -> bool:
    if kind == _COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == _SCALE:
        return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1e6
    if kind == _NUMBER:
        return value is None or (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and not math.isnan(value)
            and value > 0
        )
    return isinstance(value, kind)


def _wanted(kind) -> str:
    if kind == _COUNT:
        return "a whole number >= 1"
    if kind == _NUMBER:
        return "a number > 0"
    if kind == _SCALE:
        return "a number > 0 and <= 1e6"
    return " or ".join(
        "null"
        if t is type(None)
        else {"str": "a string", "dict": "an object"}.get(t.__name__, f"a {t.__name__}")
        for t in kind
    )


def check_model_folder(folder: str | Path, key: str = "model_name") -> None:
    """Every known JSON file present in ``folder`` is an object whose known keys have usable values."""
    folder = Path(folder)
    for name, fields in SCHEMA.items():
        path = folder / name
        if not path.exists():
            continue
        data = read_json(path, key, FIX)
        for field in REQUIRED.get(name, ()):
            if field not in data:
                raise OasstError(f"{key}: {path} has no '{field}'; {FIX}")
        for field, kind in fields.items():
            if field in data and not _ok(data[field], kind):
                raise OasstError(
                    f"{key}: {path}: '{field}' must be {_wanted(kind)} (got {shown(repr(data[field]))[:60]}); {FIX}"
                )


def check_safetensors(path: Path, key: str = "model_name") -> None:
    """The header of a safetensors file parses and covers the file (read without loading a tensor)."""
    from safetensors import safe_open

    with user_file(key, path, FIX), safe_open(str(path), framework="np") as f:
        f.keys()


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(folder: str | Path | None) -> bool:
    """A folder with a saved tokenizer (what ``AutoTokenizer.from_pretrained`` needs to start)."""
    return folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_MARKERS)


def require_tokenizer(folder: str | Path, key: str, why: str) -> None:
    """One line when ``folder`` has no tokenizer files, instead of transformers' guesses at converting one."""
    if not has_tokenizer(folder):
        raise OasstError(
            f"{key}: {folder} has no tokenizer (no {' or '.join(TOKENIZER_MARKERS)}); {why}: copy the tokenizer "
            "files of its base model into it"
        )


def check_folder(folder: str | Path, key: str = "model_name") -> None:
    """``check_model_folder`` and every safetensors header in ``folder``: what a load would trip on."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    check_model_folder(folder, key)
    for path in sorted(folder.glob("*.safetensors")):
        if path.is_dir():
            raise OasstError(f"{key}: {path} is a folder, not a safetensors file; {FIX}")
        check_safetensors(path, key)
    if (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file():
        _check_adapter_targets(folder, key)


def _check_adapter_targets(folder: Path, key: str) -> None:
    """``target_modules`` of adapter_config.json matches the modules the adapter holds LoRA weights for."""
    import re

    from safetensors import safe_open

    targets = read_json(folder / "adapter_config.json", key, FIX).get("target_modules")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="np") as f:
        keys = f.keys()  # (a safetensors handle is not iterable)
        names = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys if ".lora_" in k}
    if not names or targets is None or targets == "all-linear":  # peft's own word for every linear layer
        return
    try:
        if isinstance(targets, str):
            ok = any(re.fullmatch(targets, n) for n in names)
        else:
            ok = any(n == t or n.endswith("." + t) for t in targets for n in names)
    except (re.error, TypeError):
        ok = False
    if not ok:
        raise OasstError(
            f"{key}: {folder / 'adapter_config.json'}: target_modules {shown(targets)!s:.60} matches none of "
            f"the modules the adapter has weights for; {FIX}"
        )
