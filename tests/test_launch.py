"""The built-in launcher: argument lists for torchrun and the DeepSpeed launcher, flag stripping, dry runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oasst_peft.cli import app
from oasst_peft.errors import OasstError
from oasst_peft.launch import LaunchOptions, launch_command, read_hostfile, relaunch, worker_args

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ["pythia12b-sft1.yaml", "pythia12b-sft4.yaml", "stablelm7b.yaml", "bloom-zh-3b.yaml"]


def _offline(monkeypatch) -> None:
    """No hub calls even when the suite runs without HF_HUB_OFFLINE (the hub reads it at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_worker_args_drop_launcher_flags_in_both_forms():
    argv = [
        "train",
        "r.yaml",
        "--nproc",
        "8",
        "--set",
        "peft.r=32",
        "--nnodes=2",
        "--node-rank",
        "1",
        "--master-addr=10.0.0.1",
        "--master-port",
        "29501",
        "--hostfile",
        "hosts",
        "--dry-run",
        "--max-steps",
        "5",
    ]
    assert worker_args(argv) == ["train", "r.yaml", "--set", "peft.r=32", "--max-steps", "5"]


def test_single_node_torchrun_is_standalone_and_runs_the_cli_module():
    cmd = launch_command(LaunchOptions(nproc=8), ["train", "r.yaml", "--nproc", "8", "--resume"])
    assert cmd[:3] == [sys.executable, "-m", "oasst_peft.torchrun"]
    assert _after(cmd, "--nproc-per-node") == "8"
    assert "--standalone" in cmd and "--master-addr" not in cmd
    i = cmd.index("--module")
    assert cmd[i + 1 :] == ["oasst_peft.cli", "train", "r.yaml", "--resume"]


def test_multi_node_torchrun_passes_the_rendezvous():
    opts = LaunchOptions(nproc=4, nnodes=2, node_rank=1, master_addr="node0", master_port=29600)
    cmd = launch_command(opts, ["train", "r.yaml", "--nproc", "4", "--nnodes", "2"])
    assert "--standalone" not in cmd
    assert _after(cmd, "--nnodes") == "2"
    assert _after(cmd, "--node-rank") == "1"
    assert _after(cmd, "--master-addr") == "node0"
    assert _after(cmd, "--master-port") == "29600"
    assert cmd[cmd.index("--module") + 1 :] == ["oasst_peft.cli", "train", "r.yaml"]


def test_single_node_with_a_port_uses_it():
    cmd = launch_command(LaunchOptions(nproc=2, master_port=29700), ["train", "r.yaml"])
    assert _after(cmd, "--master-port") == "29700" and _after(cmd, "--master-addr") == "127.0.0.1"


def test_hostfile_uses_the_deepspeed_launcher(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nworker-0 slots=8\n\nworker-1 slots=8\n")
    opts = LaunchOptions(nproc=None, hostfile=hosts, master_addr="worker-0")
    cmd = launch_command(opts, ["train", "r.yaml", "--hostfile", str(hosts)])
    assert cmd[:3] == [sys.executable, "-m", "oasst_peft.ds_launch"]  # DeepSpeed's runner, longer shutdown
    assert _after(cmd, "--hostfile") == str(hosts.resolve())
    assert "--num_gpus" not in cmd  # every slot of the hostfile
    assert _after(cmd, "--master_addr") == "worker-0"
    assert "--no_local_rank" in cmd
    assert cmd[cmd.index("--module") + 1 :] == ["oasst_peft.cli", "train", "r.yaml"]
    cmd = launch_command(LaunchOptions(nproc=4, nnodes=2, hostfile=hosts), ["train", "r.yaml"])
    assert _after(cmd, "--num_gpus") == "4" and _after(cmd, "--num_nodes") == "2"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("worker-0 slots=8\nworker-0 slots=8\n", "listed twice"),
        ("worker-0 8\n", ":1: expected 'host slots=N'"),
        ("# nothing\n\n", "lists no hosts"),
    ],
)
def test_bad_hostfiles_are_one_line_errors(tmp_path, text, needle):
    p = tmp_path / "hostfile"
    p.write_text(text)
    with pytest.raises(OasstError, match=needle):
        read_hostfile(p)


def test_missing_hostfile(tmp_path):
    with pytest.raises(OasstError, match="not found"):
        launch_command(LaunchOptions(hostfile=tmp_path / "nope"), ["train", "r.yaml"])


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (LaunchOptions(nproc=0), "--nproc: must be >= 1"),
        (LaunchOptions(nproc=2, nnodes=2), "--master-addr: required"),
        (LaunchOptions(nproc=2, nnodes=2, node_rank=2, master_addr="a"), "--node-rank: must be in"),
        (LaunchOptions(nproc=2, master_port=70000), "not a port"),
    ],
)
def test_impossible_options_are_refused(opts, needle):
    with pytest.raises(OasstError, match=needle):
        launch_command(opts, ["train", "r.yaml"])


