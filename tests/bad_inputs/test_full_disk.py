"""A disk that fills up in the middle of a training run: one line, and the last complete checkpoint kept."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from oasst_peft.checkpoints import is_complete
from oasst_peft.cli import main
from tests.bad_inputs.corpus import Corpus


def _train_until_disk_fills(c: Corpus, monkeypatch, capsys, fill) -> tuple[int, str]:
    """Train 4 steps; ``fill`` makes the save of checkpoint-4 fail the way a full disk does."""
    fill(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", str(c.recipe()), "--max-steps", "4"])
    finally:
        torch.set_num_threads(threads)
    return e.value.code, capsys.readouterr().err


def _full_json_write(monkeypatch):
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if Path(json_path).parent.name == "checkpoint-4":
            raise OSError(errno.ENOSPC, "No space left on device", json_path)
        save(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)


def _full_torch_save(monkeypatch):
    """torch.save on a full disk raises a bare RuntimeError from its zip writer; the disk then has ~0 free."""
    import shutil

    save = torch.save
    usage = shutil.disk_usage

    def torch_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)


@pytest.mark.parametrize("fill", [_full_json_write, _full_torch_save], ids=["json-write", "torch-save"])
def test_full_disk_in_a_run_is_one_line_and_keeps_the_last_checkpoint(
    fill, tmp_path, shared, monkeypatch, capsys
):
    c = Corpus(tmp_path, shared)
    code, err = _train_until_disk_fills(c, monkeypatch, capsys, fill)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the progress bars
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert errors[0].startswith(f"error: output_dir: the disk of {c.run} is full"), errors[0]
    assert (
        "checkpoint-2 is the latest complete checkpoint: free some space, then continue with --resume"
        in errors[0]
    )
    assert is_complete(c.run / "checkpoint-2") and not is_complete(c.run / "checkpoint-4")
    assert (c.run / "latest").read_text().strip() == "checkpoint-2"
    assert not (c.run / "adapter_model.safetensors").exists()
