"""A tiny base model, a conversations file and a recipe YAML on disk, for tests that run the real CLI.

``write_base`` saves a random 2-layer model with its tokenizer (safetensors); ``write_conversations``
a messages-format JSONL; ``recipe_dict`` the keys of a recipe that trains in seconds on the CPU
(max_length 64, batch 4, no warmup, one checkpoint every 2 steps); ``write_recipe`` dumps one;
``run_cli`` runs ``python -m oasst_peft.cli`` in a fresh process, offline, as a user types it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tiny import make_model, make_tokenizer

STYLE = {"gpt_neox": "neox", "llama": "llama", "bloom": "bloom"}
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``oasst-peft ARGS`` in a fresh process from this checkout, offline; stdout and stderr captured as text."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def write_base(folder: Path, arch: str = "gpt_neox", hidden: int = 32, seed: int = 0) -> Path:
    """A random tiny causal LM and its tokenizer saved in ``folder``."""
    tok = make_tokenizer(STYLE[arch])
    model = make_model(arch, tok, hidden=hidden, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def conversation(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"what is {i} plus two"},
        {"role": "assistant", "content": f"the answer is {i + 2}"},
        {"role": "user", "content": "thank you"},
        {"role": "assistant", "content": "you are welcome"},
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_conversations(path: Path, n: int = 12) -> Path:
    """``n`` two-exchange conversations in the messages format."""
    return write_jsonl(path, [{"messages": conversation(i)} for i in range(n)])


def recipe_dict(base: Path, data: Path, out: Path, cache: Path, **extra) -> dict:
    """A LoRA recipe on ``base`` and ``data`` that trains a step in well under a second."""
    d = {
        "model_name": str(base),
        "dtype": "fp32",
        "max_length": 64,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_steps": 2,
        "save_total_limit": None,
        "logging_steps": 1,
        "output_dir": str(out),
        "cache_dir": str(cache),
        "datasets": [{"chat": {"data_files": str(data), "format": "messages", "val_split": 0.0}}],
        "peft": {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    }
    d.update(extra)
    return d


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
