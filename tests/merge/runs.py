"""Tiny training runs written to disk exactly as ``oasst-peft train`` lays them out, built by hand in seconds.

``make_base`` saves a random tiny model and tokenizer; ``make_run`` loads it as the trainer does
(oasst tokens, resized embedding, peft LoRA with ``trainable_token_indices`` for every new row),
takes a few AdamW steps on two conversations with the assistant-only loss, and saves the lean adapter,
tokenizer, generation config, ``oasst_recipe.yaml`` and ``oasst_run.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from oasst_peft.adapter_file import base_signature, save_lean
from oasst_peft.model import lora_token_targets
from oasst_peft.template import resize_embeddings, setup_tokenizer, tokenize_with_mask
from tests.tiny import make_model, make_tokenizer

CONVERSATIONS = [
    [
        {"role": "user", "content": "what is a meme"},
        {"role": "assistant", "content": "a joke that spreads from person to person"},
    ],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four"},
    ],
]
STYLE = {"gpt_neox": "neox", "llama": "llama", "bloom": "bloom"}


def make_base(
    root: Path, arch: str = "gpt_neox", hidden: int = 64, seed: int = 0, dtype=torch.float32
) -> Path:
    """A random tiny base saved as safetensors with its tokenizer."""
    tok = make_tokenizer(STYLE[arch])
    model = make_model(arch, tok, hidden=hidden, seed=seed).to(dtype)
    out = root / f"base-{arch}-{hidden}-{seed}-{str(dtype).removeprefix('torch.')}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_trainable(base: Path, mode: str = "lora", lean: bool = True, **lora):
    """(peft model, tokenizer, chat format, base rows, rows, token ids) as ``oasst_peft.model.load_model`` builds them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(base)
    fmt = setup_tokenizer(tok)
    kwargs = {"dtype": torch.float32}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}  # these runs train on the CPU, GPU or not
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    base_rows = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(1)
    rows = resize_embeddings(model, tok)
    model.generation_config.eos_token_id = fmt.eot_id
    model.generation_config.pad_token_id = fmt.pad_id
    model.config.eos_token_id = fmt.eot_id
    model.config.pad_token_id = fmt.pad_id
    ids = sorted(set(fmt.trainable_token_ids) | set(range(base_rows, rows)))
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = LoraConfig(
        r=lora.get("r", 4),
        lora_alpha=lora.get("alpha", 8),
        lora_dropout=0.0,
        target_modules=lora.get("target_modules", "all-linear"),
        use_rslora=lora.get("rslora", False),
        use_dora=lora.get("dora", False),
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=lora_token_targets(model, ids),
    )
    peft_model = get_peft_model(model, cfg)
    if lean:
        save_lean(peft_model, base_rows, rows)
    return peft_model, tok, fmt, base_rows, rows, ids


def train_steps(model, tok, steps: int = 4, lr: float = 2e-2) -> None:
    """A few AdamW steps on CONVERSATIONS, loss on assistant tokens only; B starts at zero, so LoRA moves."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        for conv in CONVERSATIONS:
            ids, mask = tokenize_with_mask(tok, conv)
            x = torch.tensor([ids])
            labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask, strict=True)]])
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def make_run(
    root: Path,
    base: Path,
    name: str,
    mode: str = "lora",
    steps: int = 4,
    dtype: str = "fp32",
    lean: bool = True,
    **lora,
) -> Path:
    """A finished LoRA/QLoRA run folder in the trainer's layout.

    ``lean=False`` saves as peft does by default (and this trainer did before lean adapters): the whole
    resized embedding layers beside the LoRA weights.
    """
    model, tok, fmt, base_rows, rows, ids = load_trainable(base, mode, lean=lean, **lora)
    train_steps(model, tok, steps)
    out = root / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.get_base_model().generation_config.save_pretrained(out)
    recipe = {
        "model_name": str(base),
        "dtype": dtype,
        "max_length": 128,
        "learning_rate": 2e-2,
        "peft": {
            "mode": mode,
            "r": lora.get("r", 4),
            "alpha": lora.get("alpha", 8),
            "dropout": 0.0,
            "target_modules": "all-linear",
            "rslora": lora.get("rslora", False),
            "dora": lora.get("dora", False),
        },
        "datasets": [{"oasst_export": {"lang": "en,de", "val_split": 0.05}}],
        "deepspeed_config": None,
        "chat_template": "oasst",
    }
    (out / "oasst_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    record = {
        "base_model": str(base),
        "base_kind": "dir",
        "mode": mode,
        "dtype": dtype,
        "eot_token": fmt.eot,
        "eot_token_id": fmt.eot_id,
        "pad_token_id": fmt.pad_id,
        "base_vocab_rows": base_rows,
        "vocab_rows": rows,
        "trainable_token_ids": ids,
        "base_signature": _base_signature(base),
        "command": ["oasst-peft", "train", f"recipes/{name}.yaml", "--max-steps", str(steps)],
    }
    if mode == "qlora":
        record["bnb_4bit"] = {
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": dtype,
            "blocksize": 64,
        }
    (out / "oasst_run.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out


def _base_signature(base: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return base_signature(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))


def reference_logits(base: Path, run: Path, input_ids: list[int], qlora: bool = False) -> torch.Tensor:
    """Logits of base + adapter as trained (the 4-bit base for QLoRA), loaded the way ``sample`` loads them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    record = json.loads((run / "oasst_run.json").read_text())
    kwargs = {"dtype": torch.float32}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model.resize_token_embeddings(record["vocab_rows"], mean_resizing=False)
    model = PeftModel.from_pretrained(model, run).eval()
    for m in model.modules():  # as trained: bnb's CPU inference kernel would compute in bf16
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0].float()


def merged_logits(folder: Path, input_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0].float()


def bad_input_world(tmp: Path) -> dict:
    """What the bad-input suites corrupt: a tiny base, conversations, and a one-step LoRA run of its own base."""
    from tests.tiny_run import write_base, write_conversations

    base = make_base(tmp, "gpt_neox")
    return {
        "base": write_base(tmp / "base"),
        "data": write_conversations(tmp / "convs.jsonl"),
        "adapter_run": make_run(tmp, base, "lora-run", steps=1),
    }
