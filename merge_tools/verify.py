"""``--verify``: the merged checkpoint's logits against base + adapter as trained, on a few probe conversations.

The reference is the base loaded as training saw it (4-bit NF4 for QLoRA with ``dequantized-nf4``)
with the vocab resized and the adapter applied by peft; the merged folder is loaded with
``from_pretrained``. One model is in memory at a time. The result is the max absolute logit
difference and the top-1 agreement; the merge fails when the difference exceeds a tolerance scaled
by the largest reference logit and set by the least precise dtype the comparison computes in.

A merge saved in a narrower dtype than it is compared in (bf16 or fp16, compared in fp32 on a CPU) is
held against base + adapter merged by peft and rounded to that dtype, weight by weight: what a correct
merge saved in that dtype computes. Rounding alone can move a deep model's logits by more than any fixed
tolerance, and that is the dtype's cost, not the merge's; the line reports it separately.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.errors import MergeError
from merge_tools.io import DTYPE_NAMES, human
from merge_tools.qlora import NF4Settings
from oasst_peft.model_files import has_tokenizer

# Relative tolerance on logits (times max(1, max |reference logit|)) for the least precise dtype in play.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}

PROBES = (
    [
        {"role": "user", "content": "What is a meme, and what's the history behind this word?"},
        {"role": "assistant", "content": "A meme is an idea that spreads from person to person."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
        {"role": "user", "content": "And ten minus three?"},
    ],
    [{"role": "user", "content": "Write a story about the future of AI development."}],
)


@dataclass
class VerifyResult:
    """How close the merged model is to base + adapter."""

    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    positions: int
    reference: str
    dtype: str
    probes: str = "the probe conversations"
    rounding: float | None = None  # max |logit change| that rounding to the output dtype alone causes
    rounded_to: str = ""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"verify: {verdict}: max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
            f"top-1 agreement {self.top1_agreement:.1%} over {self.positions} positions; "
            f"reference: {self.reference}, compared in {self.dtype}"
            + (
                f"; rounding to {self.rounded_to} alone moves the logits by up to {self.rounding:.3g}"
                if self.rounding is not None
                else ""
            )
            + (f"; inputs: {self.probes}" if self.probes != VerifyResult.probes else "")
        )


def _available_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with peft
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def should_verify(n_params: int) -> tuple[bool, str]:
    """Auto ``--verify``: on when one copy of the model for comparison fits comfortably in memory."""
    dev = device()
    need = n_params * (2 if dev == "cuda" else 4) * 1.3
    have = _available_memory(dev)
    if need <= 0.5 * have:
        return True, f"the model ({human(need)} to compare on {dev}) fits in memory"
    return (
        False,
        f"the model needs about {human(need)} on {dev}, {human(have)} is available; pass --verify to force it",
    )


def _probe_ids(tokenizer) -> list[list[int]]:
    ids = []
    for conv in PROBES:
        if tokenizer.chat_template:
            out = tokenizer.apply_chat_template(
                conv, tokenize=True, add_generation_prompt=conv[-1]["role"] == "user"
            )
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            ids.append([int(i) for i in out])
        else:
            ids.append(tokenizer(" ".join(m["content"] for m in conv))["input_ids"])
    return ids


def _token_probes(vocab: int) -> list[list[int]]:
    """Fixed token ids for a model saved without a tokenizer: the logits compare just as well."""
    ids, x = [], 12345
    for length in (16, 24, 32):
        seq = []
        for _ in range(length):
            x = (1103515245 * x + 12345) % 2**31
            seq.append(x % vocab)
        ids.append(seq)
    return ids


@torch.no_grad()
def _logits(model, probes: list[list[int]], dev: str) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([p], device=dev)).logits[0].float().cpu() for p in probes]


def _load_reference(base_folder: Path, adapter_dir: Path, vocab_rows, nf4, dtype, dev, dequantized=None):
    """Base + adapter as trained; with ``dequantized`` (a dtype), an NF4 base comes back as plain layers in it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype}
    if nf4 is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=nf4.quant_type,
            bnb_4bit_use_double_quant=nf4.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": dev}
    # (a GGUF base is its dequantized safetensors copy here: merge_tools.base.gguf_folder)
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), **kwargs)
    if nf4 is None:
        model.to(dev)
    from oasst_peft.model import exact_nf4_kernels

    # As training computed: dequantize to the compute dtype, never bitsandbytes' bf16 CPU kernel.
    exact_nf4_kernels(model)
    if nf4 is not None and dequantized is not None:
        model = model.dequantize(dtype=dequantized)  # the NF4 values as trained, in plain Linear layers
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_rows and rows != vocab_rows:
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    return PeftModel.from_pretrained(model, str(adapter_dir)).to(dev)


