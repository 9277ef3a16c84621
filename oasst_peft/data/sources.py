"""The registered datasets besides the oasst export, each converting its real schema to messages.

Hub ids are the ones the Open-Assistant trainer used; every one of them also reads local
``data_files`` in the same schema. The generic formats ``messages``, ``sharegpt`` and ``alpaca``
read a user's own files (``{my_set: {data_files: x.jsonl, format: messages}}``).
"""

from __future__ import annotations

import re

from oasst_peft.data.conversation import qa, turn
from oasst_peft.data.registry import Context, DatasetInfo, register_dataset, register_family

# ---------------------------------------------------------------- helpers

REFERENCE = re.compile(r"\s?\[\d+(?:\s*,\s*\d+)*\]")  # [1], [2, 3]
CONTINUE = ("Please continue.", "Go on.", "Continue.", "Keep going.")
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant", "bot": "assistant"}


def _text(row: dict, name: str) -> str:
    """A required string field (None reads as empty)."""
    v = row[name]
    if v is None:
        return ""
    if not isinstance(v, str):
        raise TypeError(f"field '{name}' must be a string, got {type(v).__name__}")
    return v


def _optional_text(row: dict, name: str) -> str:
    """A string field that may be absent (absent or None reads as empty)."""
    return _text(row, name) if name in row else ""


def strip_references(text: str) -> str:
    """Remove citation marks like ``[1]`` or ``[2, 3]``."""
    return REFERENCE.sub("", text).strip()


def _joined(first: str, second: str, sep: str = "\n") -> str:
    return f"{first}{sep}{second}" if second.strip() else first


# ---------------------------------------------------------------- ShareGPT-style conversations


def sharegpt_conversation(row: dict, ctx: Context, unescape: bool = False):
    """``conversations`` of ``{from, value}``: must open with the human; same-speaker turns merge."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise TypeError("'conversations' must be a list")
    msgs: list[dict] = []
    for t in turns:
        if not isinstance(t, dict):
            raise TypeError("each turn must be an object with 'from' and 'value'")
        role = SPEAKERS.get(str(t["from"]).strip().lower())
        if role is None:
            ctx.drop("unknown_speaker")
            return None
        text = _text(t, "value")
        if unescape:
            text = text.replace("\\_", "_").replace("\\*", "*")
        if msgs and msgs[-1]["role"] == role:
            msgs[-1] = turn(role, _joined(msgs[-1]["content"], text) if msgs[-1]["content"] else text)
        else:
            msgs.append(turn(role, text))
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body or body[0]["role"] != "user":
        ctx.drop("not_opened_by_user")
        return None
    if any(m["role"] == "assistant" and not m["content"].strip() for m in body):
        ctx.drop("empty_reply")
        return None
    for i, m in enumerate(msgs):
        if m["role"] == "user" and not m["content"].strip():  # a bare "continue" click
            msgs[i] = turn("user", ctx.rng.choice(CONTINUE))
    if msgs[-1]["role"] == "user":  # an unanswered last question is cut, the rest kept
        msgs.pop()
    return msgs


@register_dataset(
    "vicuna",
    hub_id="anon8231489123/ShareGPT_Vicuna_unfiltered",
    hub_data_files="ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json",
)
def vicuna(row: dict, ctx: Context):
    """ShareGPT conversations (Vicuna's cleaned dump or a newer ShareGPT file)."""
    return sharegpt_conversation(row, ctx, unescape=True)


# ---------------------------------------------------------------- instruction / response pairs


@register_dataset("dolly15k", hub_id="databricks/databricks-dolly-15k", options=("context",))
def dolly15k(row: dict, ctx: Context):
    """instruction / context / response; the context goes in the prompt, a system turn, or nowhere."""
    instruction, context = _text(row, "instruction"), strip_references(_text(row, "context"))
    response = _text(row, "response")
    mode = ctx.spec.context
    if mode == "system" and context:
        return qa(instruction, response, system=context)
    if mode == "prompt":
        return qa(_joined(instruction, context, "\n\n"), response)
    return qa(instruction, response)


def alpaca_conversation(row: dict, ctx: Context):
    """instruction (+ input on the next line when non-empty) / output. ``input`` may be absent, and the
    optional ``system`` and ``history`` ([[prompt, reply], ...] before this exchange) fields of
    LLaMA-Factory's alpaca layout become a system turn and earlier turns."""
    last = qa(
        _joined(_text(row, "instruction"), _optional_text(row, "input")),
        _text(row, "output"),
    )
    system = _optional_text(row, "system")
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history
    ):
        raise TypeError("field 'history' must be a list of [prompt, reply] string pairs")
    earlier = [t for prompt, reply in history for t in (turn("user", prompt), turn("assistant", reply))]
    return [*([turn("system", system)] if system else []), *earlier, *last]


register_dataset("alpaca", hub_id="yahma/alpaca-cleaned", description="Alpaca (cleaned)")(alpaca_conversation)
register_dataset("code_alpaca", hub_id="sahil2801/CodeAlpaca-20k", description="Code Alpaca 20k")(
    alpaca_conversation
)


