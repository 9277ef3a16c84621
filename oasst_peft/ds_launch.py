"""DeepSpeed's launcher with a shutdown timeout: ``python -m oasst_peft.ds_launch --shutdown-timeout=N ...``.

DeepSpeed's per-node launcher (``deepspeed.launcher.launch``) terminates its workers on a signal and
SIGKILLs them 30 s later, a fixed figure: a 7B checkpoint with optimizer state takes minutes to write.
This module runs DeepSpeed's own runner (the first form) or per-node launcher (``--node-launcher``) with
their arguments unchanged, except that:

* the runner starts this module, not ``deepspeed.launcher.launch``, on every node (locally or over pdsh),
  passing the timeout on;
* the per-node launcher waits ``N`` seconds for its workers to exit before it kills them.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

NODE_LAUNCHER = "deepspeed.launcher.launch"
FLAG = "--shutdown-timeout="
NODE_FLAG = "--node-launcher"


def split_args(argv: list[str]) -> tuple[int | None, bool, list[str]]:
    """(timeout, node mode, the rest of ``argv``) from this module's own two flags."""
    timeout, node, rest = None, False, []
    for arg in argv:
        if arg.startswith(FLAG) and timeout is None:
            timeout = int(arg[len(FLAG) :])
        elif arg == NODE_FLAG and not node:
            node = True
        else:
            rest.append(arg)
    return timeout, node, rest


def node_command(cmd: list, timeout: int) -> list:
    """``cmd`` (the runner's local or pdsh command) with DeepSpeed's per-node launcher replaced by this module."""
    if NODE_LAUNCHER not in cmd:
        return cmd
    i = cmd.index(NODE_LAUNCHER)
    return [*cmd[:i], "oasst_peft.ds_launch", NODE_FLAG, f"{FLAG}{timeout}", *cmd[i + 1 :]]


def terminate_tree(pid: int, timeout: int) -> None:
    """SIGTERM ``pid`` and its descendants; SIGKILL whichever still run ``timeout`` seconds later."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*root.children(recursive=True), root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_node(timeout: int, argv: list[str]) -> None:
    from deepspeed.launcher import launch

    launch.terminate_process_tree = lambda pid: terminate_tree(pid, timeout)
    sys.argv = [launch.__file__, *argv]
    launch.main()


def run_runner(timeout: int, argv: list[str]) -> None:
    from deepspeed.launcher import runner

    popen = subprocess.Popen

    class Popen(popen):
        def __init__(self, args, *rest, **kwargs):
            if isinstance(args, list):
                args = node_command(args, timeout)
            super().__init__(args, *rest, **kwargs)

    subprocess.Popen = Popen  # the runner's own process only: it starts the node launchers with it
    runner.main(argv)


def main(argv: list[str] | None = None) -> None:
    from oasst_peft.launch import DEFAULT_SHUTDOWN_TIMEOUT

    timeout, node, rest = split_args(sys.argv[1:] if argv is None else argv)
    timeout = DEFAULT_SHUTDOWN_TIMEOUT if timeout is None else timeout
    if node:
        run_node(timeout, rest)
    else:
        run_runner(timeout, rest)


if __name__ == "__main__":
    main()
