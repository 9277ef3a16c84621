"""The valid ranges and names of recipe keys that pydantic's types alone do not bound (used by recipe_schema.py)."""

from __future__ import annotations

import math

# Bounds of the numeric keys the validators below do not cover: (low, high, low is open, high is open).
# NaN and infinities are refused everywhere; None passes where the key allows it.
STEPS = 10**9
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "weight_decay": (0, 1, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, 1, True, True),
    "max_grad_norm": (0, 1e4, False, False),
    "max_length": (16, 2**20, False, False),
    "warmup_steps": (0, STEPS, False, False),
    "eval_steps": (0, STEPS, False, False),
    "save_steps": (0, STEPS, False, False),
    "logging_steps": (1, STEPS, False, False),
    "num_train_epochs": (0, 1e4, True, False),
    "per_device_train_batch_size": (1, 2**16, False, False),
    "per_device_eval_batch_size": (1, 2**16, False, False),
    "gradient_accumulation_steps": (1, 2**16, False, False),
    "save_total_limit": (1, 10**6, False, False),
    "pad_vocab_multiple": (1, 4096, False, False),
    "seed": (0, 2**32, False, True),
}
PEFT_RANGES = {"r": (1, 4096, False, False), "alpha": (0, 1e6, True, False)}
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
QUANT_STORAGE = ("float16", "bfloat16", "float32", "uint8")


def check_range(name: str, v, ranges=None):
    """``v`` within the bounds of ``name`` (see RANGES), else a ValueError saying the bounds."""
    if v is None:
        return v
    lo, hi, lo_open, hi_open = (ranges or RANGES)[name]
    ok = math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"must be {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi:g}")
    return v
