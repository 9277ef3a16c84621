"""Ctrl-C in a real terminal while the real SmolLM2-135M streams a long reply: the reply stops, the chat goes on.

Off by default (``-m realmodel``): about half a minute on 2 CPU cores. The tiny test model ends its
replies within milliseconds, so only a real model streams long enough to be interrupted by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.terminal import Terminal
from tests.tiny import demo_gguf

pytestmark = pytest.mark.realmodel
ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_stops_the_streaming_reply_and_keeps_the_chat(tmp_path):
    gguf = demo_gguf()  # skips without the package
    path = tmp_path / "chat.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = ["chat", str(gguf), "--max-new-tokens", "400", "--transcript", str(path)]
    with Terminal(tmp_path, args, env) as term:
        term.wait_for(lambda: ">>> " in term.pane(), "the prompt")
        term.send("Write a long story about a dragon.", "Enter")
        term.wait_for(lambda: len(term.pane().split("dragon.", 1)[-1].split()) >= 5, "the reply to stream")
        term.send("C-c")
        term.wait_for(
            lambda: "(reply stopped)" in term.pane() and term.pane().rstrip().endswith(">>>"),
            "the prompt back",
        )
        saved = json.loads(path.read_text(encoding="utf-8"))
        assert saved["turns"][-1]["stopped"] and 5 <= saved["turns"][-1]["new_tokens"] < 400
        assert saved["messages"][-1]["role"] == "assistant" and saved["messages"][-1]["content"]
        term.send("/exit", "Enter")
        assert term.exit_code() == 0 and "Traceback" not in term.pane()
