"""Whether the Hugging Face Hub is off limits here: the one reading of the offline variables.

huggingface_hub treats ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) as set when its value
is 1, ON, YES or TRUE in any case; anything else, ``0`` and ``false`` included, means online. datasets
adds ``HF_DATASETS_OFFLINE``. This module reads the variables the same way, at call time, so a message
that says "offline" agrees with what the libraries will do.
"""

from __future__ import annotations

import os

_TRUE = {"1", "ON", "YES", "TRUE"}


def _is_set(var: str) -> bool:
    return os.environ.get(var, "").upper() in _TRUE


def hub_offline(datasets: bool = False) -> bool:
    """True when the hub must not be contacted (``datasets=True`` also honours HF_DATASETS_OFFLINE)."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    return any(_is_set(name) for name in names)
