"""``peft.target_modules`` checked against the base's module names before any data or weight is loaded.

peft reports a target that matches nothing only after the weights are loaded (and the tokenized
cache written). The base's config alone gives its module names: the model is built on the meta
device (no memory, no weights) and the targets are matched as peft matches them: a string is a
regular expression over full module names, a list holds name suffixes.
"""

from __future__ import annotations

import re

from oasst_peft.errors import OasstError, Unavailable, shown


def module_names(config) -> list[str]:
    """Full names of the modules of the model ``config`` describes (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def matches(targets: str | list[str], names: list[str]) -> bool:
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith("." + t) for t in targets for n in names)


def check_target_modules(recipe) -> None:
    """One line when the recipe's LoRA targets match no module of its base (also checks the base's config)."""
    from oasst_peft.model_info import load_model_config

    try:
        config = load_model_config(recipe.model_name, recipe.recipe_dir, recipe.trust_remote_code)
    except Unavailable:
        return  # a hub model while offline: the load reports it (a dry run notes it)
    targets = recipe.peft.target_modules if recipe.peft else None
    if recipe.mode == "full" or targets in (None, "all-linear"):
        return
    try:
        re.compile(targets) if isinstance(targets, str) else None
    except re.error as e:
        raise OasstError(
            f"peft.target_modules: '{shown(targets)}' is not a valid regular expression ({e})"
        ) from None
    names = module_names(config)
    if not matches(targets, names):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "." in n})
        raise OasstError(
            f"peft.target_modules: {shown(targets)} matches no module of {recipe.model_name}; use all-linear "
            f"or some of: {', '.join(leaves[:20])}"
        )
