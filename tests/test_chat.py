"""``oasst-peft chat`` on a tiny trained run: prompts, context trimming, commands, a real pipe and a real terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from oasst_peft.chat import ChatSession, Conversation, chat, fit_prompt, stop_on_ctrl_c
from oasst_peft.config import load_recipe
from oasst_peft.errors import OasstError
from oasst_peft.sample import load_sampler, prompt_ids, render_prompt
from oasst_peft.train import train
from tests.terminal import Terminal
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A LoRA run of the tiny base, trained for two steps as tests/tiny_run builds it."""
    root = tmp_path_factory.mktemp("chat")
    base = write_base(root / "base")
    data = write_conversations(root / "chat.jsonl")
    recipe = write_recipe(root / "r.yaml", recipe_dict(base, data, root / "run", root / "cache"))
    train(load_recipe(recipe), max_steps=2, say=lambda _m: None)
    return root / "run"


@pytest.fixture(scope="module")
def sampler(run_dir):
    return load_sampler(run_dir)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OASST_PEFT_ALL_WARNINGS", None)
    return env


def test_second_prompt_holds_the_first_exchange_in_the_saved_template(sampler):
    session = ChatSession(sampler, system="be brief", max_new_tokens=6)
    first = session.reply("what is 3 plus two", notice=lambda _m: None)
    second = session.reply("thank you", notice=lambda _m: None)
    msgs = session.transcript()["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == first["reply"]
    # Each prompt is exactly what the saved template renders for the conversation so far.
    assert first["prompt"] == render_prompt(sampler.tokenizer, msgs[:2])
    assert second["prompt"] == render_prompt(sampler.tokenizer, msgs[:4])
    assert second["prompt"].startswith(first["prompt"] + first["reply"])
    assert "<|system|>be brief" in second["prompt"]
    assert second["prompt_tokens"] == len(prompt_ids(sampler.tokenizer, msgs[:4]))


def test_oldest_exchanges_leave_the_prompt_when_the_context_is_full(sampler):
    conv = Conversation(system="sys")
    for i in range(6):
        conv.turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "ok"}]
    conv.turns.append({"role": "user", "content": "last one"})
    full = len(prompt_ids(sampler.tokenizer, conv.messages()))
    ids, start = fit_prompt(sampler.tokenizer, conv, full - 1)
    assert start == 2 and len(ids) <= full - 1  # one whole exchange dropped, no more
    assert conv.messages(start)[0] == {"role": "system", "content": "sys"}  # the system message stays
    assert conv.messages(start)[1]["content"] == "question 1"
    assert fit_prompt(sampler.tokenizer, conv, 3) is None  # even the last turn alone is too long


def test_a_full_context_is_announced_once_per_trim(sampler):
    session = ChatSession(sampler, max_new_tokens=4)
    one_turn = len(prompt_ids(sampler.tokenizer, [{"role": "user", "content": "what is 3 plus two"}]))
    session.context = one_turn + 4 + 12  # room for a single exchange only
    notices: list[str] = []
    session.reply("what is 3 plus two", notice=notices.append)
    assert notices == []
    session.reply("what is 3 plus two", notice=notices.append)
    assert len(notices) == 1 and "left out the 2 oldest messages" in notices[0]
    log = session.transcript()["turns"]
    assert log[1]["left_out_messages"] == 2 and "<|prompter|>" in log[1]["prompt"]
    assert log[1]["prompt"] == render_prompt(sampler.tokenizer, session.conv.messages(2)[:1])


def test_a_stop_ends_the_reply_and_keeps_what_was_generated(sampler):
    full = ChatSession(sampler, max_new_tokens=6).reply("what is 3 plus two", notice=lambda _m: None)
    assert not full["stopped"]
    session = ChatSession(sampler, max_new_tokens=6)
    stop = threading.Event()
    stop.set()  # as if Ctrl-C came before the first token: generation ends after it
    cut = session.reply("what is 3 plus two", notice=lambda _m: None, stop=stop)
    assert cut["new_tokens"] == 1 and cut["stopped"] != cut["ended_with_eot"]
    assert full["new_tokens"] > 1 and full["reply"].startswith(cut["reply"])
    assert session.transcript()["messages"][-1] == {"role": "assistant", "content": cut["reply"]}


