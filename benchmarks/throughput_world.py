"""The world ``benchmarks/train_throughput.py`` (and ``gpu_suite.py``) trains in: synthetic conversations, a random Llama, the recipe.

The conversations' token counts spread like oasst's (lognormal, ~24 to ``max_length``); each user turn of
random words is answered with the same words reversed, so the task is learnable and held-out loss means
something. Written once by the parent process, read by every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

BATCH = 8
HELDOUT = 48  # conversations held out (the recipe's val_split) for the held-out loss


def words(n: int, rng) -> list[str]:
    syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "de", "pu", "ga", "shi", "ro", "be", "zu"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
    return sorted(out)


def conversation(rng, vocab: list[str], target_tokens: int) -> dict:
    """User turns of random words, each answered with the same words reversed (learnable), ~target_tokens long."""
    turns = 1 if target_tokens < 120 else rng.choice([1, 2, 3])
    per_turn = max(4, target_tokens // (turns * 2 * 2))  # ~2 tokens per word, user + assistant
    messages = []
    for _ in range(turns):
        ws = [rng.choice(vocab) for _ in range(max(2, int(per_turn * rng.uniform(0.7, 1.3))))]
        messages.append({"role": "user", "content": "reverse: " + " ".join(ws)})
        messages.append({"role": "assistant", "content": " ".join(reversed(ws))})
    return {"messages": messages}


def write_data(work: Path, n_train: int, max_length: int, seed: int = 0) -> tuple[Path, list[str]]:
    """n_train + HELDOUT conversations in one messages-format file; the recipe's val_split holds HELDOUT out."""
    import random

    rng = random.Random(seed)
    vocab = words(400, rng)

    def length() -> int:  # oasst-like spread: many short threads, a long tail cut at max_length
        return int(min(max_length, max(24, rng.lognormvariate(math.log(100), 0.8))))

    rows = [conversation(rng, vocab, length()) for _ in range(n_train + HELDOUT)]
    path = work / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, [m["content"] for r in rows[:300] for m in r["messages"]]


def write_model(work: Path, corpus: list[str], qlora_1b: bool) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|padding|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if qlora_1b:  # TinyLlama-1.1B's shape
        shape = dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
        )
    else:
        shape = dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=688,
        )
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if qlora_1b else torch.float32)
    out = work / "base"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe_dict(work: Path, base: Path, data: Path, n_train: int, max_length: int, qlora_1b: bool) -> dict:
    d = {
        "model_name": str(base),
        "dtype": "bf16" if qlora_1b else "fp32",
        "max_length": max_length,
        "learning_rate": 2e-4 if qlora_1b else 3e-3,
        "warmup_steps": 2,
        "num_train_epochs": 1,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "output_dir": str(work / "run"),
        "cache_dir": str(work / "cache"),
        "datasets": [
            {
                "chat": {
                    "data_files": str(data),
                    "format": "messages",
                    "val_split": HELDOUT / (n_train + HELDOUT),
                }
            }
        ],
    }
    if qlora_1b:
        d.update(
            peft={"mode": "qlora", "r": 16, "alpha": 32, "dropout": 0.0},
            gradient_checkpointing=True,
            use_flash_attention=True,
        )
    return d
