"""Two CPU ranks over gloo for tests: a torchrun of the CLI, or of a test-only driver with one fault planted.

``launch`` runs ``oasst-peft train ... --nproc 2`` as a user would. ``Ranks`` starts torchrun on a driver
(written to tmp, never shipped) that patches one thing before it calls the CLI, selected by ``FAULT``:

* ``no-sampler-epoch``: ``speed.SamplerEpoch`` does nothing (the control of the resume-order test);
* ``local-stop``: ``GracefulStop`` keeps its flag to itself (the control of the stop-flag test);
* ``dump-trainable``: not a fault: each rank saves its trainable weights after training to ``DUMP_DIR``;
* ``pause``: rank ``FAULT_RANK`` writes its pid to a marker at the start of step ``FAULT_STEP + 1`` and waits
  for ``<marker>.go``, so a signal sent to that one worker lands inside that step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import os, sys, time
from pathlib import Path

faults = os.environ.get("FAULT", "").split(",")
if "no-sampler-epoch" in faults:
    from oasst_peft import speed
    speed.SamplerEpoch.on_epoch_begin = lambda self, args, state, control, **kwargs: control
if "local-stop" in faults:
    from oasst_peft import checkpoints
    checkpoints.GracefulStop.shared_flag = lambda self, args: self.stopped
if "pause" in faults and os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
    from tests.pause import pause_at
    pause_at(int(os.environ["FAULT_STEP"]), Path(os.environ["FAULT_MARKER"]))

if "dump-trainable" in faults:
    import transformers
    from safetensors.torch import save_file

    trainer_train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        result = trainer_train(self, *args, **kwargs)
        weights = {n: p.detach().clone().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(weights, os.path.join(os.environ["DUMP_DIR"], f"rank{os.environ['RANK']}.safetensors"))
        return result

    transformers.Trainer.train = train

from oasst_peft.cli import main

main(sys.argv[1:])
"""


def env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    e = {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    e.pop("OASST_PEFT_DEBUG", None)
    e.update(extra)
    return e


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m oasst_peft.cli train ... --nproc 2``, offline."""
    return subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *args, "--nproc", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=timeout,
    )


def driver_command(tmp: Path, *args: str) -> list[str]:
    driver = tmp / "ranks_driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*run, str(driver), *args]


def start(tmp: Path, faults: str, *args: str, **extra: str) -> subprocess.Popen:
    """torchrun of the driver with ``FAULT=faults``; output goes to files in ``tmp``."""
    stamp = time.monotonic_ns()
    out = open(tmp / f"ranks-{stamp}.out", "w+b")  # noqa: SIM115 - closed by the caller through the Popen
    err = open(tmp / f"ranks-{stamp}.err", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(
        driver_command(tmp, *args),
        env=env(FAULT=faults, **extra),
        cwd=ROOT,
        stdout=out,
        stderr=err,
        start_new_session=True,  # the test can end torchrun and its workers together (os.killpg)
    )
    proc.out_file, proc.err_file = out, err
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    texts = []
    for f in (proc.out_file, proc.err_file):
        f.flush()
        texts.append(Path(f.name).read_text(encoding="utf-8", errors="replace"))
    return texts[0], texts[1]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def differing(a: dict, b: dict) -> list[str]:
    """Names of tensors that are not exactly equal (or missing on one side)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]
