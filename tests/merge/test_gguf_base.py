"""A run trained on a .gguf base merges from the base's dequantized safetensors copy, the one training read.

The base here is a tiny merged Llama (it has the oasst tokens ``oasst_peft.export`` requires) exported to
GGUF (f32); the cache lives in a temp
``OASST_PEFT_CACHE``. Dequantizing the GGUF is made to fail after the cache exists, so any second
dequantize (by the merge or by ``--verify``) would show.
"""

from __future__ import annotations

import json
import shutil

import pytest

import oasst_peft.gguf_cache as gguf_cache
from merge_tools import MergeError, merge
from oasst_peft.export import export_gguf
from tests.merge.runs import make_base, make_run

quiet = {"say": lambda _m: None}


def _gguf_run(tmp_path, monkeypatch):
    """(gguf file, run dir) for a LoRA run whose records name the .gguf as its base, as training writes them."""
    monkeypatch.setenv("OASST_PEFT_CACHE", str(tmp_path / "cache"))
    first = make_run(tmp_path, make_base(tmp_path, "llama"), "first", steps=1)
    merge(first, tmp_path / "first-merged", verify=False, **quiet)
    gguf = tmp_path / "base.gguf"
    export_gguf(tmp_path / "first-merged", gguf, qtype="f32", modelfile=False, **quiet)
    cached = gguf_cache.cached_model_dir(gguf)  # what training from the .gguf does first
    run = make_run(tmp_path, cached, "gguf-lora")
    record = json.loads((run / "oasst_run.json").read_text())
    record.update(base_model=str(gguf), base_kind="gguf")
    (run / "oasst_run.json").write_text(json.dumps(record))
    return gguf, run


def test_a_gguf_base_is_read_from_its_cached_copy_not_dequantized_again(tmp_path, monkeypatch):
    gguf, run = _gguf_run(tmp_path, monkeypatch)

    def no_second_dequantize(src, out):
        raise AssertionError(f"{src} dequantized again")

    monkeypatch.setattr(gguf_cache, "_dequantize", no_second_dequantize)
    lines = []
    report = merge(run, tmp_path / "merged", verify=True, say=lines.append)
    assert report.verify is not None and report.verify.passed, lines
    assert report.base == str(gguf.resolve()) and report.merged_modules > 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # a loader-ready config, not a GGUF-load dump


def test_without_a_cached_copy_the_merge_makes_it_once(tmp_path, monkeypatch):
    gguf, run = _gguf_run(tmp_path, monkeypatch)
    shutil.rmtree(gguf_cache.cache_dir_for(gguf))
    made = []
    real = gguf_cache._dequantize
    monkeypatch.setattr(gguf_cache, "_dequantize", lambda src, out: (made.append(src), real(src, out)))
    lines = []
    report = merge(run, tmp_path / "merged", verify=True, say=lines.append)
    assert report.verify.passed and len(made) == 1
    assert any(line.startswith("gguf: dequantizing base.gguf once") for line in lines), lines
    assert gguf_cache.cached_if_present(gguf) is not None


def test_a_gguf_base_that_is_not_a_file_is_one_line(tmp_path, monkeypatch):
    gguf, run = _gguf_run(tmp_path, monkeypatch)
    gguf.unlink()
    with pytest.raises(MergeError, match="base"):
        merge(run, tmp_path / "merged", **quiet)
