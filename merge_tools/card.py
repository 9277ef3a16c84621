"""The merged model's ``README.md``, laid out like the Open-Assistant seed cards and filled from the run's recipe.

Sections: front matter (tags, pipeline, widget prompts in the chat format), Model Details, Prompting
(the format with a rendered example), Dev Details (base model, method, the exact train and merge
commands, the recipe), the data mix, and the ZeRO config when one was used.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WIDGET_QUESTIONS = (
    "What is a meme, and what's the history behind this word?",
    "What's the Earth total population",
    "Write a story about future of AI development",
)
PROMPTER, ASSISTANT = "<|prompter|>", "<|assistant|>"


@dataclass
class CardInfo:
    """What the card says; every field is optional except the title."""

    title: str
    base_model: str | None = None
    base_is_hub: bool = False
    architecture: str | None = None
    mode: str = "lora"
    dtype: str = "fp32"
    eot_token: str | None = None
    recipe: dict | None = None
    train_command: list[str] | None = None
    merge_command: list[str] = field(default_factory=list)
    merge_lines: list[str] = field(default_factory=list)
    prompt_example: str | None = None
    steps: int | None = None
    deepspeed_config_path: str | None = None  # the DeepSpeed JSON the run used (from its run record)


def _link(name: str | None, hub: bool) -> str:
    if not name:
        return "unknown"
    return f"[{name}](https://huggingface.co/{name})" if hub else f"`{name}`"


def _languages(recipe: dict | None) -> list[str]:
    langs: list[str] = []
    for entry in (recipe or {}).get("datasets") or []:
        if isinstance(entry, dict):
            for opts in entry.values():
                lang = (opts or {}).get("lang") if isinstance(opts, dict) else None
                if lang:
                    langs += [x.strip() for x in str(lang).split(",") if x.strip()]
    return list(dict.fromkeys(langs))


def _zero_config(recipe: dict | None, recipe_dir: Path | None, recorded: str | None = None) -> str | None:
    """The DeepSpeed JSON's text: the path the run record names, else the recipe's value as a path."""
    name = (recipe or {}).get("deepspeed_config")
    if not name:
        return None
    candidates = [Path(recorded)] if recorded else []
    p = Path(str(name)).expanduser()
    candidates += [p, (recipe_dir / p) if recipe_dir and not p.is_absolute() else p]
    for c in candidates:
        if c.is_file():
            try:
                return json.dumps(json.loads(c.read_text(encoding="utf-8")), indent=2)
            except (OSError, ValueError):
                continue
    return f"{name} (file not found when this card was written)"


def _command(argv: list[str] | None) -> str | None:
    return shlex.join(str(a) for a in argv) if argv else None


def model_card(info: CardInfo, recipe_dir: Path | None = None) -> str:
    """The README.md text."""
    eot = info.eot_token or "<|endoftext|>"
    r = info.recipe or {}
    peft = r.get("peft") or {}
    langs = _languages(r)
    front = {
        "language": langs or None,
        "base_model": info.base_model if info.base_is_hub else None,
        "tags": ["sft", "oasst-peft", info.mode],
        "pipeline_tag": "text-generation",
        "widget": [{"text": f"{PROMPTER}{q}{eot}{ASSISTANT}"} for q in WIDGET_QUESTIONS],
    }
    front = {k: v for k, v in front.items() if v is not None}
    method = {
        "full": "full-weight fine-tuning",
        "lora": "LoRA, merged into the base weights",
        "qlora": "QLoRA (4-bit NF4 base), merged into the base weights",
    }.get(info.mode, info.mode)
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    out += [f"# {info.title}", ""]
    out += [
        "A supervised-fine-tuned (SFT) chat model in the Open-Assistant format, trained with oasst-peft "
        f"({method}). This folder is a plain Hugging Face checkpoint: load it with "
        "`AutoModelForCausalLM.from_pretrained`, serve it with vLLM or TGI, or convert it to GGUF.",
        "",
        "## Model Details",
        "",
        "- **Model type:** Transformer-based Language Model"
        + (f" (`{info.architecture}`)" if info.architecture else ""),
        f"- **Language:** {', '.join(langs)}" if langs else "- **Language:** see the data mix below",
        f"- **Finetuned from:** {_link(info.base_model, info.base_is_hub)}",
        f"- **Method:** {method}",
        f"- **Weights:** safetensors, {info.dtype}",
        "- **Code:** oasst-peft",
        "",
        "## Prompting",
        "",
        f"Two special tokens are used to mark the beginning of user and assistant turns: `{PROMPTER}` and "
        f"`{ASSISTANT}` (`<|system|>` opens an optional system turn). Each turn ends with a `{eot}` token, "
        "which is also the `eos_token_id` of `generation_config.json`.",
        "",
        "Input prompt example:",
        "```",
        info.prompt_example or f"{PROMPTER}{WIDGET_QUESTIONS[0]}{eot}{ASSISTANT}",
        "```",
        f"The input ends with the `{ASSISTANT}` token to signal that the model should start generating the "
        "assistant reply. The chat template saved with the tokenizer renders exactly this format: "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        "",
        "## Dev Details",
        "",
        f"- base model: {_link(info.base_model, info.base_is_hub)}",
        f"- mode: {info.mode}"
        + (
            f" (r={peft.get('r')}, alpha={peft.get('alpha')}, dropout={peft.get('dropout')}, "
            f"target_modules={peft.get('target_modules')}"
            + (", rsLoRA" if peft.get("rslora") else "")
            + (", DoRA" if peft.get("dora") else "")
            + ")"
            if info.mode in ("lora", "qlora") and peft
            else ""
        ),
    ]
    if info.steps is not None:
        out.append(f"- checkpoint: {info.steps} steps")
    out.append("")
    train = _command(info.train_command)
    if train:
        out += [f"command: `{train}`", ""]
    if info.merge_command:
        out += [f"merge: `{_command(info.merge_command)}`", ""]
    if info.merge_lines:
        out += ["merge report:", "```", *info.merge_lines, "```", ""]
    if r.get("datasets"):
        out += [
            "data:",
            "```",
            yaml.safe_dump({"datasets": r["datasets"]}, sort_keys=False, allow_unicode=True).strip(),
            "```",
            "",
        ]
    if r:
        settings = {k: v for k, v in r.items() if k not in ("datasets",)}
        out += [
            "recipe:",
            "```",
            yaml.safe_dump(settings, sort_keys=False, allow_unicode=True).strip(),
            "```",
            "",
        ]
    zero = _zero_config(r, recipe_dir, info.deepspeed_config_path)
    if zero:
        out += ["zero config:", "```", zero, "```", ""]
    out += [
        "## Limitations",
        "",
        "Outputs can be factually wrong or misleading while looking convincing. Check the limitations of "
        "the base model as well.",
        "",
    ]
    return "\n".join(out)
