"""Every per-run decision, made once from the recipe and this machine, before anything loads.

``resolve(recipe)`` returns a frozen ``RunSettings``: the compute dtype (fp32 on a CPU), the dtype the
weights load in, the attention implementation, the DeepSpeed config (path, ZeRO stage, offload), the
gradient-checkpointing default (on for 7B-class models) and the kernel checks. Each decision that is not
simply the recipe's value prints its one line here, once. ``load_model``, batching, ``plan`` and ``train``
take the settings instead of deciding again.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from oasst_peft import schedule
from oasst_peft.config import Recipe
from oasst_peft.errors import OasstError
from oasst_peft.shipped import DeepSpeedSettings, read_deepspeed

# "7B-class and larger": Llama-2-7B has 6.7B parameters, Pythia-6.9B 6.9B.
CHECKPOINTING_MIN_PARAMS = 6.5e9


@dataclass(frozen=True)
class RunSettings:
    """What this run does, decided once (see the module docstring)."""

    mode: str  # full | lora | qlora
    dtype: str  # compute dtype: fp32 | bf16 | fp16
    weights_dtype: str  # the dtype the base weights load in
    attention: str | None  # attn_implementation for from_pretrained (None: transformers' default)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    gradient_checkpointing: bool = False
    local_rank: int = 0
    cuda: bool = False
    lines: tuple[str, ...] = ()  # the decisions said while resolving, in order

    @property
    def deepspeed_path(self) -> str | None:
        return self.deepspeed.path

    @property
    def zero3(self) -> bool:
        return self.deepspeed.zero3

    @property
    def arguments_before_load(self) -> bool:
        """Build the TrainingArguments (process group, rank device, ZeRO-3 config) before the weights load.

        Always, except LoRA/QLoRA under ZeRO-3 without CUDA (the 2-CPU-rank tests): peft 0.21 initialises
        trainable token rows of a ZeRO-3 model on CUDA only (``trainable_tokens/layer.py``), so there the
        weights load whole and DeepSpeed partitions them when the Trainer prepares the model.
        """
        return not (self.zero3 and self.mode != "full" and not self.cuda)

    def device_map(self, mode: str) -> dict | None:
        """Where this rank's weights load (see ``placement``)."""
        return placement(mode, self.zero3, self.local_rank, self.cuda)


def placement(mode: str, zero3: bool, local_rank: int, cuda: bool) -> dict | None:
    """``device_map`` for ``from_pretrained``: QLoRA outside ZeRO-3 loads on this rank's own GPU.

    Without it transformers' bitsandbytes quantizer puts every rank's 4-bit model on the current device,
    which is cuda:0 until the process group is set up. Full and LoRA runs are placed by the Trainer, and
    ZeRO-3 partitions the weights itself, so they load without a device map.
    """
    if mode != "qlora" or zero3 or not cuda:
        return None
    return {"": local_rank}


def effective_dtype(recipe: Recipe, say=print) -> str:
    """The recipe's dtype, or fp32 with one printed line when half precision was asked for on a CPU."""
    import torch

    if recipe.dtype != "fp32" and not torch.cuda.is_available():
        say(f"dtype: {recipe.dtype} asked for, but there is no GPU: training in fp32 on the CPU")
        return "fp32"
    return recipe.dtype


def weights_dtype(mode: str, dtype: str, deepspeed: bool) -> str:
    """The dtype the weights are loaded in for training at compute ``dtype``.

    Full training without DeepSpeed keeps fp32 master weights and runs fp16/bf16 under autocast, as the
    HF Trainer expects (pure half-precision AdamW loses small updates, and fp16 weights cannot be
    unscaled). DeepSpeed keeps its own fp32 master copy, and LoRA/QLoRA train only fp32 adapters.
    """
    return "fp32" if mode == "full" and not deepspeed else dtype


def pick_attention(recipe: Recipe, say=print) -> str | None:
    """flash_attention_2 when asked for and possible (``attention.flash_gate``), else sdpa; one line when asked."""
    from oasst_peft import attention

    return attention.pick(recipe, say=say)


