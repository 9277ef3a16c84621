"""Recipes read: YAML files and ``extends:``, ``--set a.b=c`` overrides, and one-line validation errors.

A recipe is data. Keys follow the seed model cards (``learning_rate``, ``max_length``,
``deepspeed_config`` ...) plus a ``peft`` section and the ``datasets`` mix; the keys themselves are in
``oasst_peft.recipe_schema``. ``load_recipe`` returns a validated ``Recipe``; every problem is an
``OasstError`` naming the file and key and saying what to do.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from oasst_peft.errors import OasstError, shown
from oasst_peft.key_aliases import key_hint
from oasst_peft.recipe_schema import DTYPES, PEFT_KEYS, RECIPE_KEYS, PeftSection, Recipe
from oasst_peft.recipe_yaml import PATH_KEYS, anchor_paths, read_recipe_file
from oasst_peft.shipped import find_recipe

__all__ = ["DTYPES", "PeftSection", "Recipe", "apply_override", "load_recipe", "recipe_from_dict"]


def apply_override(data: dict, assignment: str) -> str:
    """Apply one ``a.b=c`` override in place; the value is parsed as YAML (numbers, bools, lists).

    Returns the dotted key it set, so that a value it makes invalid is blamed on ``--set``, not the file.
    """
    if "=" not in assignment:
        raise OasstError(f"--set {shown(assignment)}: expected key=value, e.g. --set peft.r=32")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise OasstError(f"--set {shown(assignment)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    valid = RECIPE_KEYS
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if valid is not None and part not in valid:
            where = ".".join(parts[:i]) or "recipe"
            raise OasstError(
                f"--set {shown(key)}: unknown key '{shown(part)}' in {shown(where)}"
                + key_hint(part, valid, "peft" if where == "peft" else None)
            )
        if last:
            node[part] = value
            return ".".join(parts)
        elif valid is RECIPE_KEYS and part == "datasets":
            raise OasstError(
                f"--set {shown(key)}: datasets is a list, set it whole, e.g. "
                "--set 'datasets=[{alpaca: {max_train_set: 100}}]'"
            )
        else:
            valid = PEFT_KEYS if part == "peft" else None
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _check_unknown_keys(data: dict, source: str) -> None:
    for key in data:
        if key not in RECIPE_KEYS:
            raise OasstError(f"{source}: unknown key '{shown(key)}'" + key_hint(str(key), RECIPE_KEYS))
    peft = data.get("peft")
    if isinstance(peft, dict):
        for key in peft:
            if key not in PEFT_KEYS:
                raise OasstError(
                    f"{source}: unknown key 'peft.{shown(key)}'" + key_hint(str(key), PEFT_KEYS, "peft")
                )


def _holder(files: list[tuple[str, dict]], loc: tuple) -> str | None:
    """The first of ``files`` (child first) that sets the value at ``loc``, or a list or value above it."""
    for name, data in files:
        node = data
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
            if not isinstance(node, dict):
                return name
        else:
            return name
    return None


def _format_validation_error(
    err: ValidationError, source: str, set_keys: tuple[str, ...] = (), files: list[tuple[str, dict]] = ()
) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    parts = tuple(first["loc"])
    named = msg.split(":", 1)[
        0
    ]  # a check across keys has no loc; its message starts with the key it is about
    across = not parts and named.split(".")[0] in RECIPE_KEYS
    if across:
        parts = tuple(named.split("."))
    source = (_holder(list(files), parts) if parts else None) or source
    loc = ".".join(str(p) for p in parts) or "recipe"
    if first["type"] == "missing":
        desc = Recipe.model_fields.get(loc)
        hint = f" ({desc.description})" if desc and desc.description else ""
        return f"{source}: missing required key '{loc}'{hint}"
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict | list) else ""
    text = msg if across else f"{loc}: {msg}{shown}"
    setter = next(
        (k for k in set_keys if loc == k or loc.startswith(f"{k}.") or k.startswith(f"{loc}.")), None
    )
    if setter == loc:
        return f"--set {text}"
    if setter is not None:
        source = f"--set {setter}"
    return f"{source}: {text}"


def recipe_from_dict(
    data: dict,
    source: str = "recipe",
    path: Path | None = None,
    set_keys: tuple[str, ...] = (),
    files: list[tuple[str, dict]] = (),
) -> Recipe:
    """Validate a recipe mapping; ``source`` names it in errors (``set_keys``: keys set by ``--set``).

    ``files``: the ``extends:`` chain's own mappings, child first, so that a bad value is blamed on the file
    that holds it.
    """
    _check_unknown_keys(data, source)
    if isinstance(data.get("peft"), dict) and data["peft"].get("mode") == "full" and len(data["peft"]) == 1:
        data = {**data, "peft": None}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise OasstError(_format_validation_error(e, source, set_keys, files)) from None
    recipe._recipe_path = path
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, or a shipped recipe by name (a path wins), following ``extends:``; apply ``--set``
    overrides (``"key.sub=value"``); validate."""
    path = find_recipe(path)

    files: list[tuple[str, dict]] = []  # each file's own keys, child first

    def own_keys(file_data: dict, file: Path) -> None:  # a problem is blamed on the file that holds it
        name = str(path) if file == path.resolve() else str(file)
        _check_unknown_keys(file_data, name)
        files.append((name, file_data))

    data = read_recipe_file(path, check=own_keys)
    set_keys = tuple(apply_override(data, assignment) for assignment in overrides)
    for top in {k.split(".")[0] for k in set_keys} & {"datasets", *PATH_KEYS}:
        data[top] = anchor_paths({top: data[top]}, Path.cwd(), typed=True)[top]  # relative to this folder
    return recipe_from_dict(data, source=str(path), path=path.resolve(), set_keys=set_keys, files=files)
