"""Sampling: replies from a trained run, a merged model or a base plus adapter, with the saved chat template.

``sample(model)`` is what ``oasst-peft sample`` calls. ``model`` is a merged (or full-weight) model
dir, a LoRA/QLoRA run or adapter dir (its base found from ``oasst_run.json``), or a base (dir,
``.gguf``, ``package:...``) with ``adapter=``. Prompts are rendered with the tokenizer's saved chat
template (the oasst one after training), left-padded into batches, and generation stops at the
end-of-turn token of the saved generation config. The report records, per sampling config and
prompt, the reply (special tokens removed), whether it ended with the end-of-turn token, and
timings. ``oasst_peft.eval_samples`` uses the same generation for the replies logged at each evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from oasst_peft import atomic, quiet
from oasst_peft.errors import OasstError, did_you_mean
from oasst_peft.sampler import load_sampler
from oasst_peft.template import ROLES, WIDGET_PROMPTS

# Named sampling configs. ``typical`` is the cards' "typical sampling 0.2".
SAMPLING_CONFIGS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "typical": {"do_sample": True, "typical_p": 0.2, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "nucleus": {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "top_k": 0, "typical_p": 1.0},
    "beam": {"do_sample": False, "num_beams": 4, "early_stopping": True},
}


def widget_prompts() -> list[list[dict]]:
    """The seed cards' three widget prompts as one-turn conversations."""
    return [[{"role": "user", "content": p}] for p in WIDGET_PROMPTS]


# ---------------------------------------------------------------- prompts


