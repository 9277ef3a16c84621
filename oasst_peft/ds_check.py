"""A user's DeepSpeed JSON, checked before any weight is loaded: it parses, and its keys have sane shapes.

DeepSpeed and the HF integration report a broken config deep inside ``Trainer`` setup (an
``AttributeError`` on a list, a multi-line mismatch table, an MPI probe for a ``null`` batch size).
``check_deepspeed_json`` says the same in one line naming ``deepspeed_config`` and the key.
"""

from __future__ import annotations

from pathlib import Path

from oasst_peft.boundary import read_json
from oasst_peft.errors import OasstError, shown

FIX = "fix the JSON or use a shipped config (zero2, zero3, zero2-offload, zero3-offload)"
# DeepSpeed key -> the recipe key that must agree with it when it is not "auto".
BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "train_batch_size": None,
}


def check_deepspeed_json(path: str | Path, recipe) -> str:
    """``path`` if its JSON is a usable DeepSpeed config for ``recipe``, else one OasstError line."""
    cfg = read_json(path, "deepspeed_config", FIX)

    def bad(key: str, why: str) -> OasstError:
        return OasstError(f"deepspeed_config: {path}: '{key}' {why} (got {shown(cfg.get(key))!s:.60}); {FIX}")

    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict):
        raise bad("zero_optimization", "must be an object with a 'stage'")
    if zero.get("stage") not in (0, 1, 2, 3):
        raise OasstError(f"deepspeed_config: {path}: zero_optimization.stage must be 0, 1, 2 or 3; {FIX}")
    for key, recipe_key in BATCH_KEYS.items():
        if key not in cfg or cfg[key] == "auto":
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(key, "must be 'auto' or a whole number >= 1")
        if recipe_key is None:
            raise bad(key, "must be 'auto' (it depends on the process count)")
        if value != getattr(recipe, recipe_key):
            raise bad(
                key,
                f"disagrees with the recipe's {recipe_key}: {getattr(recipe, recipe_key)}; set it to 'auto'",
            )
    for key in ("fp16", "bf16", "optimizer", "scheduler"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise bad(key, "must be an object")
    return str(path)


def check_recipe_deepspeed(recipe) -> None:
    """``check_deepspeed_json`` on the recipe's own DeepSpeed JSON (the shipped ones are known good)."""
    from oasst_peft.shipped import DEEPSPEED_DIR, deepspeed_config_path

    path = deepspeed_config_path(recipe.deepspeed_config, recipe.recipe_dir)
    if path is not None and Path(path).parent != DEEPSPEED_DIR:
        check_deepspeed_json(path, recipe)
