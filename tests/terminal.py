"""A real terminal for interactive commands: ``oasst-peft ARGS`` run in a detached tmux session.

``Terminal(tmp_path, args, env)`` starts the command in a 160x40 pane (skipping the test when tmux is
missing); ``pane()`` is the screen text, ``send(*keys)`` types (tmux key names: ``Enter``, ``C-c``),
``wait_for(cond, what)`` polls, and ``exit_code()`` waits for the command to end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


class Terminal:
    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]):
        tmux = shutil.which("tmux")
        if tmux is None:
            pytest.skip("tmux is not installed (apt-get install -y tmux)")
        self.rc = tmp_path / "rc"
        script = tmp_path / "run.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
        command = shlex.join([sys.executable, "-m", "oasst_peft.cli", *args])
        script.write_text(f"{exports}{command}\necho EXITED $? > {self.rc}\nsleep 60\n", encoding="utf-8")
        self.base = [tmux, "-L", f"oasst-{tmp_path.name}-{os.getpid()}"]
        subprocess.run(
            [*self.base, "new-session", "-d", "-x", "160", "-y", "40", "bash", str(script)], check=True
        )

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)

    def pane(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-J"], capture_output=True, text=True).stdout

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "0", *keys], check=True)

    def wait_for(self, cond, what: str, secs: float = 180) -> None:
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; pane:\n{self.pane()}")

    def exit_code(self) -> int:
        self.wait_for(self.rc.is_file, "the command to exit")
        word, code = self.rc.read_text().split()
        assert word == "EXITED"
        return int(code)
