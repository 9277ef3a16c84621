"""One entry of the recipe's ``datasets:`` mix, validated: ``DatasetSpec`` and ``parse_datasets``.

An entry is a bare name (``- dolly15k``), ``{name: null}`` or ``{name: {options}}``. Options every
dataset takes: ``val_split``, ``max_val_set``, ``max_train_set``, ``fraction``, ``input_file_path`` /
``data_files``, ``hf_dataset_name``, ``hf_config``, ``manual_seed``, ``on_error``; some loaders take
more (``lang``/``top_k`` for oasst_export, ``context`` for dolly15k, ``format`` for local files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oasst_peft.data.registry import dataset_names, get_dataset_info
from oasst_peft.data.sources import FORMATS
from oasst_peft.errors import OasstError, did_you_mean, shown
from oasst_peft.recipe_yaml import DATASET_PATH_OPTIONS


class DatasetSpec(BaseModel):
    """One dataset of the mix and its options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="registered dataset name, or your own name with a 'format'")
    key: str = Field("", description="unique name in the mix: the name, then name#2 when listed again")
    val_split: float = Field(
        0.05, ge=0.0, lt=1.0, description="share held out for validation (oasst_export: share of trees)"
    )
    max_val_set: int | None = Field(None, ge=0, description="cap on validation conversations (seeded subset)")
    max_train_set: int | None = Field(None, ge=1, description="cap on training conversations (seeded subset)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of training conversations kept (seeded)")
    input_file_path: str | None = Field(None, description="a local file (the Open-Assistant trainer's key)")
    data_files: list[str] | None = Field(
        None, description="local files or globs (jsonl, json, gz, parquet, csv)"
    )
    hf_dataset_name: str | None = Field(None, description="hub id to load instead of the registered one")
    hf_config: str | None = Field(None, description="hub config (subset) name")
    manual_seed: int | None = Field(
        None, description="split seed for this dataset (default: from the recipe seed)"
    )
    on_error: Literal["skip", "fail"] = Field("skip", description="malformed rows: skip and count, or fail")
    lang: list[str] | None = Field(None, description="oasst_export: prompt languages kept (default en)")
    top_k: int | None = Field(None, ge=1, description="oasst_export: keep threads whose assistant ranks < k")
    context: Literal["prompt", "system", "drop"] = Field(
        "prompt", description="dolly15k: context appended to the prompt, as a system turn, or dropped"
    )
    format: Literal["messages", "sharegpt", "alpaca"] | None = Field(
        None, description="schema of local files for a dataset of your own"
    )

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("lang", mode="before")
    @classmethod
    def _lang_list(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list | tuple):
            return [str(x).strip() for x in v if str(x).strip()]
        return v

    def files(self) -> list[str]:
        """The local files given (``input_file_path`` then ``data_files``)."""
        return ([self.input_file_path] if self.input_file_path else []) + list(self.data_files or [])

    def file_key(self) -> str:
        """The recipe key a user sets to point this dataset at local files."""
        return "input_file_path" if self.name == "oasst_export" else "data_files"


COMMON_OPTIONS = (
    "val_split",
    "max_val_set",
    "max_train_set",
    "fraction",
    "input_file_path",
    "data_files",
    "hf_dataset_name",
    "hf_config",
    "manual_seed",
    "on_error",
)
ALL_OPTIONS = tuple(k for k in DatasetSpec.model_fields if k not in ("name", "key"))
_HINTS = {
    "size": "use max_train_set (a number of conversations) or fraction",
    "eval_size": "use max_val_set",
    "mode": "only SFT data is built here",
}


def allowed_options(name: str) -> tuple[str, ...]:
    """Option keys the dataset ``name`` accepts."""
    info = get_dataset_info(name)
    if info is None:  # a dataset of the user's own, read with a generic format
        return (*COMMON_OPTIONS, "format")
    extra = tuple(info.options) + (("format",) if info.convert is not None else ())
    return (*COMMON_OPTIONS, *extra)


def split_entry(item, index: int) -> tuple[str, dict]:
    """One entry of a recipe's ``datasets`` list (a name, or ``{name: {options}}``) as (name, options)."""
    if isinstance(item, str):
        return item.strip(), {}
    if isinstance(item, dict) and len(item) == 1:
        name, opts = next(iter(item.items()))
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise OasstError(
                f"datasets[{index}]: options of '{shown(name)}' must be a mapping like {{val_split: 0.05}}, "
                f"got {type(opts).__name__}"
            )
        return str(name).strip(), dict(opts)
    raise OasstError(
        f"datasets[{index}]: each entry is a dataset name or a one-key mapping {{name: {{options}}}}, "
        f"got {item!r:.80}"
    )


def _resolve(p: str, base_dir: Path) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def parse_spec(name: str, opts: dict, key: str, base_dir: Path) -> DatasetSpec:
    """Validate one entry; unknown names and option keys raise OasstError with the closest valid one."""
    info = get_dataset_info(name)
    if info is None and "format" not in opts:
        known = dataset_names()
        raise OasstError(
            f"datasets: unknown dataset '{shown(name)}'{did_you_mean(name, known)}; known: {', '.join(known)}; "
            f"or read your own files with {{data_files: PATH, format: {'|'.join(FORMATS)}}}"
        )
    allowed = allowed_options(name)
    for opt in opts:
        if opt in allowed:
            continue
        if opt in ALL_OPTIONS:
            users = [n for n in dataset_names() if opt in allowed_options(n)]
            where = f" (it applies to: {', '.join(users)})" if users else ""
            raise OasstError(f"datasets: {shown(key)}: option '{opt}' does not apply to {shown(name)}{where}")
        hint = f" ({_HINTS[opt]})" if opt in _HINTS else did_you_mean(str(opt), allowed)
        raise OasstError(
            f"datasets: {shown(key)}: unknown option '{shown(opt)}'{hint}; options: {', '.join(allowed)}"
        )
    data = dict(opts)
    for k in DATASET_PATH_OPTIONS:
        if isinstance(data.get(k), str):
            data[k] = _resolve(data[k], base_dir)
        elif isinstance(data.get(k), list):
            data[k] = [_resolve(str(p), base_dir) if isinstance(p, str | Path) else p for p in data[k]]
    try:
        return DatasetSpec(name=name, key=key, **data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise OasstError(
            f"datasets: {shown(key)}: {loc}: {err['msg']} (got {err.get('input')!r:.60})"
        ) from None


def parse_datasets(raw: list, base_dir: Path | str) -> list[DatasetSpec]:
    """The recipe's ``datasets:`` list as specs; relative paths resolve against ``base_dir``."""
    if isinstance(raw, str | dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise OasstError("datasets: list at least one dataset (a name or {name: {options}})")
    base = Path(base_dir)
    specs: list[DatasetSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        name, opts = split_entry(item, i)
        if not name:
            raise OasstError(f"datasets[{i}]: empty dataset name")
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        specs.append(parse_spec(name, opts, key, base))
    return specs
