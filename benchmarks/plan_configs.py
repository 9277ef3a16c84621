"""The configurations ``benchmarks/plan_accuracy.py`` measures: architecture, size, mode and dtype of each.

``settings(spec)`` fills in the defaults; ``model_config(s)`` builds the transformers config they describe.
"""

from __future__ import annotations

# (name, settings). Sizes are small enough for 2 CPU cores; each runs in a few seconds.
CPU_CONFIGS = [
    ("llama-h256-full", dict(arch="llama", hidden=256, layers=4, seq=256, batch=2, mode="full")),
    ("llama-h512-full-b4", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="full")),
    ("llama-h512-full-gc", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="full", gc=True)),
    (
        "llama-h512-full-eager",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="full", attn="eager"),
    ),
    ("llama-h512-lora", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="lora")),
    ("llama-h512-lora-gc", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="lora", gc=True)),
    (
        "llama-h512-qlora-gc",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="qlora", gc=True),
    ),
    ("neox-h512-full", dict(arch="gpt_neox", hidden=512, layers=4, seq=512, batch=2, mode="full")),
    (
        "neox-h512-lora-gc",
        dict(arch="gpt_neox", hidden=512, layers=4, seq=512, batch=4, mode="lora", gc=True),
    ),
    ("neox-h512-qlora", dict(arch="gpt_neox", hidden=512, layers=4, seq=256, batch=2, mode="qlora")),
    ("bloom-h256-full", dict(arch="bloom", hidden=256, layers=4, seq=256, batch=2, mode="full")),
    ("bloom-h512-lora-gc", dict(arch="bloom", hidden=512, layers=4, seq=512, batch=2, mode="lora", gc=True)),
    # shapes the coefficients were not measured on (GQA, other head counts and lengths, no dropout)
    (
        "llama-h384-gqa-lora-nodrop",
        dict(
            arch="llama",
            hidden=384,
            heads=6,
            kv_heads=2,
            layers=3,
            seq=384,
            batch=3,
            mode="lora",
            dropout=0.0,
        ),
    ),
    (
        "neox-h768-full-gc",
        dict(arch="gpt_neox", hidden=768, heads=12, layers=3, seq=256, batch=4, mode="full", gc=True),
    ),
]

# Bigger sizes, only when a CUDA GPU is present (bf16 LoRA/QLoRA as the recipes run them; full in fp32).
GPU_CONFIGS = [
    (
        "llama-h512-lora-bf16",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="lora", dtype="bf16"),
    ),
    (
        "llama-h1024-full-fp32",
        dict(arch="llama", hidden=1024, layers=8, seq=1024, batch=4, mode="full", dtype="fp32"),
    ),
    (
        "llama-h2048-lora-bf16-gc",
        dict(arch="llama", hidden=2048, layers=16, seq=2048, batch=4, mode="lora", dtype="bf16", gc=True),
    ),
    (
        "llama-h2048-qlora-bf16-gc",
        dict(arch="llama", hidden=2048, layers=16, seq=2048, batch=4, mode="qlora", dtype="bf16", gc=True),
    ),
    (
        "neox-h2048-lora-bf16",
        dict(arch="gpt_neox", hidden=2048, layers=8, seq=1024, batch=2, mode="lora", dtype="bf16"),
    ),
    (
        "neox-h2560-qlora-bf16-gc",
        dict(arch="gpt_neox", hidden=2560, layers=16, seq=2048, batch=2, mode="qlora", dtype="bf16", gc=True),
    ),
    (
        "bloom-h1024-lora-bf16-gc",
        dict(arch="bloom", hidden=1024, layers=8, seq=1024, batch=2, mode="lora", dtype="bf16", gc=True),
    ),
]

DEFAULTS = dict(
    heads=None,
    kv_heads=None,
    inter=None,
    vocab=8192,
    dtype="fp32",
    attn="sdpa",
    gc=False,
    r=16,
    dropout=0.05,
    device="cpu",
    steps=3,
)


def settings(spec: dict) -> dict:
    """The full settings of one configuration (defaults filled in)."""
    s = {**DEFAULTS, **spec}
    s["heads"] = s["heads"] or max(1, s["hidden"] // 64)
    s["kv_heads"] = s["kv_heads"] or s["heads"]
    if s["inter"] is None:
        s["inter"] = {"llama": s["hidden"] * 8 // 3 // 64 * 64}.get(s["arch"], 4 * s["hidden"])
    if s["arch"] == "bloom":
        s["attn"] = "eager"  # transformers has only eager attention for Bloom
    return s


def model_config(s: dict):
    """A transformers config of the asked architecture and size (untied embeddings except Bloom)."""
    from transformers import BloomConfig, GPTNeoXConfig, LlamaConfig

    if s["arch"] == "llama":
        return LlamaConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            vocab_size=s["vocab"],
            max_position_embeddings=max(2048, s["seq"]),
            tie_word_embeddings=False,
        )
    if s["arch"] == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            vocab_size=s["vocab"],
            rotary_pct=0.25,
            use_parallel_residual=True,
            max_position_embeddings=max(2048, s["seq"]),
            tie_word_embeddings=False,
        )
    if s["arch"] == "bloom":
        return BloomConfig(
            hidden_size=s["hidden"], n_layer=s["layers"], n_head=s["heads"], vocab_size=s["vocab"]
        )
    raise ValueError(f"unknown arch {s['arch']}")
