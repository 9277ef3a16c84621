"""GPU suite: QLoRA, LoRA and full bf16 training, merge and sample on one CUDA GPU, in one command, no hub.

NOT YET RUN ON A GPU: written and smoke-tested on CPU only (``--smoke``). Its first run on an H100/H200
is the one that says whether it finishes in the 8 minutes it is sized for and whether its targets hold.

What it does, all from random weights and synthetic conversations written to a work folder:

- **models**: a random Llama of about 1.1B parameters (TinyLlama's shape) and a random GPT-NeoX of about
  400M (hidden 1024, 32 layers), both safetensors on local disk with a small BPE tokenizer;
- **training**: for each model, QLoRA (NF4, bf16 compute, gradient checkpointing), LoRA in bf16 and full
  bf16, each through ``oasst_peft.train.train`` (the child runs of ``benchmarks/train_throughput.py``):
  real (non-padding) tokens/s, padding %, peak ``torch.cuda.max_memory_allocated``, and ``plan``'s
  prediction for the same recipe beside it;
- **baseline**: for each mode on the Llama, TRL's ``SFTTrainer`` (an HF Trainer, with the same peft
  model) in random order with padded batches, in the same run; the ratio is printed;
- **merge and sample**: the Llama QLoRA run is merged (``merge_tools.merge`` with the NF4 round trip and
  ``verify``: merged logits against base + adapter), then ``oasst_peft.sample`` generates on the GPU and
  its tokens/s are reported;
- **output**: a table and one summary line. Exit 1 when QLoRA's real tokens/s is under
  ``QLORA_SPEEDUP_TARGET`` x the baseline's, when a memory prediction is off by more than
  ``MEMORY_TOLERANCE``, or when the merge does not verify.

    PYTHONPATH=. python benchmarks/gpu_suite.py                 # on a CUDA GPU
    PYTHONPATH=. python benchmarks/gpu_suite.py --smoke         # on CPU, seconds: tiny models, no targets

``--smoke`` builds tiny models of both architectures, trains a few steps of each mode in fp32 on the CPU
(QLoRA too: bitsandbytes' NF4 runs on CPU), merges, samples and prints the table; it checks no targets
(CPU figures say nothing about a GPU) and exits 0 when every step ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import throughput_world as world  # noqa: E402
from benchmarks import train_throughput as tt  # noqa: E402

QLORA_SPEEDUP_TARGET = 1.5
MEMORY_TOLERANCE = 0.15
MODES = ("qlora", "lora", "full")
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
LLAMA_1B["intermediate_size"] = 5632
NEOX_400M = dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16, intermediate_size=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, a few steps, no targets")
    ap.add_argument("--steps", type=int, default=None, help="baseline steps per run (default 24; smoke 2)")
    ap.add_argument("--max-length", type=int, default=None, help="default 1024; smoke 64")
    ap.add_argument("--models", default="llama,neox", help="comma list of llama, neox")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of qlora, lora, full")
    ap.add_argument("--work", type=Path, default=None, help="keep models, data and runs here")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 24)
    args.max_length = args.max_length or (64 if args.smoke else 1024)
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.models:
        if m not in ("llama", "neox"):
            ap.error(f"--models: unknown model {m!r} (llama, neox)")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (qlora, lora, full)")
    return args


def build_models(work: Path, corpus: list[str], smoke: bool, models: list[str]) -> dict[str, Path]:
    """The random bases, saved with safetensors: ``{"llama": dir, "neox": dir}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig

    llama = world.write_model(work / "tok", corpus, qlora_1b=False)  # trains the tokenizer (and a tiny Llama)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    ids = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # TRL's fused loss in the baseline reads lm_head.weight, which peft wraps if untied
    )
    dtype = torch.float32 if smoke else torch.bfloat16
    out = {}
    for name in models:
        if name == "llama":
            shape = dict(TINY, num_key_value_heads=2) if smoke else LLAMA_1B
            config = LlamaConfig(max_position_embeddings=2048, **ids, **shape)
        else:
            shape = TINY if smoke else NEOX_400M
            config = GPTNeoXConfig(max_position_embeddings=2048, **ids, **shape)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        folder = work / name
        model.save_pretrained(folder)  # safetensors
        tokenizer.save_pretrained(folder)
        out[name] = folder
        del model
    return out