def check_messages(messages, where: str) -> list[dict]:
    """A conversation to continue: role/content dicts, the last one from the user."""
    if not isinstance(messages, list) or not messages:
        raise OasstError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise OasstError(
                f'{where}: messages[{i}] must be {{"role": system|user|assistant, "content": text}}'
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise OasstError(f"{where}: the last message must be from the user (the model writes the reply)")
    return out


def load_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts from a file: JSONL lines ``{"messages": [...]}`` and/or plain text lines (one user turn each)."""
    p = Path(path)
    if not p.is_file():
        raise OasstError(f"--prompts: file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OasstError(f"--prompts: {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise OasstError(f"--prompts: cannot read {p} ({e.strerror})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        where = f"{p}:{n}"
        if not s.startswith("{"):
            prompts.append([{"role": "user", "content": s}])
            continue
        try:
            row = json.loads(s)
        except json.JSONDecodeError as e:
            raise OasstError(
                f'{where}: invalid JSON ({e.msg}, column {e.colno}); write one {{"messages": [...]}} '
                "object or one plain-text prompt per line"
            ) from None
        if not isinstance(row, dict) or "messages" not in row:
            raise OasstError(f"{where}: a JSON line needs a 'messages' key (a list of {{role, content}})")
        prompts.append(check_messages(row["messages"], where))
    if not prompts:
        raise OasstError(f'--prompts: {p} holds no prompts; write one per line (text or {{"messages"}})')
    return prompts


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation plus the assistant opener, exactly as the saved chat template makes them."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text the model sees (template with the generation prompt)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- generation


def check_config_name(name: str) -> None:
    """One line for a sampling config name that is not one of ``SAMPLING_CONFIGS`` (before anything loads)."""
    if name not in SAMPLING_CONFIGS:
        raise OasstError(
            f"--config: unknown sampling config '{name}' (use {', '.join(SAMPLING_CONFIGS)})"
            + did_you_mean(name, SAMPLING_CONFIGS)
        )


def generation_config(name: str, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """A fresh GenerationConfig for a named sampling config (nothing inherited from the model)."""
    check_config_name(name)
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        **SAMPLING_CONFIGS[name],
    )


def generate_replies(
    model,
    tokenizer,
    prompts: list[list[dict]],
    config: str = "greedy",
    max_new_tokens: int = 128,
    eos_ids: list[int] | None = None,
    pad_id: int | None = None,
    batch_size: int = 8,
    seed: int | None = 0,
    synced_gpus: bool = False,
) -> list[dict]:
    """Replies to ``prompts``, batched with left padding: ``[{"reply", "ended_with_eot", "new_tokens"}]``."""
    import torch
    from transformers import set_seed

    eos_ids = eos_ids if eos_ids is not None else [tokenizer.eos_token_id]
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id or eos_ids[0])
    gen = generation_config(config, max_new_tokens, eos_ids, pad_id)
    if batch_size < 1:
        raise OasstError("--batch-size: must be >= 1")
    if seed is not None:
        set_seed(seed)
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, m) for m in prompts]
    out: list[dict] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        with torch.no_grad():
            seqs = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen,
                synced_gpus=synced_gpus,
            )
        for row in seqs[:, width:].tolist():
            out.append(_reply(tokenizer, row, eos_ids))
    return out


def _reply(tokenizer, new_ids: list[int], eos_ids: list[int]) -> dict:
    """Cut a generated row at its first end-of-turn token and decode it without special tokens.

    ``stop_token`` names the end-of-turn token that ended it (None when ``max_new_tokens`` ran out).
    """
    stop = next((i for i, t in enumerate(new_ids) if t in eos_ids), None)
    kept = new_ids if stop is None else new_ids[:stop]
    return {
        "reply": tokenizer.decode(kept, skip_special_tokens=True),
        "ended_with_eot": stop is not None,
        "stop_token": tokenizer.convert_ids_to_tokens(new_ids[stop]) if stop is not None else None,
        "new_tokens": len(kept) + (stop is not None),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:  # pragma: no cover - all three are dependencies
            out[name] = None
    return out


@quiet.hides_harmless  # the library warnings the CLI hides (oasst_peft/quiet.py), for this call only
def sample(
    model: str | Path,
    adapter: str | Path | None = None,
    prompts: list[list[dict]] | None = None,
    configs: tuple[str, ...] | list[str] = ("greedy",),
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str | None = None,
    chat_template: str | None = None,
    say=None,
) -> dict:
    """Generate replies to ``prompts`` (default: the cards' widget prompts) under each named config.

    Returns the sampling report: ``{"model", "settings", "configs", "prompts", "replies", "timings",
    "versions"}`` where ``replies[config]`` is one ``{"prompt", "reply", "ended_with_eot",
    "stop_token", "new_tokens"}`` per prompt, in prompt order.
    """
    configs = list(configs) or ["greedy"]
    for name in configs:
        check_config_name(name)
    if max_new_tokens < 1:
        raise OasstError("--max-new-tokens: must be >= 1")
    prompts = [check_messages(m, f"prompts[{i}]") for i, m in enumerate(prompts or widget_prompts())]
    t0 = time.perf_counter()
    if say:
        say(f"loading {model}" + (f" with adapter {adapter}" if adapter else ""))
    s = load_sampler(model, adapter=adapter, dtype=dtype, chat_template=chat_template)
    load_s = time.perf_counter() - t0
    replies, per_config = {}, {}
    for name in configs:
        if say:
            say(f"sampling: {name} on {len(prompts)} prompts")
        t = time.perf_counter()
        rows = generate_replies(
            s.model, s.tokenizer, prompts, name, max_new_tokens, s.eos_ids, s.pad_id, batch_size, seed
        )
        secs = time.perf_counter() - t
        replies[name] = [{"prompt": i, **r} for i, r in enumerate(rows)]
        n = sum(r["new_tokens"] for r in rows)
        per_config[name] = {"seconds": round(secs, 3), "new_tokens": n, "tokens_per_s": round(n / secs, 1)}
    return {
        "model": s.info,
        "settings": {"max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size},
        "configs": {name: dict(SAMPLING_CONFIGS[name]) for name in configs},
        "prompts": [
            {"messages": m, "text": render_prompt(s.tokenizer, m), "tokens": len(prompt_ids(s.tokenizer, m))}
            for m in prompts
        ],
        "replies": replies,
        "timings": {"load_s": round(load_s, 3), "total_s": round(time.perf_counter() - t0, 3), **per_config},
        "versions": _versions(),
    }


# ---------------------------------------------------------------- report


def check_report_path(path: str | Path) -> Path:
    """``--out`` checked before anything is generated: a file name, under a folder (made if missing)."""
    p = Path(path)
    if p.is_dir():
        raise OasstError(f"--out: {p} is a folder; give a file name such as report.json")
    blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise OasstError(f"--out: {blocked} is a file, so {p} cannot be written; choose another path")
    return p


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as JSON, atomically (temp file beside the target, then rename); the folder is made."""
    p = check_report_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(p, report)


def last_user(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def format_report(report: dict, console=None, width: int | None = None) -> None:
    """Print the report as a table: one row per prompt and config, then timings."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=width)
    m = report["model"]
    title = f"{m['path']}" + (
        f" + {m['adapter']}" if m.get("adapter") and m["kind"] == "base+adapter" else ""
    )
    table = Table(title=f"samples from {title}", show_lines=True)
    table.add_column("prompt", ratio=2)
    table.add_column("config", no_wrap=True)
    table.add_column("reply", ratio=5)
    table.add_column("eot", justify="center", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    for i, p in enumerate(report["prompts"]):
        for j, (name, rows) in enumerate(report["replies"].items()):
            r = rows[i]
            table.add_row(
                last_user(p["messages"]) if j == 0 else "",
                name,
                r["reply"],
                "yes" if r["ended_with_eot"] else "no",
                str(r["new_tokens"]),
            )
    console.print(table)
    t = report["timings"]
    speeds = ", ".join(
        f"{n} {t[n]['seconds']:.1f} s ({t[n]['tokens_per_s']} tok/s)" for n in report["replies"]
    )
    console.print(f"{m['kind']} on {m['device']} ({m['dtype']}); load {t['load_s']:.1f} s; {speeds}")
