"""The run record, ``oasst_run.json``: what ``train`` tells ``sample``, ``merge`` and stock loaders about a run.

One typed owner for the file: ``RunRecord.write(folder)`` and ``RunRecord.read(folder)``. Only the standard
library is imported here, so ``merge_tools`` can read records without the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RUN_RECORD = "oasst_run.json"
RECIPE_RECORD = "oasst_recipe.yaml"


class RunRecordError(ValueError):
    """``oasst_run.json`` exists but cannot be read."""


@dataclass
class RunRecord:
    """The facts of a finished run (see the module docstring)."""

    base_model: str | None = None
    base_kind: str = "dir"  # dir | gguf | hub
    base_package: str | None = None  # "package:pkg/file" as the recipe named it: found again in a new venv
    mode: str = "full"
    dtype: str = "fp32"
    eot_token: str | None = None
    eot_token_id: int | None = None
    pad_token_id: int | None = None
    base_vocab_rows: int | None = None
    vocab_rows: int | None = None
    trainable_token_ids: list[int] = field(default_factory=list)
    base_signature: dict | None = None  # the base embedding's norms (merge_tools.signature), before resize
    command: list[str] = field(default_factory=list)
    bnb_4bit: dict | None = None  # qlora: quant_type, double_quant, compute_dtype, blocksize
    deepspeed_config: str | None = None  # the DeepSpeed JSON the run used, as a path

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None or k not in ("bnb_4bit", "deepspeed_config")}

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise RunRecordError("not a JSON object")
        return cls(**{k: v for k, v in data.items() if k in known})

    def base_location(self) -> str | None:
        """Where the base is now: the recorded path, or, when a rebuilt environment moved an installed
        package's file, the same ``package:`` file found again."""
        if self.base_package and self.base_model and not Path(self.base_model).exists():
            from oasst_peft.errors import OasstError
            from oasst_peft.model_info import resolve_model_source

            try:
                return resolve_model_source(self.base_package).location
            except OasstError:
                return self.base_model  # the caller says the base is not there
        return self.base_model

    def write(self, folder: Path) -> Path:
        path = Path(folder) / RUN_RECORD
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record in ``folder``, None when there is none; ``RunRecordError`` when it is unreadable."""
        path = Path(folder) / RUN_RECORD
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise RunRecordError(f"{path}: unreadable run record ({e})") from None
