"""The demo path on the real SmolLM2-135M GGUF base: train 2 steps, merge (GGUF base in memory), sample alike.

Off by default (``-m realmodel``): about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.tiny import demo_gguf
from tests.tiny_run import run_cli

pytestmark = pytest.mark.realmodel


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=900)


def test_demo_run_on_a_gguf_base_merges_and_samples_like_the_adapter(tmp_path):
    demo_gguf()  # skips without the package
    from oasst_peft.sample import sample

    run, out = tmp_path / "run", tmp_path / "merged"
    res = cli(
        "train",
        "recipes/demo-smollm2.yaml",
        "--max-steps",
        "2",
        "--output-dir",
        str(run),
        "--set",
        "eval_steps=0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("merge", str(run), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(gguf, from the run record" in res.stdout and "verify: ok" in res.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == json.loads((run / "oasst_run.json").read_text())["vocab_rows"]
    merged = sample(out, max_new_tokens=12)
    adapter = sample(run, max_new_tokens=12)
    assert merged["replies"] == adapter["replies"]
