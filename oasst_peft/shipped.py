"""Data the package ships, looked up by name: DeepSpeed JSONs, base-model configs and recipes.

Everything lives inside the installed package (``oasst_peft/deepspeed_configs`` and ``oasst_peft/recipes``;
in a checkout ``oasst_peft/recipes`` is a link to the top-level ``recipes/`` folder, the single source),
so the lookups work the same from a checkout and from a wheel. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.errors import OasstError, did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parent
DEEPSPEED_DIR = PACKAGE_DIR / "deepspeed_configs"
RECIPES_DIR = PACKAGE_DIR / "recipes"
BASE_MODELS_DIR = RECIPES_DIR / "base_models"
DEEPSPEED_NAMES = ("zero2", "zero3", "zero2-offload", "zero3-offload")


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------------------


def deepspeed_config_path(value: str | None, base_dir: Path | None = None) -> Path | None:
    """A shipped config name (zero2, zero3, ...) or a JSON path (relative to ``base_dir``), as a file path."""
    if not value:
        return None
    shipped = DEEPSPEED_DIR / f"{value}.json"
    if shipped.is_file():
        return shipped
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise OasstError(
            f"deepspeed_config: file not found: {path} (or use zero2, zero3, zero2-offload, zero3-offload)"
        )
    return path


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a run's DeepSpeed JSON decides: where it is, the ZeRO stage, offload and bucket settings."""

    path: str | None = None
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int | None = None
    overlap_comm: bool = False

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    def setup_fields(self) -> dict:
        """The fields the memory planner's ``Setup`` takes."""
        return {
            "zero_stage": self.zero_stage,
            "offload_optimizer": self.offload_optimizer,
            "offload_params": self.offload_params,
            "reduce_bucket": self.reduce_bucket,
            "overlap_comm": self.overlap_comm,
        }


