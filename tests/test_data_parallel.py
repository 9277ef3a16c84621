"""``--nproc 2`` without DeepSpeed is data parallel: both ranks end every step with the same weights.

On a machine without CUDA, accelerate treats gloo ranks as lone processes unless told it is a multi-CPU
run; then the Trainer does not wrap the model in DDP, and each rank trains alone on its half of the data.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests import ranks
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_without_deepspeed_keep_identical_weights(tmp_path, mode):
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl", n=16)
    d = recipe_dict(
        base, data, tmp_path / "run", tmp_path / "cache", per_device_train_batch_size=2, max_steps=3
    )
    if mode == "full":
        d["peft"] = None
        d["learning_rate"] = 1e-3
    recipe = write_recipe(tmp_path / "recipe.yaml", d)
    dump = tmp_path / "dump"
    dump.mkdir()
    proc = ranks.start(tmp_path, "dump-trainable", "train", str(recipe), DUMP_DIR=str(dump))
    rc = proc.wait(timeout=300)
    out, err = ranks.output(proc)
    assert rc == 0, err[-4000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in out + err
    if mode == "lora":  # every adapter parameter is used: DDP is not asked to search for unused ones
        assert "find_unused_parameters=True was specified" not in out + err
    assert err.count("Loading weights: 100%") == 1, err[-3000:]  # rank 0's bar only
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0 and ranks.differing(rank0, rank1) == []  # gradients were all-reduced at every step
    initial = load_file(base / "model.safetensors")
    if mode == "full":  # and they did train
        changed = [n for n, t in rank0.items() if n in initial and not torch.equal(t, initial[n])]
        assert changed
    else:
        assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n)