def recipe_for(
    work: Path, base: Path, data: Path, n_train: int, max_length: int, mode: str, smoke: bool
) -> dict:
    d = world.recipe_dict(work, base, data, n_train, max_length, qlora_1b=True)
    d["output_dir"] = str(work / f"run-{base.name}-{mode}")
    d["save_strategy"] = "steps" if mode == "qlora" else "no"  # the QLoRA run is merged afterwards
    d["save_steps"] = 10**6
    if mode == "full":
        d.pop("peft", None)
        d["learning_rate"] = 1e-5
    elif mode == "lora":
        d["peft"] = dict(d["peft"], mode="lora")
    if smoke:
        d.update(dtype="fp32", use_flash_attention=False)
    return d


def predicted_gib(recipe_path: Path) -> float:
    """``plan``'s total for the recipe on one GPU."""
    from oasst_peft.config import load_recipe
    from oasst_peft.plan import plan_recipe

    return float(plan_recipe(load_recipe(recipe_path), gpus=1, gpu_mem_gib=80.0)["recipe"]["total_gib"])


def child(arm: str, recipe_path: Path, core: int | None) -> dict:
    """One training in this process: ``train_throughput``'s run; the baseline takes the plain HF loss.

    TRL's fused LM-head loss cannot run on the lm_head peft wraps for the added tokens' rows, so the baseline
    is an HF Trainer loss on TRL's data path: random order, each batch padded to its longest.
    """
    import trl
    from transformers import Trainer

    class PlainLossSFTTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    trl.SFTTrainer = PlainLossSFTTrainer  # train_throughput's baseline builds trl.SFTTrainer
    return tt.run(arm, recipe_path, core)


