"""``--resume`` of a run already at its last step, and ``--overwrite`` of a folder that holds an older run.

transformers' Trainer, resumed from a checkpoint at ``max_steps`` that is not an epoch boundary, trains
one step more (it checks the step count only after a step). A finished run must stay as it is; a run that
stopped between its last checkpoint and its final save gets that save from the checkpoint. And
``--overwrite`` must not leave the older run's checkpoints, which a later ``--resume`` would pick up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from oasst_peft.config import load_recipe
from oasst_peft.train import train
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ADAPTER = "adapter_model.safetensors"


@pytest.fixture
def world(tmp_path) -> dict:
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "c.jsonl", 24)  # 6 steps per epoch: max_steps 4 ends mid-epoch
    out = tmp_path / "run"

    def recipe(**over) -> Path:
        d = recipe_dict(base, data, out, tmp_path / "cache", **{"max_steps": 4, "save_steps": 2, **over})
        return write_recipe(tmp_path / "r.yaml", d)

    return {"out": out, "recipe": recipe}


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_resume_of_a_finished_run_trains_nothing_and_changes_nothing(world):
    out, lines = world["out"], []
    train(load_recipe(world["recipe"]()), say=lambda m: None)
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    before = _digests(out)
    result = train(load_recipe(world["recipe"]()), resume=True, say=lines.append)
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # the Trainer alone writes checkpoint-5
    assert _digests(out) == before
    assert result.metrics == {"global_step": 4}
    assert any(line.startswith("nothing to train: checkpoint-4 is the run's last step (4)") for line in lines)


def test_resume_after_a_stop_before_the_final_save_writes_it_from_the_last_checkpoint(world):
    out = world["out"]
    train(load_recipe(world["recipe"]()), say=lambda m: None)
    final = load_file(out / ADAPTER)
    for name in ("oasst_run.json", ADAPTER, "adapter_config.json"):  # as if killed right after checkpoint-4
        (out / name).unlink()
    lines = []
    train(load_recipe(world["recipe"]()), resume=True, say=lines.append)
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    saved = load_file(out / ADAPTER)
    assert saved.keys() == final.keys() and all((saved[k] == final[k]).all() for k in final)
    assert json.loads((out / "oasst_run.json").read_text())["mode"] == "lora"
    assert any("checkpoint-4 was the last step (4); saved from it" in line for line in lines)


def test_overwrite_removes_the_older_runs_checkpoints(world):
    out = world["out"]
    train(load_recipe(world["recipe"]()), say=lambda m: None)
    (out / "notes.txt").write_text("mine")  # not a run's file: stays
    lines = []
    train(load_recipe(world["recipe"](max_steps=2)), overwrite=True, say=lines.append)
    assert _checkpoints(out) == ["checkpoint-2"]
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert (out / "notes.txt").read_text() == "mine"
    said = [line for line in lines if line.startswith("overwrite: removed the earlier run's")]
    assert said and "checkpoint-2, checkpoint-4" in said[0]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2  # the new run's checkpoint, not the old one's


def test_a_resume_says_where_it_continues(world, tmp_path):
    train(load_recipe(world["recipe"]()), say=lambda m: None)
    lines = []
    ckpt = world["out"] / "checkpoint-2"
    train(load_recipe(world["recipe"]()), resume=str(ckpt), output_dir=tmp_path / "again", say=lines.append)
    assert "resume: from checkpoint-2, step 2 of 4" in lines
    assert _checkpoints(tmp_path / "again") == ["checkpoint-4"]


def test_resume_and_overwrite_together_are_refused_before_anything_loads(world, capsys):
    from oasst_peft.cli import main
    from oasst_peft.errors import OasstError

    recipe = world["recipe"]()
    with pytest.raises(OasstError, match="--resume and --overwrite contradict each other"):
        train(load_recipe(recipe), resume=True, overwrite=True, say=lambda m: None)
    with pytest.raises(SystemExit) as stop:
        main(["train", str(recipe), "--resume", "--overwrite"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err  # a usage error, refused before the recipe is read
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: oasst-peft train: Invalid value: --resume continues the run in the output dir, --overwrite "
        "replaces it: pass one (see oasst-peft train --help)"
    ]
    assert not world["out"].exists()


def test_a_dry_run_resume_checks_the_checkpoint_as_the_real_resume_would(world):
    from oasst_peft.errors import OasstError

    with pytest.raises(OasstError, match="--resume: no complete checkpoint"):
        train(load_recipe(world["recipe"]()), resume=True, dry_run=True, say=lambda m: None)
    train(load_recipe(world["recipe"]()), say=lambda m: None)
    lines: list[str] = []
    train(load_recipe(world["recipe"]()), resume=True, dry_run=True, say=lines.append)
    assert "resume: would continue from checkpoint-4, step 4" in lines
    with pytest.raises(
        OasstError, match=r"checkpoint-4 cannot continue this run: the recipe changed \(max_steps"
    ):
        train(load_recipe(world["recipe"](max_steps=6)), resume=True, dry_run=True, say=lambda m: None)
    lines.clear()
    train(load_recipe(world["recipe"](max_steps=6)), resume=True, dry_run=True, force=True, say=lines.append)
    assert any(line.startswith("resume: checkpoint-4: the recipe changed") for line in lines)
