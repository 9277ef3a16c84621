"""A model folder saved without a tokenizer: ``sample``, ``chat`` and ``export`` say so in one line.

transformers, given such a folder, tries to build a tokenizer from the config and fails with a
multi-line ValueError about sentencepiece and tiktoken, which is not what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_run import run_cli


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    folder = tmp_path_factory.mktemp("bare") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    assert not any(folder.glob("tokenizer*"))
    return folder


@pytest.mark.parametrize("command", ["sample", "chat", "export"])
def test_a_model_without_a_tokenizer_is_one_line(bare_model, tmp_path, command):
    args = [command, str(bare_model)] + (["--gguf", str(tmp_path / "m.gguf")] if command == "export" else [])
    res = run_cli(*args)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1, res.stderr[-2000:]
    assert len(errors) == 1 and "has no tokenizer (no tokenizer.json or tokenizer_config.json)" in errors[0]
    assert "copy the tokenizer files of its base model" in errors[0]
    assert "Traceback" not in res.stderr and "sentencepiece" not in res.stderr
    assert not (tmp_path / "m.gguf").exists()
