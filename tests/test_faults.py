"""Fault injection: tiny-model training and merges in a subprocess, stopped or killed at chosen points.

A test-only driver (written to tmp, never shipped) runs ``oasst_peft.cli`` with one fault planted by
monkeypatching, so every kill lands at the same place on every run:

* ``pause``: at the start of a chosen step the run writes a marker and waits, so the test's signal
  arrives in the middle of that step;
* ``kill-state``: while the Trainer writes a chosen checkpoint, it writes half of
  ``trainer_state.json`` (the file it writes last) and SIGKILLs itself;
* ``kill-merge``: the merge SIGKILLs itself right after the first bytes of its first shard.

What is left on disk must be complete and resumable, and a resumed run must end with the same loss
and adapter weights as an uninterrupted run of the same length (fixed seed, same data order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oasst_peft.checkpoints import is_complete, latest_checkpoint, resolve_resume
from oasst_peft.cli import main
from oasst_peft.errors import OasstError
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # every run trains 6 optimizer steps; checkpoints every 2

DRIVER = r'''
"""Test-only: run the oasst-peft CLI with one fault planted (see tests/test_faults.py)."""
import os, signal, sys, time
from pathlib import Path

fault = os.environ.get("FAULT", "")
step = int(os.environ.get("FAULT_STEP", "0"))
marker = Path(os.environ.get("FAULT_MARKER", "marker"))

if fault == "pause":
    from tests.pause import pause_at

    pause_at(step, marker)

elif fault == "kill-state":
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if Path(json_path).parent.name == f"checkpoint-{step}":
            save(self, json_path)
            text = Path(json_path).read_text(encoding="utf-8")
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                os.fsync(f.fileno())
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, json_path)

    TrainerState.save_to_json = save_to_json

elif fault == "kill-merge":
    from merge_tools.writer import SafetensorsWriter

    import threading

    write_at = SafetensorsWriter.write_at
    first = threading.Lock()  # merge workers write in parallel: the first one in names its shard and kills

    def write_then_die(self, chunk, offset):
        write_at(self, chunk, offset)
        first.acquire()  # never released: the others wait here until the process dies
        os.fsync(self._fd)
        marker.write_text(str(self.path))
        os.kill(os.getpid(), signal.SIGKILL)

    SafetensorsWriter.write_at = write_then_die

from oasst_peft.cli import main

main(sys.argv[1:])
'''

pytestmark = pytest.mark.slow  # spawns processes


class Proc:
    """A driver subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, world: dict, fault: str, step: int, *args: str):
        self.marker = world["tmp"] / f"{fault}-{step}-{time.monotonic_ns()}.marker"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FAULT": fault,
            "FAULT_STEP": str(step),
            "FAULT_MARKER": str(self.marker),
        }
        env.pop("OASST_PEFT_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(world["driver"]), *args],
            env=env,
            cwd=world["tmp"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, sink: list[bytes]) -> None:
        for chunk in iter(lambda: pipe.read1(4096), b""):
            sink.append(chunk)

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode("utf-8", "replace")

    def wait_for(self, what, timeout: float = 120) -> None:
        """Wait until ``what()`` is true; fail with the process's output if it ends or times out first."""
        deadline = time.time() + timeout
        while not what():
            if self.proc.poll() is not None and not what():
                time.sleep(0.2)  # let the pumps drain
                if what():
                    return
                pytest.fail(f"driver ended (rc {self.proc.returncode}) first:\n{self.stderr[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def go(self) -> None:
        Path(str(self.marker) + ".go").touch()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train ~10x faster on one thread than on two busy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    base = write_base(tmp / "base")
    data = write_conversations(tmp / "convs.jsonl")
    recipe = write_recipe(tmp / "recipe.yaml", recipe_dict(base, data, tmp / "run", tmp / "cache"))
    driver = tmp / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    return {"tmp": tmp, "base": base, "recipe": recipe, "driver": driver}


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def train_args(world: dict, out: Path, *extra: str) -> list[str]:
    return ["train", str(world["recipe"]), "--max-steps", str(STEPS), "--output-dir", str(out), *extra]


def final_state(out: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss logged at the last step, final adapter tensors) of a finished run."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    return losses[STEPS], load_file(str(out / "adapter_model.safetensors"))


def assert_same_run(out: Path, reference: Path) -> None:
    loss, weights = final_state(out)
    ref_loss, ref_weights = final_state(reference)
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(world) -> Path:
    """The same run, never interrupted (in-process, through the CLI)."""
    out = world["tmp"] / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            main(train_args(world, out))
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    return out


def test_sigint_during_a_step_finishes_it_saves_and_resume_matches(world, reference, capsys):
    out = world["tmp"] / "sigint"
    p = Proc(world, "pause", 2, *train_args(world, out))  # pauses inside step 3
    p.wait_for(p.marker.exists)
    p.proc.send_signal(signal.SIGINT)
    p.wait_for(lambda: "SIGINT: finishing this step" in p.stderr)
    p.go()
    rc = p.finish()
    assert rc == 130, p.stderr[-3000:]
    ckpt = out / "checkpoint-3"
    assert f"stopped by SIGINT: checkpoint saved in {ckpt}; continue with --resume" in p.stdout
    assert f"; curves: {out / 'training_curves.png'}" in p.stdout and (out / "training_curves.png").is_file()
    assert "Traceback" not in p.stderr
    assert is_complete(ckpt) and (ckpt / "adapter_model.safetensors").is_file()
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "rng_state.pth").is_file()
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert not (out / "adapter_model.safetensors").exists(), "an interrupted run writes no final adapter"

    code, stdout, _ = cli(capsys, *train_args(world, out, "--resume"))
    assert code == 0 and f"done: adapter saved in {out}" in stdout
    assert_same_run(out, reference)


def test_second_signal_exits_at_once_without_saving(world, reference, capsys):
    out = world["tmp"] / "twice"
    p = Proc(world, "pause", 3, *train_args(world, out))  # pauses inside step 4
    p.wait_for(p.marker.exists)
    p.proc.send_signal(signal.SIGTERM)
    p.wait_for(lambda: "SIGTERM: finishing this step" in p.stderr)
    p.proc.send_signal(signal.SIGINT)  # the step is still paused: only an immediate exit ends it
    rc = p.finish(timeout=30)
    assert rc == 130
    assert "second signal: exiting now without saving" in p.stderr
    assert not (out / "checkpoint-4").exists()
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert latest_checkpoint(out) == out / "checkpoint-2"

    code, _, _ = cli(capsys, *train_args(world, out, "--resume"))
    assert code == 0
    assert_same_run(out, reference)


def test_kill_9_while_a_checkpoint_is_written_keeps_the_previous_one(world, reference, capsys):
    out = world["tmp"] / "kill9"
    p = Proc(world, "kill-state", 4, *train_args(world, out))
    rc = p.finish()
    assert rc == -signal.SIGKILL, p.stderr[-3000:]
    assert p.marker.read_text() == "killed"
    torn, previous = out / "checkpoint-4", out / "checkpoint-2"
    # Everything but the state file made it to disk; the state file is cut in half.
    assert (torn / "adapter_model.safetensors").is_file() and (torn / "optimizer.pt").is_file()
    assert (torn / "trainer_state.json").stat().st_size > 0 and not is_complete(torn)
    # The previous checkpoint is whole and the pointer still names it.
    assert is_complete(previous)
    assert load_file(str(previous / "adapter_model.safetensors"))
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert latest_checkpoint(out) == previous
    with pytest.raises(OasstError, match="checkpoint-4 is incomplete .*pick an earlier checkpoint"):
        resolve_resume(out, "checkpoint-4")

    code, stdout, err = cli(capsys, *train_args(world, out, "--resume"))
    assert code == 0, err
    assert is_complete(torn), "the resumed run rewrites checkpoint-4 whole"
    assert_same_run(out, reference)


def test_kill_9_while_a_merge_writes_leaves_no_out_and_a_rerun_succeeds(world, reference, capsys):
    out = world["tmp"] / "merged"
    p = Proc(world, "kill-merge", 0, "merge", str(reference), "--out", str(out), "--no-verify")
    rc = p.finish()
    assert rc == -signal.SIGKILL, p.stderr[-3000:]
    shard = Path(p.marker.read_text())
    assert shard.is_file() and shard.parent.name.startswith(".merged.partial-")  # it was mid-shard
    assert not out.exists()

    code, stdout, err = cli(capsys, "merge", reference, "--out", out, "--no-verify")
    assert code == 0, err
    assert f"merged model: {out}" in stdout
    assert not shard.parent.exists(), "the dead merge's temp folder is cleaned up by the next one"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".merged")] == []
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] % 16 == 0
