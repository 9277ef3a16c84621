"""``peft.target_modules`` checked against the base's module names before any data or weight is loaded.

peft reports a target that matches nothing only after the weights are loaded (and the tokenized
cache written). The base's config alone gives its module names: the model is built on the meta
device (no memory, no weights) and the targets are matched as peft matches them: a string is a
regular expression over full module names, a list holds name suffixes.
"""

from __future__ import annotations

import re

from oasst_peft.errors import OasstError, Unavailable, did_you_mean, shown


def named_modules(config) -> tuple[dict[str, object], str | None]:
    """Full name -> module of the model ``config`` describes (built on the meta device), and the name of
    its output projection (``lm_head``, ``embed_out``, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    modules = {name: module for name, module in model.named_modules() if name}
    return modules, next((n for n, m in modules.items() if m is head), None)


def _matched(target: str, names, regex: bool) -> list[str]:
    if regex:
        return [n for n in names if re.fullmatch(target, n)]
    return [n for n in names if n == target or n.endswith("." + target)]


def matches(targets: str | list[str], names: list[str]) -> bool:
    if isinstance(targets, str):
        return bool(_matched(targets, names, regex=True))
    return any(_matched(t, names, regex=False) for t in targets)


def _adaptable() -> tuple[type, ...]:
    """The layer types peft's LoRA wraps (transformers' Conv1D is GPT-2's linear layer)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def check_target_modules(recipe) -> None:
    """One line when a LoRA target of the recipe matches no module of its base, or a module LoRA cannot
    wrap (also checks the base's config)."""
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
    modules, head = named_modules(config)
    kinds = _adaptable()
    names = list(modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if "." in n and isinstance(m, kinds)})
    some = f"use all-linear or some of: {', '.join(leaves[:20])}"
    wanted = [targets] if isinstance(targets, str) else list(targets)
    for target in wanted:
        found = _matched(target, names, regex=isinstance(targets, str))
        if not found and isinstance(targets, str) and target in leaves:
            raise OasstError(
                f"peft.target_modules: the string '{shown(target)}' is a regular expression over full module "
                f"names (such as {next(n for n in names if n.endswith('.' + target))}), so it matches none; "
                f"write a list, [{shown(target)}], for module names"
            )
        if not found:
            what = shown(targets) if isinstance(targets, str) else f"'{shown(target)}'"
            raise OasstError(
                f"peft.target_modules: {what} matches no module of {recipe.model_name}"
                f"{did_you_mean(str(target), leaves)}; {some}"
            )
        if head in found:  # TRL refuses it after the weights load; the new tokens' rows train without it
            raise OasstError(
                f"peft.target_modules: '{shown(target)}' matches the output projection {head}, which TRL does not "
                "let LoRA adapt; leave it out (the rows of the added tokens train through peft.train_new_tokens)"
            )
        wrong = [n for n in found if not isinstance(modules[n], kinds)]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            inner = sorted(
                {
                    c.rsplit(".", 1)[-1]
                    for c in names
                    if c.startswith(wrong[0] + ".") and isinstance(modules[c], kinds)
                }
            )
            inside = f"; name the layers inside it instead: {', '.join(inner)}" if inner else f"; {some}"
            raise OasstError(
                f"peft.target_modules: '{shown(target)}' matches {wrong[0]}, a {kind}, which LoRA cannot "
                f"adapt (only Linear, Embedding and Conv layers){inside}"
            )
