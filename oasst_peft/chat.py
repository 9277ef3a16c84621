"""Multi-turn chat with a trained run, a merged model or a base plus adapter: what ``oasst-peft chat`` runs.

The model is loaded by ``oasst_peft.sample.load_sampler`` (the same loader as ``sample``) and every
prompt is the whole conversation rendered with the saved chat template plus the assistant opener,
exactly as training rendered it. A reply ends at the end-of-turn token of the saved generation
config (or at ``max_new_tokens``). When the conversation no longer fits the model's context with
room for a reply, the oldest exchanges leave the prompt (the system message stays) and one line says
so. On a terminal the reply streams token by token; from a pipe each input line is one user turn and
each reply is printed once it is complete. Lines starting with ``/`` are commands: ``/reset``,
``/system TEXT`` and ``/exit``. On a terminal, Ctrl-C while a reply streams stops that reply (what was
generated stays in the conversation) and gives the prompt back; Ctrl-C at the prompt, or a second one
during a reply, ends the chat. ``transcript=`` keeps ``{"messages": [...], "turns": [...], "earlier":
[...]}`` on disk, rewritten atomically after every reply; ``turns`` holds, per reply, the exact prompt
text the model saw and how many earlier messages were left out of it; ``earlier`` the conversations
that ``/reset`` ended, each as ``{"messages", "turns"}``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft import atomic
from oasst_peft.errors import OasstError

COMMANDS = "/reset (forget the conversation), /system TEXT (set the system message), /exit"
PROMPT = ">>> "


def context_length(model, tokenizer) -> int | None:
    """Tokens the model can attend to: the config's position limit, or the tokenizer's when smaller."""
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return min(known) if known else None


@dataclass
class Conversation:
    """The running conversation: an optional system message, then alternating user/assistant turns."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    start: int = 0  # index in ``turns`` of the oldest turn still in the prompt

    def messages(self, start: int = 0) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns[start:]

    def reset(self) -> None:
        self.turns, self.start = [], 0


def fit_prompt(tokenizer, conv: Conversation, budget: int | None) -> tuple[list[int], int] | None:
    """Token ids of the conversation from the oldest turn that lets the prompt fit ``budget`` tokens.

    Returns (ids, start) where ``turns[start:]`` is what the prompt holds (``start`` only grows, by
    whole user+assistant exchanges), or None when even the last user turn alone does not fit.
    """
    from oasst_peft.sample import prompt_ids

    start = conv.start
    while True:
        ids = prompt_ids(tokenizer, conv.messages(start))
        if budget is None or len(ids) <= budget:
            return ids, start
        if start + 2 >= len(conv.turns):  # only the newest user turn is left
            return None
        start += 2