def read_deepspeed(value: str | None, base_dir: Path | None = None) -> DeepSpeedSettings:
    """ZeRO stage, offload and bucket settings of a recipe's ``deepspeed_config`` (shipped name or JSON path)."""
    path = deepspeed_config_path(value, base_dir)
    if path is None:
        return DeepSpeedSettings()
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OasstError(f"deepspeed_config: {path} is not readable JSON ({e})") from None
    zero = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    zero = zero if isinstance(zero, dict) else {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise OasstError(f"deepspeed_config: {path}: zero_optimization.stage must be 0-3, got {stage!r}")

    def offloaded(key: str) -> bool:
        section = zero.get(key)
        return isinstance(section, dict) and section.get("device", "none") in ("cpu", "nvme")

    bucket = zero.get("reduce_bucket_size")
    return DeepSpeedSettings(
        path=str(path),
        zero_stage=stage,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param") and stage == 3,
        reduce_bucket=int(bucket) if isinstance(bucket, int | float) else None,
        overlap_comm=bool(zero.get("overlap_comm", False)),
    )


# ---------------------------------------------------------------------------------------------------------
# Base-model configs
# ---------------------------------------------------------------------------------------------------------


def shipped_model_config(model_name: str) -> Path | None:
    """The config.json shipped for a hub id like 'EleutherAI/pythia-12b-deduped' (recipes/base_models)."""
    if not model_name or model_name.count("/") != 1 or model_name.startswith((".", "/", "~")):
        return None
    path = BASE_MODELS_DIR / model_name.replace("/", "__") / "config.json"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------


def recipe_names(folder: Path | None = None) -> list[str]:
    """The shipped recipes' names (file names without .yaml), sorted."""
    return sorted(p.stem for p in (folder or RECIPES_DIR).glob("*.yaml"))


def find_recipe(value: str | Path) -> Path:
    """A recipe path as given when that file exists (a path wins), else the shipped recipe of that name."""
    path = Path(value)
    if path.is_file():
        return path
    text = str(value)
    name = text.removesuffix(".yaml").removesuffix(".yml")
    if "/" not in text and "\\" not in text:
        shipped = RECIPES_DIR / f"{name}.yaml"
        if shipped.is_file():
            return shipped
        raise OasstError(
            f"{text}: no such recipe file or shipped recipe"
            + did_you_mean(name, recipe_names())
            + " (list them with: oasst-peft recipes)"
        )
    if path.stem in recipe_names() and path.suffix in (".yaml", ".yml", ""):
        # "recipes/demo-smollm2.yaml" typed outside a checkout: the shipped recipe is there by its name
        raise OasstError(
            f"{text}: recipe file not found; the shipped recipe of that name is '{path.stem}', use that"
        )
    return path  # load_recipe says the file is missing


def recipe_description(path: Path) -> str:
    """The first comment line of a recipe file (its one-line description), or ''."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        return ""
    return ""


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _standalone(source: Path, text: str) -> tuple[str, dict]:
    """The text of ``source`` with its ``extends:`` chain written out, and its mapping.

    The leading comment lines are kept. Data files the recipes name but do not ship (the oasst export)
    stay relative, to be put beside the copy; every other path is rewritten by ``copy_recipe``.
    """
    import yaml

    from oasst_peft.recipe_yaml import read_recipe_file

    chain: list[str] = []  # the files read, child first
    merged = read_recipe_file(source, check=lambda _data, file: chain.append(file.name))
    folder = RECIPES_DIR.resolve()

    def relative(node):  # back to the name the recipe gave, for a parent's path made absolute on the way
        if isinstance(node, dict):
            return {k: relative(v) for k, v in node.items()}
        if isinstance(node, list):
            return [relative(v) for v in node]
        if isinstance(node, str) and node.startswith(f"{folder}/"):
            return node[len(str(folder)) + 1 :]
        return node

    merged = relative(merged)
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header.append(
        f"# A standalone copy of the shipped recipe {source.stem}: the keys it inherits through extends: "
        f"({', '.join(chain[1:])}) are written out, so every one of them can be edited here."
    )
    body = yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, width=110)
    return "\n".join(header) + "\n" + body, merged


def copy_recipe(name: str, dest: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write an editable copy of shipped recipe ``name`` to ``dest`` (a file, or a folder; default: here).

    The copy keeps the file's text and comments; a recipe that ``extends:`` another is written out whole
    (``_standalone``), so that every key is in the file to edit. Relative paths to shipped files (base
    model configs, the demo's data) are rewritten to those files, so the copy works wherever it is written.
    """
    import re

    import yaml

    source = find_recipe(name)
    if not source.is_file():
        raise OasstError(
            f"{name}: no such recipe file or shipped recipe (list them with: oasst-peft recipes)"
        )
    target = Path(dest) if dest is not None else Path.cwd()
    if target.is_dir() or (dest is not None and str(dest).endswith(("/", "\\"))):
        target = target / source.name
    if target.exists() and not overwrite:
        raise OasstError(f"{target}: already exists; choose another DEST or pass --overwrite")
    text = source.read_text(encoding="utf-8")
    base = source.resolve().parent
    data = yaml.safe_load(text) or {}
    if isinstance(data, dict) and "extends" in data:  # an editable copy holds every key, not a pointer
        text, data = _standalone(source, text)
    for value in sorted(set(_strings(data)), key=len, reverse=True):
        if not value or Path(value).is_absolute() or value.startswith(("package:", "~")):
            continue
        if "/" not in value and not value.endswith((".yaml", ".yml", ".json", ".jsonl", ".jinja")):
            continue
        shipped = base / value
        if not shipped.exists():
            continue
        quoted = re.escape(value)
        text = re.sub(
            rf"(:\s*|-\s+)(['\"]?){quoted}\2(\s*(#.*)?)$", rf"\g<1>\g<2>{shipped}\g<2>\3", text, flags=re.M
        )
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OasstError(
            f"{target}: cannot write the copy ({e.strerror or e}); choose another DEST"
        ) from None
    return target
