"""``oasst-peft merge`` as a user runs it, on a run written by ``oasst-peft train`` itself (the real layout)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from oasst_peft.config import recipe_from_dict
from oasst_peft.sample import sample
from oasst_peft.train import train
from tests.merge.runs import CONVERSATIONS, make_base
from tests.tiny_run import run_cli

pytestmark = pytest.mark.slow  # spawns processes


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    base = make_base(root, "gpt_neox")
    data = root / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4), encoding="utf-8")
    recipe = {
        "model_name": str(base),
        "dtype": "fp32",
        "max_length": 64,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_strategy": "no",
        "logging_steps": 50,
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "datasets": [{"chat": {"data_files": str(data), "format": "messages", "val_split": 0.0}}],
        "peft": {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    }
    train(recipe_from_dict(recipe), max_steps=6, say=lambda _m: None)
    return root / "run"


def test_cli_merge_of_a_trained_run_samples_like_the_adapter(trained_run, tmp_path):
    out = tmp_path / "merged"
    res = cli("merge", str(trained_run), "--out", str(out), "--verify")
    assert res.returncode == 0, res.stderr[-3000:]
    for line in ("base: ", "dtype: fp32 (the base's dtype)", "verify: ok", "merged model: "):
        assert line in res.stdout, line
    record = json.loads((trained_run / "oasst_run.json").read_text())
    merged_record = json.loads((out / "oasst_merge.json").read_text())
    assert (
        merged_record["vocab_rows"] == record["vocab_rows"]
        and merged_record["verify"]["top1_agreement"] == 1.0
    )
    card = (out / "README.md").read_text()
    assert f"base model: `{record['base_model']}`" in card

    prompts = [[{"role": "user", "content": c[-2]["content"]}] for c in CONVERSATIONS]
    merged = sample(out, prompts=prompts, max_new_tokens=16)
    adapter = sample(trained_run, prompts=prompts, max_new_tokens=16)
    assert merged["replies"] == adapter["replies"]
    assert merged["model"]["eot_tokens"] == ["<|endoftext|>"]


def test_cli_errors_are_one_line_and_exit_1(trained_run, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    res = cli("merge", str(trained_run), "--out", str(out))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: --out: {out} already exists; pass --overwrite to replace it or choose another folder"
    ]
    res = cli("merge", str(trained_run), "--out", str(tmp_path / "x"), "--dtype", "int8")
    assert res.returncode == 2 and res.stderr.count("\n") == 1  # refused at parse time: a usage error
    assert "Invalid value for '--dtype'" in res.stderr and "'int8' is not one of" in res.stderr
