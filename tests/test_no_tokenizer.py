"""A model folder saved without a tokenizer: ``sample``, ``chat`` and ``export`` say so in one line.

transformers, given such a folder, tries to build a tokenizer from the config and fails with a
multi-line ValueError about sentencepiece and tiktoken, which is not what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import save_bare_llama
from tests.tiny_run import run_cli


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory) -> Path:
    folder = save_bare_llama(tmp_path_factory.mktemp("bare") / "model", layers=1)
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
