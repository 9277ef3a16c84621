"""A recipe's data, ready to train: its ``datasets:`` mix loaded, split and tokenized (``train``, ``preflight``
and the ``data`` commands all start here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oasst_peft.data.mix import load_mix, skipped_lines
from oasst_peft.data.spec import parse_datasets
from oasst_peft.data.tokenize import tokenize_mix
from oasst_peft.errors import Unavailable

if TYPE_CHECKING:
    from oasst_peft.config import Recipe


def prepare_data(recipe: Recipe, tokenizer, say=print, tolerate_unavailable: bool = False):
    """Load, split and tokenize the recipe's mix. Returns (TokenizedMix, list of unavailable-source lines)."""
    specs = parse_datasets(recipe.datasets, recipe.recipe_dir)
    unavailable: list[str] = []
    try:
        mix = load_mix(specs, seed=recipe.seed)
    except Unavailable:
        if not tolerate_unavailable:
            raise
        # Find which sources cannot be reached from here (the hub while offline; a broken local file
        # still fails) and build the mix from the rest.
        usable = []
        for spec in specs:
            try:
                load_mix([spec], seed=recipe.seed)
            except Unavailable as e:
                unavailable.append(str(e))
                continue
            usable.append(spec)
        if not usable:
            return None, unavailable
        mix = load_mix(usable, seed=recipe.seed)
    for line in skipped_lines(mix):  # a few bad rows are skipped, never silently
        say(line)
    tokenized = tokenize_mix(
        mix,
        tokenizer,
        max_length=recipe.max_length,
        excess_length=recipe.excess_length,
        cache_dir=recipe.cache_dir,
    )
    return tokenized, unavailable
