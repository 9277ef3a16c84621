"""The GGUF -> safetensors cache, the lean adapter of a resized vocab, and the known-harmless warning list."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from safetensors import safe_open

from oasst_peft import gguf_cache, quiet
from oasst_peft.config import load_recipe
from oasst_peft.sample import load_sampler
from oasst_peft.train import train
from tests.tiny import demo_gguf
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("OASST_PEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf_cache.cache_root() == tmp_path / "x" / "oasst-peft"


def test_entries_are_keyed_by_the_file_content(monkeypatch, tmp_path):
    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path / "c"))
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    assert gguf_cache.cache_dir_for(a) == gguf_cache.cache_dir_for(b) != gguf_cache.cache_dir_for(c)
    a.write_bytes(b"changed bytes")  # a new size/mtime: hashed again, not served from memory
    assert gguf_cache.cache_dir_for(a) != gguf_cache.cache_dir_for(b)


def test_a_full_disk_while_writing_the_copy_is_one_line_and_leaves_no_entry(monkeypatch, tmp_path):
    import errno

    from oasst_peft.errors import OasstError

    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path / "c"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF bytes")

    def disk_fills_up(_src, out):  # half a copy written, then the disk is full
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_dequantize", disk_fills_up)
    with pytest.raises(OasstError, match=r"m\.gguf .*No space left on device.*OASST_PEFT_CACHE") as e:
        gguf_cache.cached_model_dir(src)
    assert "\n" not in str(e.value)
    assert gguf_cache.cached_if_present(src) is None
    assert list((tmp_path / "c" / "gguf").iterdir()) == []  # the partial copy is gone


@pytest.mark.slow
def test_demo_gguf_is_dequantized_once_into_plain_safetensors(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    gguf = demo_gguf()
    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path))
    lines: list[str] = []
    entry = gguf_cache.cached_model_dir(gguf, say=lines.append)
    assert len(lines) == 1 and "dequantizing" in lines[0]
    assert gguf_cache.cached_model_dir(gguf, say=lines.append) == entry and len(lines) == 1  # cached
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp folder left behind
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config  # trainable, and QLoRA can quantize it
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with safe_open(str(entry / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        state = direct.state_dict()
        assert names <= set(state) and len(names) >= len(state) - 1  # all but a tied lm_head
        for name in names:
            assert torch.equal(f.get_tensor(name), state[name]), name  # bit for bit what GGUF loading gives


def test_adapter_keeps_added_rows_as_trainable_tokens_not_whole_matrices(tmp_path):
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "chat.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, data, tmp_path / "run", tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(load_recipe(recipe), max_steps=2, say=lambda _m: None)
    assert not [w for w in seen if "vocabulary was not modified" in str(w.message)]
    record = json.loads((tmp_path / "run" / "oasst_run.json").read_text())
    assert record["vocab_rows"] > record["base_vocab_rows"]  # the vocabulary was modified
    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("trainable_tokens" in k for k in keys)
    assert not any(k.endswith(("embed_in.weight", "embed_out.weight")) for k in keys)
    # Loaded back (and merged in memory), the added rows are the trained ones, not a fresh random init.
    import torch

    merged = load_sampler(tmp_path / "run")
    kept = load_sampler(tmp_path / "run", merge=False)
    x = torch.tensor([list(range(record["base_vocab_rows"] - 3, record["base_vocab_rows"] + 3))])
    with torch.no_grad():
        assert torch.allclose(merged.model(x).logits, kept.model(x).logits, atol=1e-5)
    assert merged.info["adapter_merged"] and not kept.info["adapter_merged"]


def test_harmless_warnings_are_hidden_and_others_still_show():
    assert all(h.why and len(h.why) > 40 for h in quiet.HARMLESS)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        try:
            for h in quiet.HARMLESS:
                if h.category is not None:
                    text = h.message.replace("\\", "").replace(".*", "x")
                    module = h.module.replace("\\", "")
                    warnings.warn_explicit(text, h.category, "f.py", 1, module=module)
            warnings.warn_explicit("'pin_memory' argument is set", UserWarning, "f.py", 1, module="my.module")
            warnings.warn("something else went wrong", UserWarning, stacklevel=1)
        finally:
            quiet.uninstall()
    assert [str(w.message) for w in seen] == ["'pin_memory' argument is set", "something else went wrong"]


def test_harmless_log_records_are_dropped_and_others_kept(caplog):
    quiet.install()
    try:
        with caplog.at_level(logging.INFO):
            logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
            logging.getLogger("DeepSpeed").warning("ZeRO stage 3 is on")
            mlflow = logging.getLogger("mlflow.store.db.utils")
            mlflow.info("Creating initial MLflow database tables...")
            mlflow.info("Updating database tables")
            mlflow.info("Migrating the store")
    finally:
        quiet.uninstall()
    assert [r.getMessage() for r in caplog.records] == ["ZeRO stage 3 is on", "Migrating the store"]


def test_a_cold_cache_trains_the_same_run_as_a_warm_one(monkeypatch, tmp_path):
    """Making the cached copy must not draw from the seeded RNG that then gives LoRA and new rows their init."""
    import torch
    from safetensors.torch import load_file

    from merge_tools import merge
    from oasst_peft.export import export_gguf
    from tests.merge.runs import make_base, make_run

    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path / "cache"))
    hush = {"say": lambda _m: None}
    first = make_run(tmp_path, make_base(tmp_path, "llama"), "first", steps=1)  # a base with the oasst tokens
    merge(first, tmp_path / "first-merged", verify=False, **hush)
    gguf = tmp_path / "base.gguf"
    export_gguf(tmp_path / "first-merged", gguf, qtype="f32", modelfile=False, **hush)
    data = write_conversations(tmp_path / "c.jsonl")
    adapters = []
    for name in ("cold", "warm"):
        d = recipe_dict(gguf, data, tmp_path / name, tmp_path / "tok", max_steps=2)
        train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", d)), say=lambda _m: None)
        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
        if name == "cold":
            assert gguf_cache.cached_if_present(gguf) is not None
    cold, warm = adapters
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    (tmp_path / "cache").rename(tmp_path / "old-cache")
    gguf_cache.cached_model_dir(gguf)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_library_call_hides_the_harmless_messages_for_its_duration_only(caplog):
    quiet.uninstall()  # as in a fresh process that never ran the CLI
    harmless = next(h for h in quiet.HARMLESS if h.category is FutureWarning)
    text, module = harmless.message.replace("\\", ""), harmless.module.replace("\\", "")

    @quiet.hides_harmless
    def call():
        warnings.warn_explicit(text, FutureWarning, "f.py", 1, module=module)
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        warnings.warn("the user's own", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        call()
        assert [str(w.message) for w in seen] == ["the user's own"] and not caplog.records
        warnings.warn_explicit(text, FutureWarning, "f.py", 1, module=module)  # after the call: shown again
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
    assert [str(w.message) for w in seen] == ["the user's own", text]
    assert [r.getMessage() for r in caplog.records] == ["Setting accelerator to CPU. If you have GPU ..."]
