"""On a CUDA GPU: the NF4 round trip of the merge is bit-identical to what 4-bit loading on the GPU holds (bf16).

QLoRA on a GPU quantizes the base on the device, in the training dtype (bf16/fp16). The merge's
``nf4_roundtrip`` must give the very weights ``Linear4bit`` dequantizes there, whether the merge
itself runs on the CPU or the GPU; and a bf16 QLoRA merge verifies against the 4-bit GPU model.
"""

from __future__ import annotations

import json

import pytest
import torch

from merge_tools import merge
from merge_tools.lora import nf4_roundtrip
from tests.gpu import requires_gpu
from tests.merge.runs import make_base, make_run

pytestmark = requires_gpu(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_roundtrip_is_the_same_on_cpu_and_gpu(dtype, double_quant):
    torch.manual_seed(0)
    W = torch.randn(256, 512) * 0.05
    cpu = nf4_roundtrip(W, dtype=dtype, double_quant=double_quant, device="cpu")
    gpu = nf4_roundtrip(W, dtype=dtype, double_quant=double_quant, device="cuda")
    differ = (cpu != gpu).float().mean().item()
    rel = ((cpu - gpu).abs().max() / W.abs().max()).item()
    print(f"{dtype} double_quant={double_quant}: {differ:.3%} of values differ, max relative {rel:.2e}")
    if dtype == torch.bfloat16:  # what QLoRA trains in: bit-identical
        assert torch.equal(cpu, gpu)
    else:  # bnb's kernels round fp16/fp32 (and the double-quant absmax) slightly differently on the two devices
        assert differ < 0.01 and rel < 1e-2


def test_merge_dequantizes_exactly_like_4bit_loading_on_the_gpu(tmp_path):
    import bitsandbytes.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = make_base(tmp_path, "llama")
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=q, dtype=torch.bfloat16, device_map="cuda"
    )
    stored = load_file(base / "model.safetensors")
    n = 0
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            on_gpu = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().cpu()
            ours = nf4_roundtrip(stored[f"{name}.weight"], dtype=torch.bfloat16, device="cpu")
            assert torch.equal(on_gpu, ours), name
            n += 1
    assert n == 14


def test_bf16_qlora_run_merges_and_verifies_on_the_gpu(tmp_path):
    base = make_base(tmp_path, "llama")
    run = make_run(tmp_path, base, "qlora", mode="qlora")  # trained on the CPU in fp32 ...
    record = json.loads((run / "oasst_run.json").read_text())
    record["dtype"] = "bf16"  # ... recorded as a bf16 GPU run: the merge quantizes from bf16
    record["bnb_4bit"]["compute_dtype"] = "bf16"
    (run / "oasst_run.json").write_text(json.dumps(record))
    report = merge(run, tmp_path / "merged", dtype="bf16", verify=True, say=print)
    assert report.verify.passed and report.verify.top1_agreement > 0.95
