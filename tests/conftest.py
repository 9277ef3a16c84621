"""Every test runs offline: nothing may reach a model or dataset hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Shared tiny fixtures: build these instead of importing helpers from another test module.
import pytest  # noqa: E402


@pytest.fixture
def tiny_tokenizer():
    """A small GPT-NeoX-style tokenizer (tests/tiny.py)."""
    from tests.tiny import make_tokenizer

    return make_tokenizer("neox")


@pytest.fixture
def tiny_base_dir(tmp_path, tiny_tokenizer):
    """A folder holding a random tiny GPT-NeoX base model and its tokenizer, as a user's model folder."""
    from tests.tiny import make_model

    base = tmp_path / "base"
    make_model("gpt_neox", tiny_tokenizer, hidden=64).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    return base


@pytest.fixture
def tiny_model(tiny_base_dir):
    """The tiny base model, loaded from ``tiny_base_dir``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_base_dir):
    """A validated fp32 recipe on the tiny base with a small messages-format data file."""
    import json

    from oasst_peft.config import recipe_from_dict

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} plus two"},
                {"role": "assistant", "content": f"{i + 2}"},
            ]
        }
        for i in range(12)
    ]
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return recipe_from_dict(
        {
            "model_name": str(tiny_base_dir),
            "dtype": "fp32",
            "max_length": 64,
            "warmup_steps": 0,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "eval_steps": 0,
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "datasets": [{"chat": {"data_files": str(data), "format": "messages"}}],
        }
    )
