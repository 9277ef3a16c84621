"""RunSettings: every per-run decision made once, before weights load (issue 13 item 1, issue 12 item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from oasst_peft import settings
from oasst_peft.config import recipe_from_dict
from oasst_peft.model import load_model, load_tokenizer
from oasst_peft.settings import placement
from tests.tiny import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_qlora_on_local_rank_1_loads_on_device_1():
    assert placement("qlora", zero3=False, local_rank=1, cuda=True) == {"": 1}
    assert placement("qlora", zero3=False, local_rank=0, cuda=True) == {"": 0}
    assert placement("qlora", zero3=True, local_rank=1, cuda=True) is None  # ZeRO-3 partitions itself
    assert placement("lora", zero3=False, local_rank=1, cuda=True) is None  # the Trainer places it
    assert placement("qlora", zero3=False, local_rank=1, cuda=False) is None


def test_resolve_reads_the_rank_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    recipe = recipe_from_dict({"model_name": "x/y", "datasets": ["alpaca"], "peft": {"mode": "qlora"}})
    _, run = settings.resolve(recipe, say=lambda _line: None)
    assert run.local_rank == 1
    assert replace(run, cuda=True).device_map("qlora") == {"": 1}


def test_each_decision_is_said_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    tok = make_tokenizer("neox")
    make_model("gpt_neox", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    recipe = recipe_from_dict(
        {"model_name": str(tmp_path), "datasets": ["alpaca"], "dtype": "bf16", "use_flash_attention": True}
    )
    lines: list[str] = []
    recipe, run = settings.resolve(recipe, say=lines.append)
    assert run.dtype == "fp32" and run.weights_dtype == "fp32" and run.attention == "sdpa"
    assert run.gradient_checkpointing is False and recipe.gradient_checkpointing is False
    assert [line.split(":")[0] for line in lines] == [
        "schedule",
        "dtype",
        "gradient_checkpointing",
        "attention",
    ]
    assert lines == list(run.lines)
    tok2, fmt = load_tokenizer(recipe)
    after: list[str] = []
    loaded = load_model(recipe, tok2, fmt, run, say=after.append)
    assert not any(line.startswith(("dtype", "attention", "gradient_checkpointing")) for line in after)
    assert loaded.model.config._attn_implementation == "sdpa"


ZERO3_PROBE = """
import json, os, sys
from oasst_peft import distributed, settings, speed
from oasst_peft.config import load_recipe
from oasst_peft.model import load_model, load_tokenizer
from oasst_peft.trainer import training_arguments

recipe = load_recipe(sys.argv[1])
recipe, run = settings.resolve(recipe, say=lambda _line: None)
extra = distributed.setup(run.deepspeed_path)
args = training_arguments(recipe, run, recipe.output_dir, 1, False, speed.planned_batching(recipe, run), **extra)
tokenizer, fmt = load_tokenizer(recipe)
loaded = load_model(recipe, tokenizer, fmt, run, say=lambda _line: None)
params = list(loaded.model.parameters())
out = {
    "partitioned": all(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in params),
    "held": sum(p.ds_tensor.numel() for p in params),
    "total": sum(p.ds_numel for p in params),
    "visible": sum(p.numel() for p in params),
}
with open(os.path.join(sys.argv[2], f"rank{distributed.rank()}.json"), "w") as f:
    json.dump(out, f)
distributed.finish()
"""


@pytest.mark.slow
def test_zero3_partitions_at_load_on_two_ranks(tmp_path):
    tok = make_tokenizer("neox")
    make_model("gpt_neox", tok, hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    recipe = {
        "model_name": str(tmp_path / "base"),
        "dtype": "fp32",
        "max_length": 64,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "deepspeed_config": "zero3",
        "output_dir": str(tmp_path / "run"),
        "datasets": ["alpaca"],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (tmp_path / "probe.py").write_text(ZERO3_PROBE, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    res = subprocess.run(
        [*cmd, str(tmp_path / "probe.py"), str(tmp_path / "r.yaml"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["partitioned"], got
        assert got["visible"] == 0, got  # nothing materialised whole on a rank
        assert got["held"] == pytest.approx(got["total"] / 2, rel=0.05), got
    assert ranks[0]["total"] == ranks[1]["total"] > 0
