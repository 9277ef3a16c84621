"""Seed recipes keep the cards' batches; every run says conversations per step and steps per epoch (issue 12 item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oasst_peft import speed
from oasst_peft.batches import batch_line
from oasst_peft.config import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# Conversations per optimizer step per GPU in each card's config (per device x accumulation).
CARDS = {"pythia12b-sft1": 2 * 4, "pythia12b-sft4": 4 * 2, "stablelm7b": 4 * 2, "bloom-zh-3b": 1 * 32}


@pytest.mark.parametrize("seed", sorted(CARDS))
@pytest.mark.parametrize("variant", ["", "-lora", "-qlora"])
def test_seed_recipes_train_the_cards_conversations_per_step_even_with_flash_attention(seed, variant):
    recipe = load_recipe(RECIPES / f"{seed}{variant}.yaml")
    assert recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps == CARDS[seed]
    # On a GPU with flash-attn the seeds would pack under ``packing: auto``: a micro-batch row is then a pack.
    batching = speed.choose_batching(recipe, "flash_attention_2")
    assert not batching.packing, batching.line()


def test_the_batch_line_counts_conversations_and_steps():
    assert batch_line(100, 13, 4, 2, 2, packed=False) == (
        "batches: 16 conversations per optimizer step (4 per device x 2 accumulation x 2 process(es)); "
        "7 optimizer steps per epoch of 100 conversations"
    )
    line = batch_line(100, 4, 2, 1, 1, packed=True)
    assert (
        line.startswith("batches: packed, 2 rows per optimizer step") and "about 25.0 conversations" in line
    )
    assert "4 optimizer steps per epoch" in line


def test_every_run_prints_its_batches_at_start(tmp_path):
    from oasst_peft.train import train
    from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl", n=12)
    d = recipe_dict(base, data, tmp_path / "run", tmp_path / "cache", gradient_accumulation_steps=2)
    d.update(per_device_train_batch_size=2)
    lines: list[str] = []
    train(load_recipe(write_recipe(tmp_path / "r.yaml", d)), max_steps=1, say=lines.append)
    assert (
        "batches: 4 conversations per optimizer step (2 per device x 2 accumulation x 1 process(es)); "
        "3 optimizer steps per epoch of 12 conversations"
    ) in lines
