"""The flash-attention gate: flash_attention_2 only where it will load and run, else sdpa, said in one line.

Flash attention is used when the recipe asks for it (``use_flash_attention: true``) and all of these hold:

* a CUDA GPU, and transformers' own ``is_flash_attn_2_available()`` (the flash-attn distribution, >= 2.3.3);
* compute capability >= 8.0 (Ampere or newer): flash-attn 2 has no kernels for V100 (7.0) or T4 (7.5);
* fp16 or bf16 training;
* ``flash_attn`` imports: a build against another torch or CUDA fails at import (an undefined symbol),
  which would otherwise surface as a traceback from inside ``from_pretrained``.

Otherwise the run uses sdpa and says why in one line.
"""

from __future__ import annotations

import importlib
import importlib.util

MIN_CAPABILITY = (8, 0)
INSTALL_HINT = "pip install -e '.[flash]'"


def cuda_capability() -> tuple[int, int] | None:
    """The first visible GPU's compute capability (major, minor), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))


def transformers_accepts_flash() -> bool:
    """transformers' own check: the flash-attn distribution is installed, recent enough, on CUDA."""
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def import_error() -> str | None:
    """Why ``flash_attn`` does not import (first line of the error), or None when it does."""
    try:
        module = importlib.import_module("flash_attn")
        getattr(module, "flash_attn_func")  # noqa: B009 - the kernel entry point transformers calls
    except Exception as e:  # ImportError, OSError (undefined symbol), AttributeError: a broken build
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
    return None


def flash_gate(dtype: str) -> tuple[str, str]:
    """(``flash_attention_2`` or ``sdpa``, the reason) for a run in ``dtype`` on this host."""
    installed = importlib.util.find_spec("flash_attn") is not None
    capability = cuda_capability()
    if not installed:
        return "sdpa", f"flash-attn is not installed ({INSTALL_HINT})"
    if capability is None:
        return "sdpa", "no CUDA GPU"
    if not transformers_accepts_flash():
        return "sdpa", "transformers does not accept this flash-attn install (it needs flash-attn >= 2.3.3)"
    major, minor = capability
    if capability < MIN_CAPABILITY:
        return "sdpa", (
            f"this GPU has compute capability {major}.{minor}; flash-attn 2 needs 8.0 or newer (Ampere+, "
            "not V100 or T4)"
        )
    if dtype not in ("fp16", "bf16"):
        return "sdpa", "flash attention needs fp16/bf16"
    broken = import_error()
    if broken:
        return "sdpa", f"flash-attn is installed but does not import ({broken}); reinstall it for this torch"
    return "flash_attention_2", f"flash-attn installed, CUDA GPU with compute capability {major}.{minor}"


def pick(recipe, say=print) -> str | None:
    """The attention implementation for ``recipe`` (None: the model's default), with its one line."""
    if not recipe.use_flash_attention:
        return None
    attn, why = flash_gate(recipe.dtype)
    say(f"attention: {attn} ({why})" if attn == "flash_attention_2" else f"attention: sdpa, because {why}")
    return attn
