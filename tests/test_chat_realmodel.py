"""Ctrl-C in a real terminal while the real SmolLM2-135M streams a long reply: the reply stops, the chat goes on.

Off by default (``-m realmodel``): about half a minute on 2 CPU cores. The tiny test model ends its
replies within milliseconds, so only a real model streams long enough to be interrupted by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import demo_gguf

pytestmark = pytest.mark.realmodel
ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_stops_the_streaming_reply_and_keeps_the_chat(tmp_path):
    gguf = demo_gguf()  # skips without the package
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    path, rc = tmp_path / "chat.json", tmp_path / "rc"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
    cli = [sys.executable, "-m", "oasst_peft.cli", "chat", str(gguf), "--max-new-tokens", "400"]
    script = tmp_path / "run.sh"
    script.write_text(
        exports + shlex.join([*cli, "--transcript", str(path)]) + f"\necho EXITED $? > {rc}\nsleep 60\n"
    )
    base = [tmux, "-L", f"oasst-ctrl-c-{os.getpid()}"]
    subprocess.run([*base, "new-session", "-d", "-x", "160", "-y", "40", "bash", str(script)], check=True)

    def pane() -> str:
        return subprocess.run([*base, "capture-pane", "-p", "-J"], capture_output=True, text=True).stdout

    def wait_for(cond, what: str, secs: float = 180) -> None:
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; pane:\n{pane()}")

    try:
        wait_for(lambda: ">>> " in pane(), "the prompt")
        subprocess.run(
            [*base, "send-keys", "-t", "0", "Write a long story about a dragon.", "Enter"], check=True
        )
        wait_for(lambda: len(pane().split("dragon.", 1)[-1].split()) >= 5, "the reply to stream")
        subprocess.run([*base, "send-keys", "-t", "0", "C-c"], check=True)
        wait_for(lambda: "(reply stopped)" in pane() and pane().rstrip().endswith(">>>"), "the prompt back")
        saved = json.loads(path.read_text(encoding="utf-8"))
        assert saved["turns"][-1]["stopped"] and 5 <= saved["turns"][-1]["new_tokens"] < 400
        assert saved["messages"][-1]["role"] == "assistant" and saved["messages"][-1]["content"]
        subprocess.run([*base, "send-keys", "-t", "0", "/exit", "Enter"], check=True)
        wait_for(rc.is_file, "the chat to exit")
        assert rc.read_text().split() == ["EXITED", "0"] and "Traceback" not in pane()
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True)
