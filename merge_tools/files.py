"""The small files of a merged checkpoint: ``config.json``, ``generation_config.json`` and the tokenizer.

The config gets the final vocab size, the end-of-turn token as eos, the pad id and the output dtype;
the generation config's eos is the end-of-turn token (``<|endoftext|>``, or ``</s>`` for Bloom) the
run recorded; the tokenizer files, chat template included, are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from merge_tools.errors import MergeError
from merge_tools.io import write_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
TEMPLATE_DIR = "additional_chat_templates"


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(cfg.get("chat_template"))


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files (and chat templates) of ``src``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (src / TEMPLATE_DIR).is_dir():
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR)
        copied.append(TEMPLATE_DIR + "/")
    return copied


def token_id(folder: Path, token: str) -> int | None:
    """The id of ``token`` in a folder's ``tokenizer.json`` (added tokens, then the model vocab)."""
    try:
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def end_of_turn(record: dict | None, tokenizer_dir: Path | None) -> tuple[str | None, int | None, int | None]:
    """(eot token, its id, pad id) from the run record, else from the tokenizer's eos/pad."""
    if record and record.get("eot_token_id") is not None:
        return record.get("eot_token"), int(record["eot_token_id"]), record.get("pad_token_id")
    if tokenizer_dir is None:
        return None, None, None
    try:
        cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, None

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    eos, pad = content(cfg.get("eos_token")), content(cfg.get("pad_token"))
    return eos, token_id(tokenizer_dir, eos) if eos else None, token_id(tokenizer_dir, pad) if pad else None


def merged_config(config: dict, vocab_rows: int | None, dtype: torch.dtype, eot_id, pad_id) -> dict:
    """The base config with the final vocab size, eos/pad and dtype; no quantization section."""
    cfg = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    cfg.pop("torch_dtype", None)
    if vocab_rows is not None:
        text = cfg.get("text_config")
        if isinstance(text, dict) and "vocab_size" in text:
            text["vocab_size"] = vocab_rows
        cfg["vocab_size"] = vocab_rows
    if eot_id is not None:
        cfg["eos_token_id"] = eot_id
    if pad_id is not None:
        cfg["pad_token_id"] = pad_id
    return cfg


def generation_config(sources: list[Path | None], eot_id, pad_id) -> dict:
    """The first ``generation_config.json`` found (the run's, else the base's) with eos = end-of-turn."""
    gen: dict = {}
    for folder in sources:
        if folder is not None and (folder / "generation_config.json").is_file():
            try:
                gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise MergeError(f"{folder / 'generation_config.json'}: unreadable ({e})") from None
            break
    if eot_id is not None:
        gen["eos_token_id"] = int(eot_id)
    if pad_id is not None:
        gen["pad_token_id"] = int(pad_id)
    gen.pop("_from_model_config", None)
    return gen


def write_small_files(folder: Path, config: dict, gen: dict) -> None:
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", gen)
