"""One learning-rate schedule truth: the recipe's ``lr_scheduler_type``, also under DeepSpeed.

A DeepSpeed JSON with a ``scheduler`` section replaces the Trainer's scheduler with DeepSpeed's, silently
overriding ``lr_scheduler_type``; DeepSpeed's warmup is also logarithmic unless ``warmup_type`` says
``linear`` (Open-Assistant's ZeRO-2 JSON said nothing, so its runs warmed up logarithmically). So:

* the shipped ZeRO JSONs carry no scheduler: transformers builds ``lr_scheduler_type``'s schedule (with
  ``warmup_steps``) on top of DeepSpeed's optimizer, exactly as without DeepSpeed;
* a user's JSON whose scheduler is not the recipe's ``lr_scheduler_type`` is refused in one line;
* ``describe`` gives the line ``train`` prints: the schedule that will actually run.
"""

from __future__ import annotations

import json
from pathlib import Path

from oasst_peft.errors import OasstError

# DeepSpeed scheduler type -> the transformers lr_scheduler_type it follows (with "warmup_type": "linear").
DS_EQUIVALENT = {
    "WarmupDecayLR": "linear",
    "WarmupLR": "constant_with_warmup",
    "WarmupCosineLR": "cosine",
}
SHAPES = {
    "linear": "linear warmup to the peak lr, then linear decay to 0 at the last step",
    "cosine": "linear warmup to the peak lr, then cosine decay to 0 at the last step",
    "constant": "constant lr, no warmup",
    "constant_with_warmup": "linear warmup to the peak lr, then constant",
}


def deepspeed_scheduler(ds_path: str | None) -> dict | None:
    """The ``scheduler`` section of a DeepSpeed JSON, or None (no DeepSpeed, or no scheduler in it)."""
    if not ds_path:
        return None
    try:
        config = json.loads(Path(ds_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OasstError(f"deepspeed_config: cannot read {ds_path} as JSON ({e})") from None
    section = config.get("scheduler") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else None


def check(recipe, ds_path: str | None) -> None:
    """Refuse a DeepSpeed scheduler that is not the schedule ``lr_scheduler_type`` names."""
    section = deepspeed_scheduler(ds_path)
    if section is None:
        return
    kind = str(section.get("type"))
    warmup = (section.get("params") or {}).get("warmup_type", "log")
    wanted = recipe.lr_scheduler_type
    equivalent = DS_EQUIVALENT.get(kind)
    if equivalent == wanted and warmup == "linear":
        return
    if equivalent is None:
        why = f"its scheduler {kind} has no lr_scheduler_type equivalent"
    elif warmup != "linear":
        why = f'its scheduler {kind} warms up logarithmically (no "warmup_type": "linear")'
    else:
        why = f"its scheduler {kind} follows lr_scheduler_type: {equivalent}"
    raise OasstError(
        f"deepspeed_config: {ds_path}: {why}, but the recipe says lr_scheduler_type: {wanted}; delete the JSON's "
        "scheduler section so that lr_scheduler_type decides (the shipped zero2/zero3 JSONs have none)"
    )


def describe(recipe, ds_path: str | None) -> str:
    """The line ``train`` prints: which schedule runs, who builds it, its warmup."""
    kind = recipe.lr_scheduler_type
    shape = SHAPES.get(kind, "see transformers' get_scheduler")
    section = deepspeed_scheduler(ds_path)
    who = f"DeepSpeed {section.get('type')} from {Path(ds_path).name}" if section else "transformers"
    return f"schedule: {kind} ({who}): {shape}; warmup_steps {recipe.warmup_steps}, peak lr {recipe.learning_rate}"


FULL_LR_HINT = 1e-4  # above this, full fine-tuning moves every weight by what LoRA's rates move its adapters


def settle(recipe, ds_path: str | None, say=print) -> None:
    """``check``, then print ``describe``'s line (and a note when full fine-tuning runs at a LoRA rate)."""
    check(recipe, ds_path)
    say(describe(recipe, ds_path))
    if recipe.mode == "full" and recipe.learning_rate > FULL_LR_HINT:
        say(
            f"learning_rate: {recipe.learning_rate:g} is a LoRA rate; full fine-tuning usually runs at 1e-5 to "
            "1e-4 (the seed cards used 6e-6 to 1e-5), e.g. --set learning_rate=1e-5"
        )


def warmup_callback(recipe, say=print):
    """A Trainer callback that says ``warmup_note`` when training begins, once the Trainer has counted the
    run's steps (transformers is imported only here: this module stays light for ``plan`` and the CLI)."""
    from transformers import TrainerCallback

    class WarmupNote(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            note = warmup_note(recipe, state.max_steps)
            if note:
                say(note)
            return control

    return WarmupNote()


def warmup_note(recipe, total_steps: int) -> str | None:
    """A line when the run ends before its warmup does (its learning rate never reaches the peak)."""
    if recipe.lr_scheduler_type == "constant" or recipe.warmup_steps < total_steps:
        return None
    return (
        f"schedule: warmup_steps {recipe.warmup_steps} >= the run's {total_steps} steps: the learning rate "
        f"never reaches its peak {recipe.learning_rate:g}"
    )