def _rounded(model, out_dtype: torch.dtype, compute: torch.dtype):
    """``model`` with every weight rounded to ``out_dtype`` and kept in ``compute``, in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(compute).to(out_dtype).to(compute)
    return model


def verify_merge(
    merged_dir: Path,
    *,
    base_folder: Path,
    adapter_dir: Path,
    vocab_rows: int | None,
    out_dtype: torch.dtype,
    nf4: NF4Settings | None = None,
    tolerance: float | None = None,
) -> VerifyResult:
    """Compare the merged folder with base + adapter on ``PROBES``."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover
        raise MergeError("--verify needs transformers installed (or pass --no-verify)") from None
    dev = device()
    compute = torch.float32 if dev == "cpu" else out_dtype
    ref_dtype = nf4.dtype if nf4 is not None else compute
    if has_tokenizer(merged_dir):
        probes = _probe_ids(AutoTokenizer.from_pretrained(str(merged_dir)))
        inputs = VerifyResult.probes
    else:
        config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
        probes = _token_probes(int(vocab_rows or config.get("vocab_size") or 2))
        inputs = "fixed token ids (the merged folder has no tokenizer)"
    try:
        ref_model = _load_reference(base_folder, adapter_dir, vocab_rows, nf4, ref_dtype, dev)
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001 - loading can fail in many library-specific ways
        raise MergeError(
            f"verify: cannot load base + adapter for comparison ({type(e).__name__}: {e}); "
            "pass --no-verify to skip"
        ) from None
    ref = _logits(ref_model, probes, dev)
    rounding = None
    if TOLERANCE.get(out_dtype, 1e-3) > TOLERANCE.get(compute, 1e-3):  # saved narrower than compared
        exact = ref
        if nf4 is not None:  # peft would quantize a 4-bit layer's merged weight again: reload it dequantized
            del ref_model
            gc.collect()
            ref_model = _load_reference(base_folder, adapter_dir, vocab_rows, nf4, ref_dtype, dev, compute)
        ref_model = _rounded(ref_model.merge_and_unload(), out_dtype, compute)
        ref = _logits(ref_model, probes, dev)
        rounding = max(float((a - b).abs().max()) for a, b in zip(ref, exact, strict=True))
    del ref_model
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=compute).to(dev)
    got = _logits(merged, probes, dev)
    del merged
    gc.collect()
    in_play = (compute, ref_dtype) if rounding is not None else (out_dtype, compute, ref_dtype)
    least = max(in_play, key=lambda d: TOLERANCE.get(d, 1e-3))
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    tol = tolerance if tolerance is not None else TOLERANCE.get(least, 1e-3) * scale
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(got, ref, strict=True)])
    reference = "4-bit NF4 base + adapter (as trained)" if nf4 is not None else "base + adapter"
    if rounding is not None:
        reference += f", merged by peft and rounded to {DTYPE_NAMES.get(out_dtype, str(out_dtype))}"
    return VerifyResult(
        max_abs_diff=diff,
        top1_agreement=float(agree.mean()),
        tolerance=tol,
        positions=int(agree.numel()),
        reference=reference,
        dtype=DTYPE_NAMES.get(least, str(least)),
        probes=inputs,
        rounding=rounding,
        rounded_to=DTYPE_NAMES.get(out_dtype, str(out_dtype)) if rounding is not None else "",
    )
