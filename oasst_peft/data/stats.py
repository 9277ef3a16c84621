"""What the tokenized mix holds, per dataset and split (``data stats``), and examples with their loss
tokens (``data preview``), as JSON-able dicts and as rich terminal output.

``data_stats`` has the shape ``{"datasets": {KEY: {"train": SPLIT, "validation": SPLIT}},
"total": {"train": SPLIT, "validation": SPLIT}}`` with SPLIT = ``{"conversations", "turns", "tokens",
"trained_tokens", "truncated", "dropped": {REASON: n}}``.
"""

from __future__ import annotations

import copy
from collections import Counter

SPLITS = ("train", "validation")
COUNTS = ("conversations", "turns", "tokens", "trained_tokens", "truncated")


def _empty_split() -> dict:
    return {**dict.fromkeys(COUNTS, 0), "dropped": {}}


def split_stats(dataset, dropped: Counter) -> dict:
    """SPLIT counts of one tokenized Dataset (with its provenance columns) and its drops."""
    import pyarrow.compute as pc

    out = _empty_split()
    n = len(dataset)
    if n:
        table = dataset.with_format("arrow")[:]
        out["conversations"] = n
        out["turns"] = int(pc.sum(table.column("n_messages")).as_py() or 0)
        out["tokens"] = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        masks = pc.list_flatten(table.column("assistant_masks"))
        out["trained_tokens"] = int(pc.sum(pc.cast(masks, "int64")).as_py() or 0)
        out["truncated"] = int(pc.sum(pc.cast(table.column("truncated"), "int64")).as_py() or 0)
    out["dropped"] = dict(sorted((r, int(c)) for r, c in dropped.items() if c))
    return out


def add_splits(a: dict, b: dict) -> dict:
    """The sum of two SPLIT dicts."""
    out = {k: a[k] + b[k] for k in COUNTS}
    out["dropped"] = dict(sorted((Counter(a["dropped"]) + Counter(b["dropped"])).items()))
    return out


def build_stats(mix, parts: dict, drops: dict) -> dict:
    """The ``data stats`` dict from the loaded mix (read-time drops) and the tokenized parts."""
    datasets = {}
    total = {s: _empty_split() for s in SPLITS}
    for key, by_split in parts.items():
        datasets[key] = {}
        for split in SPLITS:
            dropped = Counter(mix.parts[key].dropped[split]) + drops[key][split]
            s = split_stats(by_split[split], dropped)
            datasets[key][split] = s
            total[split] = add_splits(total[split], s)
    return {"datasets": datasets, "total": total}


def data_stats(tokenized) -> dict:
    """Per dataset and split: conversations, turns, tokens, trained tokens, truncated, dropped by reason."""
    return copy.deepcopy(tokenized.stats)


def _rows_to_show(tokenized, n: int) -> list[tuple[str, str, int]]:
    """Up to ``n`` (key, split, row): the datasets' training rows in turn, then validation rows."""
    picked: list[tuple[str, str, int]] = []
    for split in SPLITS:
        sizes = {k: len(p[split]) for k, p in tokenized.parts.items()}
        row = 0
        while len(picked) < n and any(size > row for size in sizes.values()):
            for key, size in sizes.items():
                if row < size and len(picked) < n:
                    picked.append((key, split, row))
            row += 1
    return picked


def data_preview(tokenized, tokenizer, n: int = 3) -> dict:
    """``{"examples": [{"dataset", "split", "messages", "text", "tokens": [{"id", "text", "loss"}]}]}``."""
    from oasst_peft.template import render

    examples = []
    for key, split, row in _rows_to_show(tokenized, max(0, n)):
        rec = tokenized.parts[key][split][row]
        messages = None
        if tokenized.mix is not None:
            conv = tokenized.mix.parts[key].split(split)[rec["conv_index"]]
            messages = [dict(m) for m in conv[: rec["n_messages"]]]
        ids, mask = rec["input_ids"], rec["assistant_masks"]
        text = render(tokenizer, messages) if messages is not None else tokenizer.decode(ids)
        tokens = [
            {"id": int(i), "text": tokenizer.decode([int(i)]), "loss": bool(m)}
            for i, m in zip(ids, mask, strict=True)
        ]
        examples.append(
            {"dataset": key, "split": split, "messages": messages, "text": text, "tokens": tokens}
        )
    return {"examples": examples}


def _dropped_text(dropped: dict) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(dropped.items(), key=lambda x: -x[1])) or "-"


def summary_lines(stats: dict) -> list[str]:
    """One line per dataset for a training log: sizes, trained tokens, and what was truncated or dropped."""
    lines = []
    for key, by_split in stats["datasets"].items():
        tr, va = by_split["train"], by_split["validation"]
        line = (
            f"data: {key}: {tr['conversations']:,} train / {va['conversations']:,} validation conversations, "
            f"{tr['trained_tokens']:,} trained tokens"
        )
        truncated = tr["truncated"] + va["truncated"]
        dropped = Counter(tr["dropped"]) + Counter(va["dropped"])
        if truncated:
            line += f"; truncated {truncated:,}"
        if dropped:
            line += f"; dropped {sum(dropped.values()):,} ({_dropped_text(dropped)})"
        lines.append(line)
    return lines


def format_stats(stats: dict, console=None) -> None:
    """Print ``data_stats`` as a table."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a file: wide enough that nothing wraps
            console = Console(width=200)
    table = Table(title="conversations (convs), tokens and drops per dataset and split")
    rows = [*((k, v) for k, v in stats["datasets"].items()), ("total", stats["total"])]
    table.add_column("dataset", overflow="fold")  # a long name wraps; the numbers are never cut
    table.add_column("split", no_wrap=True, min_width=len("validation"))
    for name, count in zip(("convs", "turns", "tokens", "trained", "truncated"), COUNTS, strict=True):
        widest = max(len(f"{by_split[split][count]:,}") for _, by_split in rows for split in SPLITS)
        table.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), widest))
    table.add_column("dropped", overflow="fold")
    for i, (key, by_split) in enumerate(rows):
        for split in SPLITS:
            s = by_split[split]
            table.add_row(
                Text(key, style="bold" if i == len(rows) - 1 else ""),
                split,
                *(f"{s[c]:,}" for c in COUNTS),
                _dropped_text(s["dropped"]),
                end_section=split == "validation" and i >= len(rows) - 2,
            )
    console.print(table)


LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the tokens with loss, where colour cannot show them


def format_preview(preview: dict, console=None) -> None:
    """Print ``data_preview``: each example's text with the loss tokens highlighted."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    colour = console.color_system is not None  # piped or NO_COLOR: the loss spans are bracketed instead
    for ex in preview["examples"]:
        console.rule(Text(f"{ex['dataset']} / {ex['split']}"))
        text, inside = Text(), False
        for tok in ex["tokens"]:
            if not colour and tok["loss"] != inside:
                text.append(LOSS_OPEN if tok["loss"] else LOSS_CLOSE)
                inside = bool(tok["loss"])
            text.append(tok["text"], style="bold green" if tok["loss"] else "dim")
        if inside:
            text.append(LOSS_CLOSE)
        console.print(text, highlight=False)
        trained = sum(t["loss"] for t in ex["tokens"])
        marked = "green" if colour else f"between {LOSS_OPEN} and {LOSS_CLOSE}"
        console.print(
            Text(f"{len(ex['tokens'])} tokens, {trained} with loss ({marked})", style="italic"),
            highlight=False,
        )
