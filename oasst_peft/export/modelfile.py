"""An Ollama ``Modelfile`` for an exported GGUF: FROM the file, the oasst chat format, stops and sampling.

The TEMPLATE is Go template text over Ollama's ``.Messages``: each system, user and assistant turn
opens with ``<|system|>`` / ``<|prompter|>`` / ``<|assistant|>`` and closes with the end-of-turn
token, exactly as ``oasst_peft.template`` renders it for training, and the prompt ends with
``<|assistant|>`` so the model writes the reply. Generation stops at the end-of-turn token and at
``<|prompter|>`` (a model that skips its end-of-turn would go on to invent the user's next turn).
Sampling defaults are the cards' "typical sampling 0.2" (``SAMPLING_CONFIGS['typical']``).

A model trained with a chat template of its own (``chat_template: my.jinja``) gets no TEMPLATE and
stops at its end-of-turn token only: Ollama then takes the template from the one embedded in the GGUF,
instead of being told the oasst format the model never saw (``renders_like_oasst`` decides).

    ollama create my-model -f Modelfile && ollama run my-model
"""

from __future__ import annotations

import json

from oasst_peft.template import ASSISTANT, PROMPTER, SYSTEM

# The values of oasst_peft.sample.SAMPLING_CONFIGS["typical"] in Ollama's option names (kept here so
# the CLI's export path imports no torch); tests/test_export.py checks they agree.
TYPICAL = {"temperature": 1.0, "typical_p": 0.2, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0}


def _go_string(text: str) -> str:
    """A Go template string literal (JSON escaping is valid Go escaping for these)."""
    return json.dumps(text)


def ollama_template(eot: str) -> str:
    """The oasst format as an Ollama TEMPLATE over ``.Messages``."""
    e = eot.replace("{{", "{{`{{`}}")
    return (
        "{{- range .Messages }}"
        f'{{{{- if eq .Role "system" }}}}{SYSTEM}{{{{ .Content }}}}{e}'
        f'{{{{- else if eq .Role "user" }}}}{PROMPTER}{{{{ .Content }}}}{e}'
        f'{{{{- else if eq .Role "assistant" }}}}{ASSISTANT}{{{{ .Content }}}}{e}'
        "{{- end }}"
        "{{- end }}"
        f"{ASSISTANT}"
    )


def modelfile_text(
    gguf_name: str, eot: str, system: str | None = None, num_ctx: int | None = None, oasst: bool = True
) -> str:
    """The Modelfile for ``gguf_name`` (a path relative to the Modelfile's folder); ``oasst=False`` for a
    model whose chat template is its own (no TEMPLATE: Ollama reads the GGUF's)."""
    lines = [
        "# Ollama Modelfile written by oasst-peft export: ollama create NAME -f Modelfile; ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if oasst:
        lines.append(f'TEMPLATE """{ollama_template(eot)}"""')
    else:
        lines.append(
            "# no TEMPLATE: the model was trained with its own chat template, which the GGUF carries; "
            "check what Ollama made of it with: ollama show NAME --template"
        )
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys((eot, PROMPTER) if oasst else (eot,)):
        lines.append(f"PARAMETER stop {_go_string(stop)}")
    for key, value in TYPICAL.items():
        lines.append(f"PARAMETER {key} {value:g}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def render_like_ollama(messages: list[dict], eot: str) -> str:
    """What ``ollama_template`` produces for ``messages`` (for tests and for the export's own check)."""
    opener = {"system": SYSTEM, "user": PROMPTER, "assistant": ASSISTANT}
    return "".join(opener[m["role"]] + m["content"] + eot for m in messages) + ASSISTANT


PROBES = (
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
)


def renders_like_oasst(tokenizer, eot: str) -> bool:
    """Whether the tokenizer's chat template renders the probe conversations exactly as ``ollama_template``."""
    try:
        return all(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            == render_like_ollama(m, eot)
            for m in PROBES
        )
    except Exception:  # noqa: BLE001 - a template of one's own may refuse a system turn, or raise otherwise
        return False