def _streamer(tokenizer, out):
    """A transformers TextStreamer that writes the reply (not the prompt, no special tokens) to ``out``."""
    from transformers import TextStreamer

    class _Out(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return _Out(tokenizer, skip_prompt=True, skip_special_tokens=True)


@contextlib.contextmanager
def stop_on_ctrl_c(stop: threading.Event):
    """While in this block, a first Ctrl-C sets ``stop`` and a second raises KeyboardInterrupt (main thread only)."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its meaning
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stopping(stop: threading.Event):
    """A transformers stopping criterion that ends generation once ``stop`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _When(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_When()])


class ChatSession:
    """A loaded model and a conversation; ``reply(text)`` adds a user turn and generates the answer."""

    def __init__(
        self,
        sampler,
        system: str | None = None,
        config: str = "greedy",
        max_new_tokens: int = 256,
        seed: int | None = 0,
    ):
        from transformers import set_seed

        from oasst_peft.sample import generation_config

        if max_new_tokens < 1:
            raise OasstError("--max-new-tokens: must be >= 1")
        self.sampler = sampler
        self.gen = generation_config(config, max_new_tokens, sampler.eos_ids, sampler.pad_id)
        self.max_new_tokens = max_new_tokens
        self.context = context_length(sampler.model, sampler.tokenizer)
        if self.context is not None and self.context <= max_new_tokens:
            raise OasstError(
                f"--max-new-tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.context}-token context; use fewer"
            )
        self.conv = Conversation(system=system or None)
        self.log: list[dict] = []  # one record per reply of the current conversation
        self.earlier: list[dict] = []  # the conversations /reset ended, kept for the transcript
        self.said: list[dict] = []  # the conversation as of the last reply: what the model answered to
        if seed is not None:
            set_seed(seed)

    def reset(self) -> None:
        if self.log:  # what was said stays in the transcript (a /system set after the last reply was not)
            self.earlier.append({"messages": self.said, "turns": self.log})
        self.conv.reset()
        self.log, self.said = [], []

    def reply(self, text: str, stream=None, notice=print, stop: threading.Event | None = None) -> dict | None:
        """Answer the user turn ``text``; returns the turn record, or None when it cannot fit the context.

        ``stop``: once set, generation ends after the current token and the reply so far is kept.
        """
        import torch

        from oasst_peft.sample import render_prompt

        s = self.sampler
        self.conv.turns.append({"role": "user", "content": text})
        budget = None if self.context is None else self.context - self.max_new_tokens
        fitted = fit_prompt(s.tokenizer, self.conv, budget)
        if fitted is None:
            self.conv.turns.pop()
            notice(
                f"(that message does not fit the model's {self.context}-token context with room for "
                f"{self.max_new_tokens} new tokens; send a shorter one or /reset)"
            )
            return None
        ids, start = fitted
        if start > self.conv.start:
            notice(
                f"(context full: left out the {start - self.conv.start} oldest messages to fit "
                f"{self.context} tokens)"
            )
            self.conv.start = start
        prompt_text = render_prompt(s.tokenizer, self.conv.messages(start))
        device = next(s.model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = s.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.gen,
                streamer=_streamer(s.tokenizer, stream) if stream is not None else None,
                stopping_criteria=_stopping(stop) if stop is not None else None,
            )
        secs = time.perf_counter() - t0
        new = seq[0, len(ids) :].tolist()
        eot = next((i for i, t in enumerate(new) if t in s.eos_ids), None)
        kept = new if eot is None else new[:eot]
        stopped = stop is not None and stop.is_set() and eot is None
        answer = s.tokenizer.decode(kept, skip_special_tokens=True)
        self.conv.turns.append({"role": "assistant", "content": answer})
        self.said = self.conv.messages()
        record = {
            "prompt": prompt_text,
            "prompt_tokens": len(ids),
            "left_out_messages": start,
            "new_tokens": len(kept) + (eot is not None),
            "ended_with_eot": eot is not None,
            "stopped": stopped,
            "seconds": round(secs, 3),
        }
        self.log.append(record)
        return {"reply": answer, **record}

    def transcript(self) -> dict:
        return {"messages": self.conv.messages(), "turns": self.log, "earlier": self.earlier}


def write_transcript(data: dict, path: str | Path) -> Path:
    """Write the transcript JSON atomically (a temp file beside it, then rename)."""
    return atomic.write_json(path, data)


def check_transcript_path(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise OasstError(f"--transcript: {p} is a folder; give a file name such as chat.json")
    if not p.parent.is_dir():
        raise OasstError(f"--transcript: folder {p.parent} does not exist; create it first")
    return p


def _lines(stdin, interactive: bool, out):
    """User lines: from ``input()`` with a prompt on a terminal, else one per stdin line."""
    if not interactive:
        for line in stdin:
            yield line.rstrip("\r\n")
        return
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            out.write("\n")
            return


def chat(
    model: str | Path,
    adapter: str | Path | None = None,
    system: str | None = None,
    config: str = "greedy",
    max_new_tokens: int = 256,
    transcript: str | Path | None = None,
    dtype: str | None = None,
    seed: int | None = 0,
    stdin=None,
    stdout=None,
    stderr=None,
    interactive: bool | None = None,
) -> dict:
    """Run the chat loop over ``stdin`` (default: the process's); returns the final transcript dict.

    ``interactive`` (default: stdin and stdout are terminals) streams replies and shows a prompt;
    otherwise each stdin line is a user turn, each reply is printed whole, and notices go to stderr.
    """
    from oasst_peft.sample import check_config_name, load_sampler

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty() and stdout.isatty()
    out_path = check_transcript_path(transcript)
    check_config_name(config)  # a bad --config fails before the model loads
    if config == "beam":
        raise OasstError("--config: chat streams one reply at a time; use greedy, typical or nucleus")

    def notice(line: str) -> None:
        (stdout if interactive else stderr).write(line + "\n")
        (stdout if interactive else stderr).flush()

    t0 = time.perf_counter()
    sampler = load_sampler(model, adapter=adapter, dtype=dtype)
    session = ChatSession(sampler, system=system, config=config, max_new_tokens=max_new_tokens, seed=seed)
    if interactive:
        notice(f"loaded {model} in {time.perf_counter() - t0:.1f} s. Commands: {COMMANDS}")

    def save() -> None:
        if out_path is not None:
            write_transcript(session.transcript(), out_path)

    for line in _lines(stdin, interactive, stdout):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/exit":
                break
            if cmd == "/reset":
                session.reset()
                notice("(conversation reset)")
            elif cmd == "/system":
                session.conv.system = arg.strip() or None
                notice("(system message set)" if session.conv.system else "(system message cleared)")
            else:
                notice(f"(unknown command {cmd}; commands: {COMMANDS})")
            save()
            continue
        if interactive:  # Ctrl-C stops this reply, not the chat
            stop = threading.Event()
            with stop_on_ctrl_c(stop):
                result = session.reply(line.strip(), stream=stdout, notice=notice, stop=stop)
        else:
            result = session.reply(line.strip(), notice=notice)
        if result is None:
            continue
        if interactive:
            stdout.write("\n")
            if result["stopped"]:
                notice("(reply stopped)")
        else:
            stdout.write(result["reply"] + "\n")
        stdout.flush()
        save()
    save()
    return session.transcript()
