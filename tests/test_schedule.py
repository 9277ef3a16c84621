"""One schedule truth under DeepSpeed (issue 12 item 6): what runs is printed; a conflicting JSON is refused."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from oasst_peft import schedule
from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.shipped import deepspeed_config_path

SHIPPED = ("zero2", "zero3", "zero2-offload", "zero3-offload")


def _recipe(**extra):
    d = {"model_name": "some/model", "datasets": ["alpaca"], "warmup_steps": 100, "learning_rate": 6e-6}
    d.update(extra)
    return recipe_from_dict(d)


def _json(tmp_path: Path, scheduler: dict | None) -> str:
    config = {"zero_optimization": {"stage": 2}}
    if scheduler is not None:
        config["scheduler"] = scheduler
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_zero_configs_leave_the_schedule_to_lr_scheduler_type(name):
    recipe = _recipe(deepspeed_config=name)
    path = deepspeed_config_path(recipe.deepspeed_config, recipe.recipe_dir)
    assert schedule.deepspeed_scheduler(path) is None
    for kind in ("linear", "cosine", "constant_with_warmup"):
        schedule.check(_recipe(lr_scheduler_type=kind), path)
    line = schedule.describe(recipe, path)
    assert line == (
        "schedule: linear (transformers): linear warmup to the peak lr, then linear decay to 0 at the last step; "
        "warmup_steps 100, peak lr 6e-06"
    )


def test_open_assistants_zero2_scheduler_warms_up_logarithmically_and_is_refused(tmp_path):
    oa = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}}
    path = _json(tmp_path, oa)
    with pytest.raises(OasstError) as e:
        schedule.check(_recipe(), path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "warms up logarithmically" in msg
    assert "lr_scheduler_type: linear" in msg and "delete the JSON's scheduler section" in msg


@pytest.mark.parametrize(
    ("scheduler", "kind", "ok"),
    [
        ({"type": "WarmupDecayLR", "params": {"warmup_type": "linear"}}, "linear", True),
        ({"type": "WarmupDecayLR", "params": {"warmup_type": "linear"}}, "cosine", False),
        ({"type": "WarmupLR", "params": {"warmup_type": "linear"}}, "linear", False),
        ({"type": "WarmupLR", "params": {"warmup_type": "linear"}}, "constant_with_warmup", True),
        ({"type": "OneCycle", "params": {}}, "linear", False),
    ],
)
def test_a_users_deepspeed_scheduler_must_be_the_recipes(tmp_path, scheduler, kind, ok):
    path = _json(tmp_path, scheduler)
    recipe = _recipe(lr_scheduler_type=kind)
    if ok:
        schedule.check(recipe, path)
        assert f"(DeepSpeed {scheduler['type']} from ds.json)" in schedule.describe(recipe, path)
    else:
        with pytest.raises(OasstError, match=f"the recipe says lr_scheduler_type: {kind}"):
            schedule.check(recipe, path)


def test_train_prints_the_schedule_and_refuses_before_anything_loads(tmp_path):
    from oasst_peft.train import train

    lines: list[str] = []
    recipe = _recipe(deepspeed_config=_json(tmp_path, {"type": "WarmupLR", "params": {}}))
    with pytest.raises(OasstError, match="has no lr_scheduler_type equivalent|warms up logarithmically"):
        train(recipe, dry_run=True, say=lines.append)
    recipe = _recipe(deepspeed_config="zero2", model_name=str(tmp_path / "absent"))
    with contextlib.suppress(OasstError):  # the model is not there; the schedule line comes first
        train(recipe, dry_run=True, say=lines.append)
    assert any(line.startswith("schedule: linear (transformers)") for line in lines)


@pytest.mark.slow
def test_zero2_on_two_ranks_follows_the_transformers_schedule(tmp_path):
    """The logged learning rates of a ZeRO-2 run are exactly transformers' linear schedule."""
    import torch
    from transformers import get_scheduler

    from tests import ranks
    from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl", n=24)
    d = recipe_dict(
        base, data, tmp_path / "run", tmp_path / "cache", deepspeed_config="zero2", warmup_steps=2
    )
    d.pop("peft")
    recipe = write_recipe(tmp_path / "recipe.yaml", d)
    res = ranks.launch("train", str(recipe), "--max-steps", "6")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "schedule: linear (transformers): linear warmup" in res.stdout
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=d["learning_rate"])
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_a_run_shorter_than_its_warmup_and_a_full_run_at_a_lora_rate_are_noted():
    from oasst_peft import schedule

    lines = []
    full = _recipe(learning_rate=1e-3, warmup_steps=5)
    schedule.settle(full, None, say=lines.append)
    assert any(line.startswith("learning_rate: 0.001 is a LoRA rate") for line in lines)
    assert schedule.warmup_note(full, 5).startswith("schedule: warmup_steps 5 >= the run's 5 steps")
    assert schedule.warmup_note(full, 6) is None
    said = []
    from types import SimpleNamespace

    schedule.warmup_callback(full, say=said.append).on_train_begin(None, SimpleNamespace(max_steps=3), None)
    assert said == [schedule.warmup_note(full, 3)]  # said once the Trainer has counted the steps
    lines.clear()
    lora = _recipe(learning_rate=1e-3, peft={"mode": "lora"})
    schedule.settle(lora, None, say=lines.append)
    assert len(lines) == 1  # the schedule line only