@register_dataset("grade_school_math_instructions", hub_id="qwedsacf/grade-school-math-instructions")
def grade_school_math(row: dict, ctx: Context):
    """INSTRUCTION / RESPONSE."""
    return qa(_text(row, "INSTRUCTION"), _text(row, "RESPONSE"))


@register_dataset("gsm8k", hub_id="gsm8k", hub_config="main")
def gsm8k(row: dict, ctx: Context):
    """question / answer (the worked solution ending in '#### N')."""
    return qa(_text(row, "question"), _text(row, "answer"))


@register_dataset("joke", hub_id="theblackcat102/joke_explaination")
def joke(row: dict, ctx: Context):
    """joke / explanation lines (the original file spells the field 'explaination')."""
    explanation = row["explaination"] if "explaination" in row else row["explanation"]
    if explanation is not None and not isinstance(explanation, str):
        raise TypeError("'explaination' must be a string")
    return qa(_text(row, "joke"), explanation or "")


# ---------------------------------------------------------------- webgpt: best answer per question


def _webgpt_finish(ctx: Context):
    for question, (_, answer) in ctx.state.get("best", {}).items():
        yield qa(question, answer)


@register_dataset("webgpt", hub_id="openai/webgpt_comparisons", finish=_webgpt_finish)
def webgpt(row: dict, ctx: Context):
    """Comparisons of two answers: per question the best-scored non-empty answer, references stripped."""
    q = row["question"]
    question = _text(q, "full_text") if isinstance(q, dict) else _text(row, "question")
    best = ctx.state.setdefault("best", {})
    candidates = []
    for i in (0, 1):
        answer = strip_references(_text(row, f"answer_{i}"))
        score = row.get(f"score_{i}")
        if answer and isinstance(score, int | float):
            candidates.append((float(score), answer))
    if not candidates:
        ctx.drop("empty_reply")
        return None
    top = max(candidates, key=lambda c: c[0])  # max keeps the first of equal scores
    if question not in best or top[0] > best[question][0]:
        if question in best:
            ctx.drop("worse_answer_same_question")
        best[question] = top
    else:
        ctx.drop("worse_answer_same_question")
    return None


# ---------------------------------------------------------------- translation pairs

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ru": "Russian",
    "cs": "Czech",
    "fi": "Finnish",
    "gu": "Gujarati",
    "kk": "Kazakh",
    "lt": "Lithuanian",
    "th": "Thai",
    "vi": "Vietnamese",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ar": "Arabic",
}
TRANSLATION_PROMPTS = (
    "Translate the following {src} text into {tgt}:\n{text}",
    "How would you say this in {tgt}?\n{text}",
    "Please translate this into {tgt}.\n\n{text}",
    "{text}\n\nTranslate the text above from {src} to {tgt}.",
    "What is the {tgt} for this {src} sentence?\n{text}",
    "I need a {tgt} version of this: {text}",
)


def translation_converter(a: str, b: str):
    """Rows ``{"translation": {a: ..., b: ...}}`` to a prompt in a random phrasing and direction."""

    def convert(row: dict, ctx: Context):
        pair = row["translation"]
        if not isinstance(pair, dict):
            raise TypeError("'translation' must be an object of language: text")
        src, tgt = (a, b) if ctx.rng.random() < 0.5 else (b, a)
        template = ctx.rng.choice(TRANSLATION_PROMPTS)
        prompt = template.format(
            src=LANGUAGE_NAMES.get(src, src), tgt=LANGUAGE_NAMES.get(tgt, tgt), text=_text(pair, src)
        )
        return qa(prompt, _text(pair, tgt))

    return convert


def _wmt(m: re.Match) -> DatasetInfo:
    a, b = m.group(1), m.group(2)
    return DatasetInfo(
        name=m.group(0),
        convert=translation_converter(a, b),
        hub_id="wmt19",
        hub_config=f"{a}-{b}",
        description=f"WMT19 {a}-{b} translation pairs",
    )


def _ted(m: re.Match) -> DatasetInfo:
    a, b = m.group(1), m.group(2)
    return DatasetInfo(
        name=m.group(0),
        convert=translation_converter(a, b),
        hub_id="ted_talks_iwslt",
        hub_kwargs=(("language_pair", (a, b)), ("year", "2016")),
        description=f"TED talks (IWSLT 2016) {a}-{b} translation pairs",
    )


register_family(r"wmt2019_([a-z]{2})-([a-z]{2})", _wmt, "wmt2019_zh-en")
register_family(r"ted_trans_([a-z]{2})-([a-z]{2})", _ted, "ted_trans_en-ja")
register_family(r"ted_trans_([a-z]{2})-([a-z]{2})", _ted, "ted_trans_zh-ja")


# ---------------------------------------------------------------- generic formats for your own files


def messages_conversation(row: dict, ctx: Context):
    """``messages`` of ``{role, content}`` (roles system/user/assistant; prompter/human/gpt accepted)."""
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise TypeError("'messages' must be a list")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise TypeError("each message must be an object with 'role' and 'content'")
        role = m["role"]
        out.append({"role": ROLE_ALIASES.get(role, role), "content": m["content"]})
    return out


FORMATS = {
    "messages": messages_conversation,
    "sharegpt": sharegpt_conversation,
    "alpaca": alpaca_conversation,
}
