"""Multi-GPU and multi-node launch: ``oasst-peft train RECIPE --nproc N`` reruns itself under a launcher.

Without ``--hostfile`` the launcher is torchrun (``python -m oasst_peft.torchrun``: torchrun itself,
without its traceback when Ctrl-C ends a run): one node with
``--nproc N``, or several nodes started one by one with ``--nnodes``, ``--node-rank``, ``--master-addr``
and ``--master-port``. With ``--hostfile`` it is the DeepSpeed launcher, which starts every node listed
in the hostfile over ssh. Either way the workers run ``python -m oasst_peft.cli train ...`` with the
same arguments minus the launcher flags, so they never relaunch. Commands are argument lists, never
shell strings; the exact list is printed before it runs (``--dry-run`` prints it and stops).

Ctrl-C / SIGTERM: each launcher passes the signal to its workers and kills them after a shutdown timeout
(30 s by default in both, too short to save a 7B checkpoint with optimizer state). The workers get
``--shutdown-timeout`` seconds instead (``DEFAULT_SHUTDOWN_TIMEOUT`` unless set): torchrun through its own
``--shutdown-timeout``, the DeepSpeed launcher through ``oasst_peft.ds_launch``, which runs DeepSpeed's
per-node launcher with that timeout.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.errors import OasstError

CHILD_MODULE = "oasst_peft.cli"
DS_RUNNER_MODULE = "oasst_peft.ds_launch"  # DeepSpeed's runner, with the shutdown timeout
DEFAULT_MASTER_PORT = 29500
# Seconds the launchers give workers to save after a signal before they SIGKILL them (theirs: 30).
DEFAULT_SHUTDOWN_TIMEOUT = 900
# Launcher flags of ``oasst-peft train``; all take a value. The workers get the command line without them.
LAUNCH_FLAGS = (
    "--nproc",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--hostfile",
    "--shutdown-timeout",
)
# Set by torchrun and the DeepSpeed launcher in every worker.
WORKER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass(frozen=True)
class LaunchOptions:
    """How to spread one training run over processes and nodes.

    ``nproc``: processes (GPUs) per node; ``None`` with a hostfile means every slot the hostfile lists.
    ``nnodes`` / ``node_rank`` / ``master_addr`` / ``master_port``: the torchrun rendezvous for several
    nodes (run the same command on each node with its own ``node_rank``). ``hostfile``: an MPI-style
    file (``worker-0 slots=8`` per line) handed to the DeepSpeed launcher, which starts all nodes itself.
    ``shutdown_timeout``: seconds a worker has to save a checkpoint after Ctrl-C before the launcher kills it.
    """

    nproc: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: Path | None = None
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT


def read_hostfile(path: Path) -> dict[str, int]:
    """Hosts and their slots from an MPI-style hostfile (``host slots=N``; ``#`` comments, blank lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OasstError(f"--hostfile: {path} not found (one 'host slots=N' line per node)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OasstError(f"--hostfile: cannot read {path} ({e})") from None
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise OasstError(f"{path}:{n}: expected 'host slots=N' (e.g. 'worker-0 slots=8'), got {line!r}")
        host, slots = m.group(1), int(m.group(2))
        if host in hosts:
            raise OasstError(f"{path}:{n}: host {host} is listed twice; list each node once")
        if slots < 1:
            raise OasstError(f"{path}:{n}: slots must be >= 1 for {host}")
        hosts[host] = slots
    if not hosts:
        raise OasstError(f"--hostfile: {path} lists no hosts (one 'host slots=N' line per node)")
    return hosts


def check_options(opts: LaunchOptions) -> None:
    """One-line errors for launch options that cannot work together."""
    if opts.nproc is not None and opts.nproc < 1:
        raise OasstError(f"--nproc: must be >= 1 (got {opts.nproc})")
    if opts.shutdown_timeout < 1:
        raise OasstError(
            f"--shutdown-timeout: must be >= 1 second (got {opts.shutdown_timeout}); "
            "a checkpoint with optimizer state can take minutes to save"
        )
    if opts.nnodes < 1:
        raise OasstError(f"--nnodes: must be >= 1 (got {opts.nnodes})")
    if opts.master_port is not None and not 0 < opts.master_port < 65536:
        raise OasstError(f"--master-port: not a port number: {opts.master_port}")
    if opts.hostfile is not None:
        hosts = read_hostfile(opts.hostfile)
        if opts.node_rank != 0:
            raise OasstError(
                "--node-rank: not used with --hostfile (the DeepSpeed launcher starts every node itself); "
                "drop --hostfile to start the nodes one by one under torchrun"
            )
        if opts.nnodes > len(hosts):
            raise OasstError(
                f"--nnodes: {opts.nnodes} nodes asked for, but {opts.hostfile} lists {len(hosts)}"
            )
        return
    if not 0 <= opts.node_rank < opts.nnodes:
        raise OasstError(f"--node-rank: must be in [0, {opts.nnodes - 1}] for --nnodes {opts.nnodes}")
    if opts.nnodes > 1 and not opts.master_addr:
        raise OasstError(
            "--master-addr: required with --nnodes > 1: the address of node 0, reachable from every node"
        )


def worker_args(argv: list[str]) -> list[str]:
    """``argv`` without the launcher flags (``--nproc 8`` and ``--nproc=8`` forms) and without ``--dry-run``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCH_FLAGS or arg == "--dry-run":
            continue
        out.append(arg)
    return out


def launch_command(opts: LaunchOptions, argv: list[str]) -> list[str]:
    """The launcher's argument list that runs ``oasst-peft`` with ``argv`` (minus launcher flags) on every rank."""
    check_options(opts)
    child = worker_args(argv)
    if opts.hostfile is not None:
        cmd = [
            sys.executable,
            "-m",
            DS_RUNNER_MODULE,
            f"--shutdown-timeout={opts.shutdown_timeout}",
            "--hostfile",
            str(Path(opts.hostfile).resolve()),
        ]
        if opts.nnodes > 1:
            cmd += ["--num_nodes", str(opts.nnodes)]
        if opts.nproc is not None:
            cmd += ["--num_gpus", str(opts.nproc)]
        if opts.master_addr:
            cmd += ["--master_addr", opts.master_addr]
        if opts.master_port is not None:
            cmd += ["--master_port", str(opts.master_port)]
        # Workers read LOCAL_RANK from the environment; the CLI takes no --local_rank argument.
        return [*cmd, "--no_local_rank", "--module", CHILD_MODULE, *child]
    cmd = [sys.executable, "-m", "oasst_peft.torchrun", "--nproc-per-node", str(opts.nproc or 1)]
    if opts.nnodes == 1 and opts.master_addr is None and opts.master_port is None:
        cmd += ["--standalone"]  # a free local port: several single-node runs can share a machine
    else:
        cmd += [
            "--nnodes",
            str(opts.nnodes),
            "--node-rank",
            str(opts.node_rank),
            "--master-addr",
            opts.master_addr or "127.0.0.1",
            "--master-port",
            str(opts.master_port or DEFAULT_MASTER_PORT),
        ]
    cmd += ["--shutdown-timeout", str(opts.shutdown_timeout)]  # time to save after Ctrl-C
    return [*cmd, "--module", CHILD_MODULE, *child]


def check_devices(opts: LaunchOptions, say=print) -> None:
    """On a CUDA machine, refuse more processes per node than visible GPUs (before anything starts); on a
    CPU-only one, say when the processes outnumber the cores they can run on."""
    import torch

    if opts.hostfile is not None:
        return
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if (opts.nproc or 1) > cores:
            say(
                f"launch: {opts.nproc} processes on {cores} CPU core(s) and no GPU: they share the cores, so this "
                f"trains slower than --nproc {cores}"
            )
        return
    have = torch.cuda.device_count()
    if (opts.nproc or 1) > have:
        raise OasstError(
            f"--nproc: {opts.nproc} processes asked for, but this node sees {have} GPU(s); "
            f"use --nproc {have} or check CUDA_VISIBLE_DEVICES"
        )


def run_launcher(cmd: list[str]) -> int:
    """Run ``cmd`` and return its exit code; Ctrl-C / SIGTERM reach the launcher once, which passes them on.

    The launcher runs in its own session, so a terminal Ctrl-C reaches the workers only through it (one
    signal each: they finish the step and save a checkpoint). A second Ctrl-C is forwarded too. A run
    ended by a forwarded signal exits 128 + its number (130 for Ctrl-C), as a shell would report it.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        while True:
            try:
                code = proc.wait()
                return 128 + received[0] if code and received else code
            except KeyboardInterrupt:  # pragma: no cover - only when a handler could not be installed
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def relaunch(opts: LaunchOptions, argv: list[str], dry_run: bool = False, say=print) -> int:
    """Print the launch command for ``argv`` (an ``oasst-peft`` command line) and run it; returns the exit code.

    ``dry_run`` prints the command without running it (offline, no GPU needed).
    """
    if any(k in os.environ for k in WORKER_ENV) and not dry_run:
        raise OasstError(
            "--nproc: this process already runs under a launcher (LOCAL_RANK is set); "
            "drop --nproc/--nnodes/--hostfile here"
        )
    cmd = launch_command(opts, argv)
    say("launch: " + shlex.join(cmd))
    if dry_run:
        say("dry run: launch command printed, nothing started")
        return 0
    check_devices(opts, say=say)
    return run_launcher(cmd)
