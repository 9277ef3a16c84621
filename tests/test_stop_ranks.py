"""Graceful stop on 2 ranks (issue 12 item 4): a signal to one worker stops both after the same step.

Also the launchers' shutdown timeout: torchrun and DeepSpeed's per-node launcher give a signalled worker
``--shutdown-timeout`` seconds to finish (a save) before they SIGKILL it, instead of their fixed 30 s.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oasst_peft.checkpoints import is_complete
from oasst_peft.launch import DEFAULT_SHUTDOWN_TIMEOUT, LaunchOptions, launch_command
from tests import ranks
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

STEPS = 6


def test_launch_commands_carry_the_shutdown_timeout(tmp_path):
    cmd = launch_command(LaunchOptions(nproc=2), ["train", "r.yaml", "--shutdown-timeout", "77"])
    assert cmd[cmd.index("--shutdown-timeout") + 1] == str(DEFAULT_SHUTDOWN_TIMEOUT)
    assert "77" not in cmd  # the workers do not get the launcher flag
    cmd = launch_command(LaunchOptions(nproc=2, shutdown_timeout=1200), ["train", "r.yaml"])
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "1200"
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=2\n")
    cmd = launch_command(LaunchOptions(hostfile=hosts, shutdown_timeout=1200), ["train", "r.yaml"])
    assert cmd[1:4] == ["-m", "oasst_peft.ds_launch", "--shutdown-timeout=1200"]


def test_the_deepspeed_runner_starts_this_node_launcher_with_the_timeout():
    from oasst_peft.ds_launch import node_command, split_args

    local = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "--module", "m"]
    assert node_command(local, 600) == [
        *local[:3],
        "oasst_peft.ds_launch",
        "--node-launcher",
        "--shutdown-timeout=600",
        *local[4:],
    ]
    assert node_command(["pkill", "-f", "x"], 600) == ["pkill", "-f", "x"]
    assert split_args(["--node-launcher", "--shutdown-timeout=5", "--world_info=x"]) == (
        5,
        True,
        ["--world_info=x"],
    )


def test_zero_shutdown_timeout_is_one_line():
    from oasst_peft.errors import OasstError
    from oasst_peft.launch import check_options

    with pytest.raises(OasstError, match="--shutdown-timeout: must be >= 1"):
        check_options(LaunchOptions(nproc=2, shutdown_timeout=0))


SLOW_WORKER = r"""
import os, signal, sys, time
from pathlib import Path
done = Path(sys.argv[1]) / f"saved-{os.environ.get('LOCAL_RANK', '0')}"
def on_signal(signum, frame):
    time.sleep(float(os.environ["SAVE_SECONDS"]))  # a save that takes a while
    done.write_text("complete")
    sys.exit(130)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
(Path(sys.argv[1]) / f"ready-{os.environ.get('LOCAL_RANK', '0')}").write_text("")
time.sleep(120)
"""


def _node_launch(tmp: Path, launcher: str, timeout: int) -> list[str]:
    script = tmp / "worker.py"
    script.write_text(SLOW_WORKER, encoding="utf-8")
    if launcher == "torchrun":
        run = [sys.executable, "-m", "oasst_peft.torchrun", "--standalone", "--nproc-per-node", "1"]
        return [*run, "--shutdown-timeout", str(timeout), str(script), str(tmp)]
    info = base64.urlsafe_b64encode(json.dumps({"localhost": [0]}).encode()).decode()
    node = [sys.executable, "-m", "oasst_peft.ds_launch", "--node-launcher", f"--shutdown-timeout={timeout}"]
    return [
        *node,
        f"--world_info={info}",
        "--master_addr=127.0.0.1",
        "--master_port=29561",
        "--no_local_rank",
        str(script),
        str(tmp),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize(("timeout", "saved"), [(20, True), (1, False)])
def test_the_launcher_waits_the_shutdown_timeout_for_a_save(tmp_path, launcher, timeout, saved):
    proc = subprocess.Popen(
        _node_launch(tmp_path, launcher, timeout),
        env=ranks.env(SAVE_SECONDS="4"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready-0").exists():
            assert proc.poll() is None and time.time() < deadline, "the worker did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what run_launcher forwards on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "saved-0").exists() == saved
    if launcher == "torchrun":  # oasst_peft.torchrun: the shell's status for Ctrl-C, not torchrun's traceback
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]


def _stopped_together(out: Path) -> bool:
    ckpt = out / "checkpoint-3"
    later = [p for p in out.glob("checkpoint-*") if int(p.name.split("-")[1]) > 3]
    files = {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"}
    return (
        is_complete(ckpt)
        and files <= {p.name for p in ckpt.iterdir()}
        and json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
        and not later
    )


def _signal_one_worker(tmp_path: Path, recipe: Path, out: Path, faults: str, wait: float):
    marker = tmp_path / f"{out.name}.marker"
    args = ["train", str(recipe), "--max-steps", str(STEPS), "--output-dir", str(out)]
    proc = ranks.start(tmp_path, faults, *args, FAULT_RANK="1", FAULT_STEP="2", FAULT_MARKER=str(marker))
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, ranks.output(proc)[1][-3000:]
            assert time.time() < deadline, "rank 1 never reached step 3"
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGINT)  # rank 1 only; torchrun and rank 0 see nothing
        while "SIGINT: finishing this step" not in ranks.output(proc)[1]:
            assert time.time() < deadline, ranks.output(proc)[1][-3000:]
            time.sleep(0.05)
        Path(str(marker) + ".go").touch()
        try:
            rc = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            rc = None  # ranks deadlocked in the collective save
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, *ranks.output(proc)


@pytest.mark.slow
def test_sigint_to_one_worker_stops_both_at_the_same_step_and_resume_matches(tmp_path):
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl", n=24)
    d = recipe_dict(base, data, tmp_path / "run", tmp_path / "cache", per_device_train_batch_size=2)
    recipe = write_recipe(tmp_path / "recipe.yaml", d)
    reference = tmp_path / "reference"
    res = ranks.launch("train", str(recipe), "--max-steps", str(STEPS), "--output-dir", str(reference))
    assert res.returncode == 0, res.stderr[-4000:]

    out = tmp_path / "stopped"
    rc, stdout, stderr = _signal_one_worker(tmp_path, recipe, out, "pause", wait=240)
    assert rc is not None and rc != 0, stderr[-3000:]  # interrupted runs exit non-zero
    assert _stopped_together(out), stderr[-3000:]
    assert f"stopped by a signal to another rank: checkpoint saved in {out / 'checkpoint-3'}" in stdout

    res = ranks.launch("train", str(recipe), "--max-steps", str(STEPS), "--output-dir", str(out), "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert ranks.differing(ranks.adapter(out), ranks.adapter(reference)) == []

    # Control: each rank keeps its own flag. Rank 1 stops alone; the checkpoint is not saved together.
    control = tmp_path / "control"
    rc, _, stderr = _signal_one_worker(tmp_path, recipe, control, "pause,local-stop", wait=60)
    assert not _stopped_together(control), stderr[-3000:]