def resolve_gradient_checkpointing(value: bool | None, params: int | None) -> tuple[bool, str | None]:
    """(on/off, the line to print when it was decided here): unset means on for 7B-class models and larger."""
    if value is not None:
        return value, None
    if params is None:
        return False, "gradient_checkpointing: off (unset, and the model size is unknown here)"
    on = params >= CHECKPOINTING_MIN_PARAMS
    size = f"{params / 1e9:.1f}B parameters" if params >= 1e9 else f"{params / 1e6:.1f}M parameters"
    if on:
        return True, f"gradient_checkpointing: on (unset; {size}, 7B-class or larger)"
    return False, f"gradient_checkpointing: off (unset; {size}, below 7B-class)"


def kernel_problems(recipe) -> list[str]:
    """One line per kernel option the recipe asks for that cannot run here."""
    import torch

    problems = []
    if recipe.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                "use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); "
                "or set use_liger_kernel: false"
            )
        elif not torch.cuda.is_available():
            problems.append(
                "use_liger_kernel: Liger's Triton kernels need a CUDA GPU; set use_liger_kernel: false"
            )
    if recipe.use_kernels and importlib.util.find_spec("kernels") is None:
        problems.append(
            "use_kernels: the kernels package is not installed (pip install kernels); or set use_kernels: false"
        )
    return problems


def model_params(recipe) -> int | None:
    """The base model's parameter count from its config alone (shipped seed configs work offline), or None."""
    from oasst_peft.model_info import load_model_config, params_from_config

    try:
        config = load_model_config(recipe.model_name, recipe.recipe_dir, recipe.trust_remote_code)
        return params_from_config(config)
    except OasstError:
        return None


def settle(recipe, say=print, dry_run: bool = False):
    """The recipe with ``gradient_checkpointing`` decided (unset: by model size, said in one line), kernels checked.

    A kernel option that cannot run here is an ``OasstError``; in a dry run it is said instead.
    """
    for problem in kernel_problems(recipe):
        if not dry_run:
            raise OasstError(problem)
        say(f"kernels: unavailable here: {problem}")
    if recipe.gradient_checkpointing is not None:
        return recipe
    on, line = resolve_gradient_checkpointing(None, model_params(recipe))
    say(line)
    return recipe.model_copy(update={"gradient_checkpointing": on})


def resolve(recipe: Recipe, say=print, dry_run: bool = False) -> tuple[Recipe, RunSettings]:
    """Decide everything for a run of ``recipe`` on this machine; each decision's line is said once.

    Returns the recipe with ``gradient_checkpointing`` filled in (the resolved recipe is what gets saved)
    and the ``RunSettings``.
    """
    import torch

    from oasst_peft.ds_check import check_recipe_deepspeed
    from oasst_peft.lora_targets import check_target_modules

    lines: list[str] = []

    def tell(line: str) -> None:
        lines.append(line)
        say(line)

    check_recipe_deepspeed(recipe)  # a user's DeepSpeed JSON, in one line, before anything loads
    deepspeed = read_deepspeed(recipe.deepspeed_config, recipe.recipe_dir)
    schedule.settle(recipe, deepspeed.path, say=tell)  # the schedule that runs; a conflicting JSON refused
    check_target_modules(recipe)  # the base's config and the LoRA targets, before data or weights
    dtype = effective_dtype(recipe, say=tell)
    recipe = settle(recipe, say=tell, dry_run=dry_run)
    attention = pick_attention(recipe, say=tell)
    load_dtype = weights_dtype(recipe.mode, dtype, bool(deepspeed.path))
    if load_dtype != dtype:
        tell(f"full training without DeepSpeed: fp32 master weights, {dtype} autocast")
    settings = RunSettings(
        mode=recipe.mode,
        dtype=dtype,
        weights_dtype=load_dtype,
        attention=attention,
        deepspeed=deepspeed,
        gradient_checkpointing=bool(recipe.gradient_checkpointing),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        cuda=torch.cuda.is_available(),
        lines=tuple(lines),
    )
    return recipe, settings
