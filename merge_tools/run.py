"""What was passed to ``merge``: a training run, an adapter folder, a full model, or a DeepSpeed ZeRO checkpoint.

``resolve_input(path)`` reads what is there (``adapter_config.json``, ``global_step*/``, ``config.json``)
and the run's records (``oasst_run.json``, ``oasst_recipe.yaml``, in the folder or, for a
``checkpoint-N``, in its run folder) without loading any weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merge_tools.errors import MergeError
from oasst_peft.run_record import RECIPE_RECORD, RunRecord, RunRecordError


@dataclass
class RunInput:
    """The merge's input, classified."""

    path: Path
    kind: str  # adapter | full | zero
    record: dict | None
    recipe: dict | None
    recipe_text: str | None
    run_dir: Path | None  # where the records were found

    @property
    def mode(self) -> str:
        if self.record and self.record.get("mode"):
            return str(self.record["mode"])
        return "lora" if self.kind == "adapter" else "full"


def is_zero_checkpoint(path: Path) -> bool:
    """A folder holding DeepSpeed's ``global_step*/`` model-state files."""
    return any(p.is_dir() and any(p.glob("*model_states.pt")) for p in path.glob("global_step*"))


def _read_records(folder: Path) -> tuple[dict | None, dict | None, str | None]:
    record = recipe = text = None
    try:
        found = RunRecord.read(folder)
    except RunRecordError as e:
        raise MergeError(str(e)) from None
    record = found.to_dict() if found is not None else None
    yp = folder / RECIPE_RECORD
    if yp.is_file():
        import yaml

        text = yp.read_text(encoding="utf-8")
        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"{yp}: unreadable recipe ({str(e).splitlines()[0]})") from None
        if not isinstance(recipe, dict):
            recipe = None
    return record, recipe, text


def resolve_input(path: str | Path) -> RunInput:
    """Classify ``path`` and read its records."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MergeError(
            f"RUN_OR_ADAPTER: {p} does not exist; point at a training run, adapter or checkpoint folder"
        )
    if not p.is_dir():
        raise MergeError(
            f"RUN_OR_ADAPTER: {p} is a file; point at a training run, adapter or checkpoint folder"
        )
    run_dir = None
    record = recipe = text = None
    for folder in (p, p.parent):
        record, recipe, text = _read_records(folder)
        if record or recipe:
            run_dir = folder
            break
    if (p / "adapter_config.json").is_file():
        kind = "adapter"
    elif is_zero_checkpoint(p):
        kind = "zero"
    elif (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        kind = "full"
    elif (p / "config.json").is_file() and (any(p.glob("*.bin")) or any(p.glob("*.pt"))):
        raise MergeError(
            f"{p}: the model is stored as pickle (.bin) files, which are refused; re-save it as safetensors"
        )
    else:
        ckpts = sorted(
            p.glob("checkpoint-*"),
            key=lambda c: int(c.name.rsplit("-", 1)[-1]) if c.name.rsplit("-", 1)[-1].isdigit() else -1,
        )
        if ckpts:
            raise MergeError(
                f"{p}: no final adapter or model (the run did not finish); merge a checkpoint instead, e.g. {ckpts[-1]}"
            )
        raise MergeError(
            f"{p}: neither an adapter (adapter_config.json), a model (config.json + safetensors) nor a ZeRO "
            "checkpoint (global_step*/); point at a training run's output folder"
        )
    return RunInput(path=p, kind=kind, record=record, recipe=recipe, recipe_text=text, run_dir=run_dir)


def check_input_files(run_or_adapter: str | Path) -> None:
    """The input folder's JSON files and safetensors headers, before anything loads (one line if broken)."""
    from oasst_peft.errors import OasstError
    from oasst_peft.model_files import check_folder

    try:
        check_folder(run_or_adapter, key="merge")
    except OasstError as e:
        raise MergeError(str(e)) from None