def start_child(arm: str, recipe_path: Path, device: str, core: int | None):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-W", "ignore", __file__, "--child", arm, "--recipe", str(recipe_path)]
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        cmd += ["--core", str(core)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def train_runs(work: Path, bases: dict[str, Path], data: Path, args, device: str) -> list[dict]:
    import yaml

    rows = []
    n_train = args.steps * world.BATCH
    for name, base in bases.items():
        for mode in args.modes:
            recipe = recipe_for(work, base, data, n_train, args.max_length, mode, args.smoke)
            path = work / f"{name}-{mode}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            arms = ("baseline", "ours") if name == "llama" else ("ours",)
            for arm in arms:
                core = None if device == "cuda" else 0
                r = tt.finish_child(arm, start_child(arm, path, device, core))
                rows.append(
                    {
                        "model": name,
                        "mode": mode,
                        "run": arm,
                        "batching": r["batching"].split(" (")[0],
                        "tokens_per_s": r["tokens_per_s"],
                        "padding": r["padding"],
                        "peak_gib": r.get("cuda_peak_mib", float("nan")) / 1024,
                        "plan_gib": predicted_gib(path),
                        "output_dir": recipe["output_dir"],
                    }
                )
    return rows


def merge_and_sample(run_dir: Path, work: Path, smoke: bool) -> dict:
    from merge_tools.merge import merge
    from oasst_peft.sample import sample

    merged = work / "merged-qlora"
    report = merge(run_dir, merged, verify=True, overwrite=True, say=lambda _line: None)
    v = report.verify
    got = sample(merged, max_new_tokens=16 if smoke else 128, dtype=None if smoke else "bf16")
    timing = got["timings"]["greedy"]
    return {
        "verified": bool(v and v.passed),
        "max_abs_diff": v.max_abs_diff if v else float("nan"),
        "tolerance": v.tolerance if v else float("nan"),
        "sample_tokens_per_s": float(timing["tokens_per_s"]),
        "sample_device": got.get("model", {}).get("device", "?"),
    }


def table(rows: list[dict]) -> list[str]:
    """The table's lines: one per training, with the baseline ratio and the memory prediction's error."""
    base = {(r["model"], r["mode"]): r for r in rows if r["run"] == "baseline"}
    head = (
        f"{'model':6s} {'mode':6s} {'run':9s} {'batching':15s} {'real tok/s':>11s} {'ratio':>6s} "
        f"{'padding':>8s} {'peak GiB':>9s} {'plan GiB':>9s} {'plan err':>9s}"
    )
    lines = [head]
    for r in rows:
        b = base.get((r["model"], r["mode"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b and r["run"] == "ours" else "-"
        err = memory_error(r)
        lines.append(
            f"{r['model']:6s} {r['mode']:6s} {r['run']:9s} {r['batching']:15s} {r['tokens_per_s']:11.0f} "
            f"{ratio:>6s} {r['padding']:8.1%} {r['peak_gib']:9.2f} {r['plan_gib']:9.2f} "
            + (f"{err:9.1%}" if err == err else f"{'-':>9s}")
        )
    return lines


def memory_error(row: dict) -> float:
    """|plan - measured| / measured for a row of ours (NaN without a CUDA peak)."""
    if row["run"] != "ours" or row["peak_gib"] != row["peak_gib"] or row["peak_gib"] <= 0:
        return float("nan")
    return abs(row["plan_gib"] - row["peak_gib"]) / row["peak_gib"]


def verdict(rows: list[dict], merged: dict | None, smoke: bool) -> list[str]:
    """The targets missed (empty: all met; smoke checks none)."""
    if smoke:
        return []
    misses = []
    base = {(r["model"], r["mode"]): r for r in rows if r["run"] == "baseline"}
    for r in rows:
        b = base.get((r["model"], "qlora")) if r["run"] == "ours" and r["mode"] == "qlora" else None
        if b and r["tokens_per_s"] < QLORA_SPEEDUP_TARGET * b["tokens_per_s"]:
            misses.append(f"{r['model']} qlora speed")
        err = memory_error(r)
        if err == err and err > MEMORY_TOLERANCE:
            misses.append(f"{r['model']} {r['mode']} memory prediction")
    if merged is not None and not merged["verified"]:
        misses.append("merge verify")
    return misses


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.child:
        print(tt.RESULT + json.dumps(child(args.child, args.recipe, args.core)), flush=True)
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU here; run it on one, or use --smoke on CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke)"
    data, corpus = world.write_data(work, args.steps * world.BATCH, args.max_length)
    bases = build_models(work, corpus, args.smoke, args.models)
    print(
        f"gpu_suite on {gpu}: models {', '.join(args.models)}; {args.steps} steps x {world.BATCH} conversations"
    )
    rows = train_runs(work, bases, data, args, device)
    merged = None
    qlora = next(
        (r for r in rows if r["model"] == "llama" and r["mode"] == "qlora" and r["run"] == "ours"), None
    )
    if qlora is not None:
        merged = merge_and_sample(Path(qlora["output_dir"]), work, args.smoke)
    for line in table(rows):
        print(line)
    if merged is not None:
        print(
            f"merge: NF4 round trip max |logit diff| {merged['max_abs_diff']:.3g} (tolerance "
            f"{merged['tolerance']:.3g}): {'verified' if merged['verified'] else 'NOT verified'}; "
            f"sample on {merged['sample_device']}: {merged['sample_tokens_per_s']:.0f} tokens/s"
        )
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "rows": rows, "merge": merged}, indent=2))
    misses = verdict(rows, merged, args.smoke)
    state = (
        "SMOKE (no targets)" if args.smoke else ("PASS" if not misses else "FAIL (" + ", ".join(misses) + ")")
    )
    print(
        f"gpu_suite: {gpu}; QLoRA >= {QLORA_SPEEDUP_TARGET}x baseline tokens/s, memory within "
        f"{MEMORY_TOLERANCE:.0%} of plan; {time.perf_counter() - t0:.0f}s: {state}"
    )
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
