"""The Open-Assistant chat format: special tokens, the Jinja chat template, and loss masks.

``<|prompter|>`` / ``<|assistant|>`` / ``<|system|>`` open turns and every turn ends with the
end-of-turn token (``<|endoftext|>`` where the tokenizer has it, its eos otherwise). Assistant
content and its end-of-turn token sit inside ``{% generation %}`` markers, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's
``assistant_only_loss=True``) put loss on exactly those tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken

from oasst_peft.errors import OasstError

PROMPTER, ASSISTANT, SYSTEM = "<|prompter|>", "<|assistant|>", "<|system|>"
# Fixed order, so the added ids are the same on every run (the Open-Assistant trainer used a set).
ROLE_TOKENS = (PROMPTER, ASSISTANT, SYSTEM)
PAD_TOKEN = "<|padding|>"
# Names the embedding rows added only to pad the vocab to a multiple (never produced by the tokenizer's text).
FILLER_TOKEN = "<|oasst_unused_{}|>"
PREFERRED_EOT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")

# The widget prompts of the seed model cards.
WIDGET_PROMPTS = (
    "What is a meme, and what's the history behind this word?",
    "What's the Earth total population",
    "Write a story about future of AI development",
)

_TEMPLATE = """\
{%- set eot = EOT -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ 'SYS' + message['content'] + eot }}
{%- elif message['role'] == 'user' -%}
{{ 'PRO' + message['content'] + eot }}
{%- elif message['role'] == 'assistant' -%}
{{ 'ASS' }}{% generation %}{{ message['content'] + eot }}{% endgeneration %}
{%- else -%}
{{ raise_exception("oasst template: unknown role '" + message['role'] + "' (use system, user or assistant)") }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ 'ASS' }}
{%- endif -%}"""


def oasst_chat_template(eot: str) -> str:
    """The Jinja chat template for the oasst format with ``eot`` closing every turn."""
    return (
        _TEMPLATE.replace("EOT", json.dumps(eot))
        .replace("'SYS'", json.dumps(SYSTEM))
        .replace("'PRO'", json.dumps(PROMPTER))
        .replace("'ASS'", json.dumps(ASSISTANT))
    )


def end_of_turn_token(tokenizer, override: str | None = None) -> str:
    """``override`` if given, else ``<|endoftext|>`` when the vocab has it, else the tokenizer's eos."""
    if override:
        return override
    if PREFERRED_EOT in tokenizer.get_vocab():
        return PREFERRED_EOT
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise OasstError("tokenizer has neither '<|endoftext|>' nor an eos token: set 'eos_token' in the recipe")


@dataclass(frozen=True)
class ChatFormat:
    """What ``setup_tokenizer`` did: the end-of-turn token and the ids whose embedding rows must train."""

    eot: str
    eot_id: int
    pad_id: int
    trainable_token_ids: tuple[int, ...]


def load_template_file(path: str | Path) -> str:
    """Read a user's Jinja chat template; it must mark assistant turns with {% generation %}."""
    p = Path(path)
    if not p.is_file():
        raise OasstError(f"chat_template: file not found: {p} (use 'oasst' or a path to a Jinja file)")
    text = p.read_text(encoding="utf-8")
    if "{% generation %}" not in text and "{%- generation" not in text:
        raise OasstError(
            f"chat_template: {p} has no {{% generation %}} markers, so loss could not be limited "
            "to assistant turns; wrap assistant content and its end-of-turn token in them"
        )
    return text


def setup_tokenizer(tokenizer, eos_token: str | None = None, chat_template: str = "oasst") -> ChatFormat:
    """Add the oasst special tokens (fixed order), set pad/eos and install the chat template, in place."""
    eot = end_of_turn_token(tokenizer, eos_token)
    vocab = tokenizer.get_vocab()
    to_add = [t for t in (*ROLE_TOKENS, eot) if t not in vocab]
    newly_added = list(to_add)
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in vocab:
            to_add.append(PAD_TOKEN)
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in vocab else None
    if to_add:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in to_add], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.eos_token = eot
    if chat_template == "oasst":
        tokenizer.chat_template = oasst_chat_template(eot)
    else:
        tokenizer.chat_template = load_template_file(chat_template)
    ids = tokenizer.convert_tokens_to_ids([*ROLE_TOKENS, *[t for t in newly_added if t not in ROLE_TOKENS]])
    return ChatFormat(
        eot=eot,
        eot_id=tokenizer.convert_tokens_to_ids(eot),
        pad_id=tokenizer.pad_token_id,
        trainable_token_ids=tuple(sorted(set(ids))),
    )


def padded_vocab_size(n_tokens: int, current_rows: int, multiple: int = 16) -> int:
    """Rows the embedding needs: unchanged when it already fits the tokenizer, else rounded up to ``multiple``."""
    if n_tokens <= current_rows:
        return current_rows
    return int(math.ceil(n_tokens / multiple) * multiple)


def resize_embeddings(model, tokenizer, multiple: int = 16) -> int:
    """Grow the embedding (and untied lm_head) to fit the tokenizer; never shrink. Returns the new row count.

    When it grows, the tokenizer gets a placeholder token for each padding row (``fill_vocab``).
    """
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partitioned weight keeps its shape here
    target = padded_vocab_size(len(tokenizer), rows, multiple)
    if target != rows:
        model.resize_token_embeddings(target, mean_resizing=False)
        fill_vocab(tokenizer, target)
    return target


def fill_vocab(tokenizer, rows: int) -> int:
    """Add placeholder special tokens until ``len(tokenizer) == rows``; returns how many were added.

    Stock loaders (peft's ``AutoPeftModelForCausalLM``) resize the base to ``len(tokenizer)`` before
    applying an adapter, so a tokenizer that names every row of the padded embedding loads exactly.
    The placeholders match no text; decoding one prints its name (nothing with ``skip_special_tokens``).
    """
    vocab = tokenizer.get_vocab()
    names: list[str] = []
    i = 0
    while len(tokenizer) + len(names) < rows:
        name = FILLER_TOKEN.format(i)
        i += 1
        if name not in vocab:
            names.append(name)
    if names:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in names], special_tokens=True
        )
    return len(names)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as training sees it."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_with_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask (1 on assistant content and its end-of-turn token)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]


def check_turn_end(tokenizer, fmt: ChatFormat, template: str) -> None:
    """Refuse a custom template whose assistant turns do not end with the end-of-turn token inside the loss.

    A model trained on such a template never learns to stop. When the template closes assistant turns with
    another token (ChatML's ``<|im_end|>``, say), the message names it and the recipe key that chooses it.
    """
    ids, mask = tokenize_with_mask(tokenizer, PROBE)
    if any(m and i == fmt.eot_id for i, m in zip(ids, mask, strict=True)):
        return
    text = render(tokenizer, PROBE)
    after = text[text.rfind(PROBE[-1]["content"]) + len(PROBE[-1]["content"]) :].lstrip()
    token = re.match(r"<[^<>\s]+>", after)  # what the template closes the turn with, if a token-like string
    found = token.group(0) if token else ""
    problem = (
        f"chat_template: {template} does not end assistant turns with the end-of-turn token {fmt.eot!r} inside "
        "{% generation %}, so the model would never learn to stop; "
    )
    if found and found != fmt.eot:
        raise OasstError(problem + f"it ends them with {found!r}: set eos_token: {found!r} in the recipe")
    raise OasstError(
        problem + "put {{ eos_token }} right after the assistant content, inside the generation block"
    )