def test_first_ctrl_c_asks_the_reply_to_stop_and_a_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    with stop_on_ctrl_c(stop):
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled between two bytecodes
        time.sleep(0.05)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


def test_commands_and_transcript_from_a_stream(run_dir, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    lines = "hello there\n/system speak like a pirate\nhow are you\n/reset\nthank you\n/exit\nnever read\n"
    path = tmp_path / "t.json"
    result = chat(
        run_dir, max_new_tokens=5, transcript=path, stdin=io.StringIO(lines), stdout=out, stderr=err
    )
    assert "(conversation reset)" in err.getvalue() and "(system message set)" in err.getvalue()
    assert len(out.getvalue().splitlines()) >= 3  # one reply per user turn, notices on stderr
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == result
    # After /reset only the last exchange is left, under the system message set before it.
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert saved["messages"][0]["content"] == "speak like a pirate"
    assert saved["messages"][1]["content"] == "thank you"
    # What was said before /reset is still in the file.
    (before,) = saved["earlier"]
    assert [m["content"] for m in before["messages"] if m["role"] == "user"] == ["hello there", "how are you"]
    assert len(before["turns"]) == 2
    assert not list(tmp_path.glob(".t.json.*"))  # no temp file left behind
    # A system message set after the last reply of a conversation that /reset ends was never seen by it.
    lines = "hello there\n/system be brief\n/reset\nthank you\n/exit\n"
    result = chat(
        run_dir, max_new_tokens=5, stdin=io.StringIO(lines), stdout=io.StringIO(), stderr=io.StringIO()
    )
    (before,) = result["earlier"]
    assert [m["role"] for m in before["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in result["messages"]] == ["system", "user", "assistant"]  # the next one saw it


def test_bad_options_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(OasstError, match="--config"):
        chat(run_dir, config="wild", stdin=io.StringIO(""))
    with pytest.raises(OasstError, match="--transcript: folder"):
        chat(run_dir, transcript=tmp_path / "nope" / "t.json", stdin=io.StringIO(""))


@pytest.mark.slow
def test_real_pipe_through_the_cli(run_dir, tmp_path):
    path = tmp_path / "chat.json"
    cmd = [sys.executable, "-m", "oasst_peft.cli", "chat", str(run_dir), "--max-new-tokens", "6"]
    proc = subprocess.run(
        [*cmd, "--transcript", str(path)],
        input="what is 3 plus two\nthank you\n",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(path.read_text(encoding="utf-8"))
    msgs = saved["messages"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["what is 3 plus two", "thank you"]
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert proc.stdout == "".join(r + "\n" for r in replies)  # one printed reply per turn
    first, second = saved["turns"]
    # The second prompt holds the first exchange, rendered as training rendered it.
    assert second["prompt"].startswith(first["prompt"] + replies[0])
    assert second["prompt"].count("<|prompter|>") == 2 and second["prompt"].endswith("<|assistant|>")
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def _printable(text: str) -> str:
    return " ".join("".join(c for c in text if c.isascii() and c.isprintable()).split())


@pytest.mark.slow
def test_real_terminal_under_tmux(run_dir, tmp_path):
    path = tmp_path / "chat.json"
    args = ["chat", str(run_dir), "--max-new-tokens", "6", "--transcript", str(path)]
    with Terminal(tmp_path, args, _env()) as term:
        term.wait_for(lambda: ">>> " in term.pane(), "the prompt")
        assert "Commands: /reset" in term.pane()
        term.send("what is 3 plus two", "Enter")
        term.wait_for(path.is_file, "the first reply")
        term.wait_for(lambda: term.pane().count(">>> ") >= 2, "the next prompt")
        reply = json.loads(path.read_text(encoding="utf-8"))["messages"][1]["content"]
        assert _printable(reply) in _printable(term.pane())  # the streamed reply is on screen
        term.send("/exit", "Enter")
        assert term.exit_code() == 0
        assert "Traceback" not in term.pane()
