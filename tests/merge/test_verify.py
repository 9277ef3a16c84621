"""``--verify``: fixed token ids without a tokenizer, narrower output dtypes, and a wrong merge caught."""

from __future__ import annotations

import pytest

from merge_tools import MergeError, format_report, merge
from tests.merge.runs import make_base, make_run
from tests.tiny import save_bare_llama


def _bare_adapter(tmp_path):
    """A tiny Llama saved with no tokenizer files, and a peft LoRA on it whose B is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_bare_llama(tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    return base, adapter


def test_verify_without_a_tokenizer_compares_on_fixed_token_ids(tmp_path):
    base, adapter = _bare_adapter(tmp_path)
    lines = []
    report = merge(adapter, tmp_path / "merged", base=base, verify=True, say=lines.append)
    assert report.verify is not None and report.verify.passed and report.verify.positions == 16 + 24 + 32
    assert report.verify.max_abs_diff < 1e-4 and report.verify.top1_agreement == 1.0
    assert "inputs: fixed token ids (the merged folder has no tokenizer)" in format_report(report)
    assert any("no tokenizer found" in ln or "tokenizer: none found" in ln for ln in lines)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_narrower_output_dtype_is_held_against_the_reference_rounded_to_it(tmp_path, dtype):
    base, adapter = _bare_adapter(tmp_path)
    report = merge(adapter, tmp_path / "merged", base=base, dtype=dtype, verify=True, say=lambda _m: None)
    v = report.verify
    assert v.passed and v.dtype == "fp32", v.line()
    assert v.max_abs_diff < 1e-4 < v.rounding, v.line()  # rounding costs something; the merge adds nothing
    assert f"merged by peft and rounded to {dtype}" in v.line() and f"rounding to {dtype} alone" in v.line()


def test_a_qlora_merge_saved_in_bf16_is_held_against_the_nf4_reference_rounded_to_bf16(tmp_path):
    run = make_run(tmp_path, make_base(tmp_path, "llama"), "qlora", mode="qlora")
    report = merge(run, tmp_path / "merged", dtype="bf16", verify=True, say=lambda _m: None)
    v = report.verify
    assert v.passed and v.max_abs_diff < 1e-4 < v.rounding, v.line()
    assert "4-bit NF4 base + adapter (as trained), merged by peft and rounded to bf16" in v.line()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_merge_fails_verify_and_writes_nothing(tmp_path, monkeypatch, dtype):
    import merge_tools.adapter

    base, adapter = _bare_adapter(tmp_path)
    monkeypatch.setattr(merge_tools.adapter, "lora_scale", lambda alpha, r, rslora=False: 1.05 * alpha / r)
    out = tmp_path / "merged"
    with pytest.raises(
        MergeError, match="verify: the merged logits differ from base [+] adapter by .*nothing was"
    ):
        merge(adapter, out, base=base, dtype=dtype, verify=True, say=lambda _m: None)
    assert not out.exists()
