"""Resume inside a later epoch with 2 ranks: the resumed epoch keeps its own order (issue 12 item 2).

On resume the Trainer wraps the loader in ``skip_first_batches``: SkipBatchSampler -> BatchSamplerShard ->
BatchSampler -> the project's sampler. With two processes neither accelerate nor the Trainer sets the
epoch that deep, so without ``speed.SamplerEpoch`` the rest of the resumed epoch replays epoch 0's order.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oasst_peft import speed
from tests import ranks
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe


@pytest.mark.parametrize("kind", ["length-grouped", "random"])
def test_sampler_epoch_reaches_the_sampler_through_the_resume_chain(kind):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    if kind == "length-grouped":
        sampler = speed.LengthGroupedSampler([i % 7 + 1 for i in range(24)], 8, seed=3)
    else:
        sampler = speed.SeededRandomSampler(24, seed=3)
    loader = torch.utils.data.DataLoader(list(range(24)), batch_size=4, sampler=sampler)
    shard = prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False)
    skipped = skip_first_batches(shard, 2)
    skipped.set_epoch(1)  # what accelerate does: it does not reach the sampler under BatchSamplerShard
    assert sampler.epoch == 0
    speed.SamplerEpoch().on_epoch_begin(None, SimpleNamespace(epoch=1.5), None, train_dataloader=shard)
    assert sampler.epoch == 1
    speed.SamplerEpoch().on_epoch_begin(None, SimpleNamespace(epoch=2.0), None, train_dataloader=skipped)
    assert sampler.epoch == 2


def test_seeded_random_sampler_is_a_permutation_per_epoch_and_repeatable():
    a = speed.SeededRandomSampler(10, seed=5)
    first = list(a)
    assert sorted(first) == list(range(10))
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == list(range(10)) and second != first
    b = speed.SeededRandomSampler(10, seed=5)
    b.set_epoch(1)
    assert list(b) == second


def test_train_sampler_is_project_owned_on_both_paths():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[1] * (i % 5 + 1) for i in range(10)]})
    args = SimpleNamespace(train_sampling_strategy="random", train_batch_size=2, world_size=2, seed=1)
    assert isinstance(speed.train_sampler(args, data), speed.SeededRandomSampler)
    args.train_sampling_strategy = "group_by_length"
    grouped = speed.train_sampler(args, data)
    assert isinstance(grouped, speed.LengthGroupedSampler) and grouped.batch_size == 4


@pytest.mark.slow
@pytest.mark.parametrize("sort_by_length", [True, False], ids=["length-grouped", "random"])
def test_two_ranks_resumed_inside_epoch_2_end_equal_to_the_uninterrupted_run(tmp_path, sort_by_length):
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl", n=24)
    # 2 ranks x 2 = 4 conversations per step, 6 steps per epoch, 3 epochs; checkpoint-8 is inside epoch 2.
    d = recipe_dict(base, data, tmp_path / "run", tmp_path / "cache")
    d.update(
        per_device_train_batch_size=2,
        num_train_epochs=3,
        save_steps=8,
        sort_by_length=sort_by_length,
        packing=False,
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", d)
    whole = tmp_path / "run"
    res = ranks.launch("train", str(recipe))
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(ranks.losses(whole / "checkpoint-18")) == list(range(1, 19))

    def resumed(name: str, faults: str) -> Path:
        out = tmp_path / name
        args = ["train", str(recipe), "--resume", str(whole / "checkpoint-8"), "--output-dir", str(out)]
        proc = ranks.start(tmp_path, faults, *args)
        rc = proc.wait(timeout=300)
        assert rc == 0, ranks.output(proc)[1][-4000:]
        assert not (out / "checkpoint-8").exists()  # it started at step 8
        return out

    fixed = resumed("resumed", "")
    assert ranks.differing(ranks.adapter(fixed), ranks.adapter(whole)) == []
    control = resumed("control", "no-sampler-epoch")  # epoch 0's order replayed in the rest of epoch 2
    assert ranks.differing(ranks.adapter(control), ranks.adapter(whole)) != []
