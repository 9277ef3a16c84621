"""The memory planner: "does this recipe fit?" for its own settings and for full, LoRA and QLoRA.

``plan_recipe(recipe, gpus, gpu_mem_gib)`` reads the recipe's setup (``recipe_setup``), the model's shape from
its config alone (``model_info``; the seed models' configs ship in ``recipes/base_models/``) and adds up the
terms of ``memory``, for the recipe and for full (ZeRO-0/2/3, with and without CPU offload), LoRA and QLoRA.
Nothing is downloaded and no weights are made. ``format_plan`` prints the table.
"""

from __future__ import annotations

from dataclasses import replace

from oasst_peft.config import Recipe
from oasst_peft.errors import OasstError
from oasst_peft.memory import GIB, Setup, _targets, lora_params, max_micro_batch, memory_terms
from oasst_peft.model_info import ModelShape, load_model_config, model_shape
from oasst_peft.settings import resolve_gradient_checkpointing
from oasst_peft.shipped import DeepSpeedSettings, read_deepspeed


def estimate(shape: ModelShape, setup: Setup, gpu_mem_gib: float) -> dict:
    """One ESTIMATE of the plan JSON (terms in GiB, rounded to 3 decimals)."""
    terms = memory_terms(shape, setup)
    total = sum(terms.values())
    return {
        "mode": setup.mode,
        "zero_stage": setup.zero_stage,
        "offload": setup.offload_optimizer or setup.offload_params,
        "micro_batch": setup.micro_batch,
        "terms_gib": {k: round(v / GIB, 3) for k, v in terms.items()},
        "total_gib": round(total / GIB, 3),
        "fits": total <= gpu_mem_gib * GIB,
        "max_micro_batch": max_micro_batch(shape, setup, gpu_mem_gib),
    }


def comparison_setups(setup: Setup) -> list[Setup]:
    """The recipe's settings in every mode the table compares: full ZeRO-0/2/3 (+ CPU offload), LoRA, QLoRA."""
    base = replace(setup, offload_optimizer=False, offload_params=False)
    return [
        replace(base, mode="full", zero_stage=0),
        replace(base, mode="full", zero_stage=2),
        replace(base, mode="full", zero_stage=2, offload_optimizer=True),
        replace(base, mode="full", zero_stage=3),
        replace(base, mode="full", zero_stage=3, offload_optimizer=True, offload_params=True),
        replace(base, mode="lora", zero_stage=0),
        replace(base, mode="qlora", zero_stage=0),
    ]


def recipe_setup(recipe: Recipe, deepspeed: DeepSpeedSettings | None = None) -> Setup:
    """The Setup a recipe asks for, from its own fields (model-independent ones only).

    ``deepspeed`` is the run's DeepSpeed decision (``RunSettings.deepspeed``); read from the recipe when absent.
    """
    peft = recipe.peft
    if deepspeed is None:
        deepspeed = read_deepspeed(recipe.deepspeed_config, recipe.recipe_dir)
    lora = {}
    if peft is not None:
        targets = peft.target_modules
        lora = dict(
            lora_r=peft.r,
            lora_targets=targets if isinstance(targets, str) else tuple(targets),
            lora_dropout=peft.dropout,
            double_quant=peft.bnb_4bit_use_double_quant,
        )
    return Setup(
        mode=recipe.mode,
        dtype=recipe.dtype,
        micro_batch=recipe.per_device_train_batch_size,
        seq_len=recipe.max_length,
        gradient_checkpointing=bool(recipe.gradient_checkpointing),
        attention="flash" if recipe.use_flash_attention else "sdpa",
        grad_accum=recipe.gradient_accumulation_steps,
        **lora,
        **deepspeed.setup_fields(),
    )


def plan_recipe(recipe: Recipe, gpus: int = 1, gpu_mem_gib: float = 24.0) -> dict:
    """The plan JSON for a recipe: parameter count, the recipe's own estimate, and the comparison estimates.

    The plan is for the GPUs the recipe will run on, so it takes the recipe's dtype as it is (no CPU fallback);
    an unset ``gradient_checkpointing`` is decided by model size, as ``train`` decides it.
    """
    if gpus < 1:
        raise OasstError(f"--gpus: must be >= 1, got {gpus}")
    if not gpu_mem_gib > 0:
        raise OasstError(f"--gpu-mem: must be > 0 GiB, got {gpu_mem_gib}")
    remote = recipe.trust_remote_code
    config = load_model_config(recipe.model_name, recipe.recipe_dir, remote)
    shape = model_shape(config, name=recipe.model_name, trust_remote_code=remote)
    on, _ = resolve_gradient_checkpointing(recipe.gradient_checkpointing, shape.params)
    setup = replace(recipe_setup(recipe), gpus=gpus, gradient_checkpointing=on)
    from oasst_peft.adapter_file import planned_bytes

    targets = _targets(shape, setup.lora_targets)
    adapter = planned_bytes(
        lora_params(targets, setup.lora_r),
        sum(t.count for t in targets),
        setup.new_tokens,
        shape.hidden,
        shape.tied,
    )
    return {
        "model": {"name": recipe.model_name, "params": shape.params},
        "gpus": gpus,
        "gpu_mem_gib": float(gpu_mem_gib),
        "recipe": estimate(shape, setup, gpu_mem_gib),
        "estimates": [estimate(shape, s, gpu_mem_gib) for s in comparison_setups(setup)],
        "adapter": None if setup.mode == "full" else {"bytes": adapter, "token_rows": setup.new_tokens},
    }


TERM_NAMES = {"not_live_together": "not concurrent"}


def _gib(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def _label(est: dict) -> str:
    if est["mode"] != "full":
        return est["mode"]
    return f"full z{est['zero_stage']}" + (" off" if est["offload"] else "")


def format_plan(plan: dict, console=None):
    """Print the plan as a table (GiB per GPU; a column per estimate) and return the rich renderable."""
    from rich import box
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

    columns = [("recipe", plan["recipe"])] + [(_label(e), e) for e in plan["estimates"]]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    table.add_column("GiB per GPU", no_wrap=True, min_width=15)
    for label, _ in columns:
        header = label.replace(" ", "\n", 1) if label.startswith("full") else label
        table.add_column(header, justify="right", no_wrap=True, min_width=6)
    for term in plan["recipe"]["terms_gib"]:
        name = TERM_NAMES.get(term, term)
        table.add_row(name, *(_gib(est["terms_gib"][term]) for _, est in columns))
    table.add_row("total", *(f"[bold]{_gib(est['total_gib'])}[/]" for _, est in columns))
    table.add_row("fits", *(("yes" if est["fits"] else "[red]no[/]") for _, est in columns))
    table.add_row("max micro-batch", *(str(est["max_micro_batch"]) for _, est in columns))
    rec = plan["recipe"]
    head = Text(
        f"{plan['model']['name']}: {plan['model']['params'] / 1e9:.3f} B parameters. Per GPU on "
        f"{plan['gpus']} GPU(s) of {plan['gpu_mem_gib']:g} GiB at micro-batch {rec['micro_batch']}; "
        f"the recipe runs {_label(rec)}."
    )
    parts = [head, table]
    if plan.get("adapter"):
        a = plan["adapter"]
        parts.append(
            Text(
                f"adapter on disk: {a['bytes'] / 2**20:.1f} MiB (the LoRA weights and about {a['token_rows']} trained "
                "token rows; the embedding itself is not stored)"
            )
        )
    renderable = Group(*parts)
    (console or Console()).print(renderable)
    return renderable
