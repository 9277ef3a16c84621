"""The demo round trip on the real SmolLM2-135M: GGUF base -> LoRA run -> ``oasst-peft export`` -> reload.

Off by default (``-m realmodel``); a few minutes on 2 CPU cores. The run trains 10 steps of the demo
recipe, is exported as f32 and q8_0, and each GGUF is reloaded by ``oasst-peft sample`` (transformers'
GGUF loader, tokenizer and chat template from the file alone). The f32 file must give the adapter's
greedy replies exactly; the q8_0 agreement is printed.
"""

from __future__ import annotations

import pytest

from tests.merge.test_realmodel import cli
from tests.tiny import demo_gguf

pytestmark = pytest.mark.realmodel


def test_demo_lora_run_exports_to_a_gguf_that_replies_like_the_adapter(tmp_path):
    demo_gguf()  # skips without the package
    from oasst_peft.sample import sample

    run = tmp_path / "run"
    res = cli(
        "train",
        "recipes/demo-smollm2.yaml",
        "--max-steps",
        "10",
        "--output-dir",
        str(run),
        "--set",
        "eval_steps=0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = sample(run, max_new_tokens=32)["replies"]["greedy"]
    results = {}
    for qtype in ("f32", "q8_0"):
        out = tmp_path / qtype / f"demo-{qtype}.gguf"
        res = cli("export", str(run), "--gguf", str(out), "--type", qtype)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out.parent / "Modelfile").is_file()
        got = sample(out, max_new_tokens=32)["replies"]["greedy"]
        same = sum(a["reply"] == g["reply"] for a, g in zip(adapter, got, strict=True))
        results[qtype] = (same, got)
        print(
            f"{qtype}: {same}/{len(adapter)} greedy replies equal the adapter's; {out.stat().st_size / 1e6:.1f} MB"
        )
        for a, g in zip(adapter, got, strict=True):
            print(f"  adapter: {a['reply']!r}\n  gguf:    {g['reply']!r}")
    assert results["f32"][0] == len(adapter)
