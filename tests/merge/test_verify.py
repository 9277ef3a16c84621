"""``--verify`` on a model saved without a tokenizer: fixed token ids stand in for the probe conversations."""

from __future__ import annotations

from merge_tools import format_report, merge
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
