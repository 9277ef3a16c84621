"""A recipe file read: YAML parsed safely, ``extends:`` followed, every problem one line naming the file.

Only the file layer: the mapping it returns is checked against the schema in ``oasst_peft.config``.
A relative path in a recipe means relative to the file that wrote it, so the paths a parent recipe in
another folder passes down through ``extends:`` are made absolute against that parent's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from oasst_peft.errors import OasstError


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise OasstError(
            f"{path}: recipe file not found (check the path; shipped recipes: oasst-peft recipes)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OasstError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise OasstError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OasstError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        raise OasstError(f"{path}: recipe is empty (it needs at least model_name and datasets)")
    if not isinstance(data, dict):
        raise OasstError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    return data


# Dataset options that hold file paths (a string or a list of them), resolved against the recipe's folder.
DATASET_PATH_OPTIONS = ("input_file_path", "data_files")
# Top-level keys that may name a file or folder beside the recipe (else a hub id, a shipped name, ...).
PATH_KEYS = ("model_name", "tokenizer_name", "chat_template", "deepspeed_config")


# What marks a value typed as a path even when no such file exists yet (not a hub id or a shipped name).
PATH_SUFFIXES = (".json", ".jinja", ".gguf", ".yaml", ".yml")


def _anchored(value, folder: Path, must_exist: bool):
    """``value`` made absolute against ``folder`` when it is a relative path (that exists there, or, with
    ``must_exist`` False, that is written as one)."""
    if not isinstance(value, str) or not value or value.startswith(("package:", "~")) or "\x00" in value:
        return value
    path = Path(value)
    if path.is_absolute() or (must_exist and not (folder / path).exists()):
        return value
    return str(folder / path)


def _written_as_path(value) -> bool:
    return isinstance(value, str) and (
        value.startswith(("./", "../")) or value.lower().endswith(PATH_SUFFIXES)
    )


def anchor_paths(data: dict, folder: Path, typed: bool = False) -> dict:
    """Recipe ``data`` with its relative paths made absolute against ``folder``, the folder of the file
    that wrote them: a parent recipe's, or the recipe a saved run copy came from.

    ``typed``: the values were typed on the command line (``--set``), so a value written as a path
    (``./ds.json``, ``mine.jinja``) is anchored even when it does not exist, for its error to name it."""
    for key in PATH_KEYS:
        if key in data:
            data[key] = _anchored(data[key], folder, must_exist=not (typed and _written_as_path(data[key])))
    entries = data.get("datasets") if isinstance(data.get("datasets"), list) else []
    for entry in entries:
        for opts in entry.values() if isinstance(entry, dict) else []:
            if not isinstance(opts, dict):
                continue
            for opt in DATASET_PATH_OPTIONS:
                value = opts.get(opt)
                if isinstance(value, list):
                    opts[opt] = [_anchored(v, folder, must_exist=False) for v in value]
                elif value is not None:
                    opts[opt] = _anchored(value, folder, must_exist=False)
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_recipe_file(path: Path, seen: tuple[Path, ...] = (), check=None) -> dict:
    """The recipe at ``path`` as a mapping, its ``extends:`` chain merged in (a child's keys win, sections merge).

    ``check(data, file)``, when given, sees each file's own keys before the merge, so that a problem is
    blamed on the file that holds it.
    """
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise OasstError(f"{path}: 'extends' loops back on itself ({chain})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if check is not None:
        check(data, path)
    if parent is None:
        return data
    if not isinstance(parent, str) or "\x00" in parent:
        raise OasstError(f"{path}: 'extends' must be a path to another recipe file")
    parent_path = Path(parent)
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    base = anchor_paths(read_recipe_file(parent_path, (*seen, path), check), parent_path.resolve().parent)
    return _deep_merge(base, data)
