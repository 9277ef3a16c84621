"""benchmarks/gpu_suite.py's CPU-checkable parts: arguments, model building, the table and the verdict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite  # noqa: E402


def test_arguments_default_to_the_gpu_run_and_smoke_shrinks_it():
    args = gpu_suite.parse_args([])
    assert (args.steps, args.max_length, args.models, args.modes) == (
        24,
        1024,
        ["llama", "neox"],
        list(gpu_suite.MODES),
    )
    smoke = gpu_suite.parse_args(["--smoke", "--models", "llama", "--modes", "qlora"])
    assert (smoke.steps, smoke.max_length, smoke.models, smoke.modes) == (2, 64, ["llama"], ["qlora"])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--models", "gpt2"])


def test_the_gpu_shapes_are_a_1b_llama_and_a_400m_neox():
    from transformers import GPTNeoXConfig, LlamaConfig

    from oasst_peft.model_info import params_from_config

    llama = params_from_config(LlamaConfig(vocab_size=1024, tie_word_embeddings=True, **gpu_suite.LLAMA_1B))
    neox = params_from_config(GPTNeoXConfig(vocab_size=1024, tie_word_embeddings=True, **gpu_suite.NEOX_400M))
    assert 0.9e9 < llama < 1.2e9 and 0.35e9 < neox < 0.45e9


def test_smoke_models_are_safetensors_on_disk(tmp_path):
    from benchmarks import throughput_world

    _, corpus = throughput_world.write_data(tmp_path, 16, 64)
    bases = gpu_suite.build_models(tmp_path, corpus, smoke=True, models=["llama", "neox"])
    for name, folder in bases.items():
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file(), name


def _row(model, mode, run, tps, peak, plan):
    return {
        "model": model,
        "mode": mode,
        "run": run,
        "batching": "x",
        "tokens_per_s": tps,
        "padding": 0.1,
        "peak_gib": peak,
        "plan_gib": plan,
    }


def test_the_verdict_misses_slow_qlora_bad_memory_predictions_and_unverified_merges():
    good = [_row("llama", "qlora", "baseline", 100, 10, 10), _row("llama", "qlora", "ours", 160, 10, 11)]
    merged = {"verified": True}
    assert gpu_suite.verdict(good, merged, smoke=False) == []
    slow = [good[0], _row("llama", "qlora", "ours", 140, 10, 11)]
    assert gpu_suite.verdict(slow, merged, smoke=False) == ["llama qlora speed"]
    off = [good[0], _row("llama", "qlora", "ours", 160, 10, 12)]
    assert gpu_suite.verdict(off, merged, smoke=False) == ["llama qlora memory prediction"]
    assert gpu_suite.verdict(good, {"verified": False}, smoke=False) == ["merge verify"]
    assert gpu_suite.verdict(slow, {"verified": False}, smoke=True) == []
    lines = gpu_suite.table(good)
    assert lines[0].split()[:4] == ["model", "mode", "run", "batching"]
    assert " 1.60 " in lines[2] and "10.0%" in lines[2]


@pytest.mark.slow
def test_smoke_mode_runs_end_to_end_on_cpu(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_suite.py"),
        "--smoke",
        "--models",
        "llama",
        "--modes",
        "qlora",
        "--work",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "llama  qlora  baseline" in out and "llama  qlora  ours" in out
    assert "merge: NF4 round trip" in out and ": verified;" in out and "tokens/s" in out
    assert out.strip().splitlines()[-1].endswith("SMOKE (no targets)")
