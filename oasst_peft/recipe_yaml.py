"""A recipe file read: YAML parsed safely, ``extends:`` followed, every problem one line naming the file.

Only the file layer: the mapping it returns is checked against the schema in ``oasst_peft.config``.
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


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_recipe_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe at ``path`` as a mapping, its ``extends:`` chain merged in (a child's keys win, sections merge)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise OasstError(f"{path}: 'extends' loops back on itself ({chain})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or "\x00" in parent:
        raise OasstError(f"{path}: 'extends' must be a path to another recipe file")
    parent_path = Path(parent)
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    base = read_recipe_file(parent_path, (*seen, path))
    return _deep_merge(base, data)