def test_hostfile_with_node_rank_or_too_many_nodes(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("a slots=2\n")
    with pytest.raises(OasstError, match="--node-rank: not used with --hostfile"):
        launch_command(LaunchOptions(hostfile=hosts, node_rank=1), ["train", "r.yaml"])
    with pytest.raises(OasstError, match="lists 1"):
        launch_command(LaunchOptions(hostfile=hosts, nnodes=2), ["train", "r.yaml"])


def test_relaunch_refuses_inside_a_worker(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(OasstError, match="already runs under a launcher"):
        relaunch(LaunchOptions(nproc=2), ["train", "r.yaml"], say=lambda _: None)


def test_relaunch_runs_the_command_and_returns_its_exit_code(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    seen = {}

    def fake(cmd):
        seen["cmd"] = cmd
        return 3

    monkeypatch.setattr("oasst_peft.launch.run_launcher", fake)
    lines: list[str] = []
    code = relaunch(LaunchOptions(nproc=2), ["train", "r.yaml", "--nproc", "2"], say=lines.append)
    assert code == 3
    assert lines[0].startswith("launch: ") and "oasst_peft.torchrun" in lines[0]
    assert seen["cmd"][-2:] == ["train", "r.yaml"]


def test_run_launcher_returns_the_child_exit_code():
    from oasst_peft.launch import run_launcher

    assert run_launcher([sys.executable, "-c", "import sys; sys.exit(7)"]) == 7


def test_run_launcher_forwards_ctrl_c_once_and_exits_130():
    """The child (standing in for torchrun) gets the SIGINT sent to this process and may finish its work."""
    import os
    import signal
    import threading

    from oasst_peft.launch import run_launcher

    child = (
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
        "print('ready', flush=True)\n"
        "t = time.time()\n"
        "while not got and time.time() - t < 20: time.sleep(0.01)\n"
        "time.sleep(0.2)\n"  # 'saving a checkpoint' after the signal
        "sys.exit(3 if got else 0)\n"
    )
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = run_launcher([sys.executable, "-c", child])
    finally:
        timer.cancel()
    assert code == 130


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_recipes_dry_run_on_8_gpus_prints_the_launch_line(seed, monkeypatch):
    recipe = str(ROOT / "recipes" / seed)
    argv = ["train", recipe, "--nproc", "8", "--dry-run"]
    monkeypatch.setattr(sys, "argv", ["oasst-peft", *argv])
    _offline(monkeypatch)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("launch: "))
    assert (
        "-m oasst_peft.torchrun --nproc-per-node 8 --standalone --shutdown-timeout 900 --module oasst_peft.cli train"
        in line
    )
    assert line.endswith(f"oasst_peft.cli train {recipe}")
    assert "dry run" in res.output


@pytest.mark.slow
def test_cli_dry_run_multi_node_from_a_subprocess(tmp_path):
    """The real entry point, as a user types it; nothing is started."""
    recipe = ROOT / "recipes" / "stablelm7b.yaml"
    argv = ["train", str(recipe), "--nproc", "8", "--nnodes", "2", "--node-rank", "1"]
    argv += ["--master-addr", "10.1.2.3", "--dry-run"]
    res = subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("launch: "))
    assert "--nnodes 2 --node-rank 1 --master-addr 10.1.2.3 --master-port 29500" in line
    assert line.endswith(f"--module oasst_peft.cli train {recipe}")


def test_cli_multi_node_without_master_addr_is_a_user_error(monkeypatch):
    recipe = str(ROOT / "recipes" / "stablelm7b.yaml")
    argv = ["train", recipe, "--nproc", "8", "--nnodes", "2", "--dry-run"]
    monkeypatch.setattr(sys, "argv", ["oasst-peft", *argv])
    res = CliRunner().invoke(app, argv)
    assert res.exit_code != 0
    assert isinstance(res.exception, OasstError) and "--master-addr" in str(res.exception)


def test_a_deepspeed_recipe_without_nproc_starts_one_process_under_the_launcher(monkeypatch):
    """DeepSpeed needs a launcher's environment (else it goes looking for MPI): --nproc 1 is implied."""
    _offline(monkeypatch)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    res = CliRunner().invoke(app, ["train", "demo-smollm2", "--set", "deepspeed_config=zero2", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert (
        lines[0]
        == "deepspeed_config: DeepSpeed runs under a launcher; starting one process (--nproc N for more)"
    )
    assert lines[1].startswith("launch: ") and "--nproc-per-node 1" in lines[1]
    plain = CliRunner().invoke(app, ["train", "demo-smollm2", "--dry-run"])
    assert plain.exit_code == 0 and "launch: " not in plain.output  # no deepspeed: no launcher


def test_more_processes_than_cpu_cores_is_said_on_a_machine_without_gpu():
    import os

    import torch

    from oasst_peft.launch import check_devices

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only note")
    cores = len(os.sched_getaffinity(0))
    lines: list[str] = []
    check_devices(LaunchOptions(nproc=cores), say=lines.append)
    assert lines == []
    check_devices(LaunchOptions(nproc=cores + 1), say=lines.append)
    assert lines == [
        f"launch: {cores + 1} processes on {cores} CPU core(s) and no GPU: they share the cores, so this trains "
        f"slower than --nproc {cores}"
    ]
