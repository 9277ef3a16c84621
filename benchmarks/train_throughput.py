"""Benchmark: training throughput with the recipe's batching vs plain TRL padding each batch to its longest.

One run, two trainings of the same random Llama (hidden 256, 4 layers), started from the same weights, on
the same synthetic conversations whose token counts spread like oasst's (lognormal, ~24 to max_length),
for one epoch each (the same number of steps unless packing, which fits several conversations in a row):

- **baseline**: ``trl.SFTTrainer`` as it comes: random batches, each padded to its longest conversation;
- **ours**: ``oasst_peft.train.train(recipe)`` itself, with the recipe's defaults (``packing: auto``:
  packed rows with flash attention, length-grouped batches otherwise).

Every other training argument is the same (both take ``oasst_peft.train.sft_config``; the baseline's only
change is random, padded batching). Each runs in its own subprocess. Printed for both: real (non-padding)
tokens/s, padding fraction of the batches the trainer saw, peak memory (CPU: peak RSS of the process and its
rise during training; CUDA: ``max_memory_allocated``), the token-weighted training loss over the epoch, and
the loss on held-out conversations after the epoch (the same unpacked forward for both). The held-out loss
is the one compared: the epoch's training loss weighs each step by its tokens, so under length grouping the
first, longest batch, taken at the initial loss, counts for more. Targets on CPU: ours >= 1.3x the
baseline's real tokens/s, padding <= 5 %, held-out loss within LOSS_TOLERANCE (relative) of the baseline's.
The last line is the summary; the exit code is 1 when a target is missed. About 2 minutes on 2 CPU cores.

On CPU the two runs train at the same time, each with one thread pinned to its own core, and tokens/s is
per CPU-second of that thread: other work on a shared machine then slows neither figure (wall-clock
tokens/s is printed beside it). On CUDA they run one after the other and tokens/s is wall-clock.

    PYTHONPATH=. python benchmarks/train_throughput.py [--steps 48] [--device cpu|cuda] [--qlora-1b]

``--qlora-1b`` (for a GPU): a random 1.1B Llama (TinyLlama's shape) as QLoRA, bf16, gradient checkpointing,
``use_flash_attention: true`` (packing when flash-attn is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEEDUP_TARGET = 1.3
PADDING_TARGET = 0.05
# Relative difference of held-out loss allowed between the two runs. The order of the same conversations
# alone moves it: over four data orders each, baseline 6.02-6.14 and ours 6.03-6.18 (standard deviation
# about 1 %), so a difference of one run of each within 3 % is "equal within noise".
LOSS_TOLERANCE = 0.03
RESULT = "RESULT "
BATCH = 8
HELDOUT = 48


# ---------------------------------------------------------------------------------------------------------
# The data and the model (written once by the parent, read by both runs)
# ---------------------------------------------------------------------------------------------------------


def words(n: int, rng) -> list[str]:
    syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "de", "pu", "ga", "shi", "ro", "be", "zu"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
    return sorted(out)


def conversation(rng, vocab: list[str], target_tokens: int) -> dict:
    """User turns of random words, each answered with the same words reversed (learnable), ~target_tokens long."""
    turns = 1 if target_tokens < 120 else rng.choice([1, 2, 3])
    per_turn = max(4, target_tokens // (turns * 2 * 2))  # ~2 tokens per word, user + assistant
    messages = []
    for _ in range(turns):
        ws = [rng.choice(vocab) for _ in range(max(2, int(per_turn * rng.uniform(0.7, 1.3))))]
        messages.append({"role": "user", "content": "reverse: " + " ".join(ws)})
        messages.append({"role": "assistant", "content": " ".join(reversed(ws))})
    return {"messages": messages}


def write_data(work: Path, n_train: int, max_length: int, seed: int = 0) -> tuple[Path, list[str]]:
    """n_train + HELDOUT conversations in one messages-format file; the recipe's val_split holds HELDOUT out."""
    import random

    rng = random.Random(seed)
    vocab = words(400, rng)

    def length() -> int:  # oasst-like spread: many short threads, a long tail cut at max_length
        return int(min(max_length, max(24, rng.lognormvariate(math.log(100), 0.8))))

    rows = [conversation(rng, vocab, length()) for _ in range(n_train + HELDOUT)]
    path = work / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, [m["content"] for r in rows[:300] for m in r["messages"]]


def write_model(work: Path, corpus: list[str], qlora_1b: bool) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|padding|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if qlora_1b:  # TinyLlama-1.1B's shape
        shape = dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
        )
    else:
        shape = dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=688,
        )
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if qlora_1b else torch.float32)
    out = work / "base"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe_dict(work: Path, base: Path, data: Path, n_train: int, max_length: int, qlora_1b: bool) -> dict:
    d = {
        "model_name": str(base),
        "dtype": "bf16" if qlora_1b else "fp32",
        "max_length": max_length,
        "learning_rate": 2e-4 if qlora_1b else 3e-3,
        "warmup_steps": 2,
        "num_train_epochs": 1,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "output_dir": str(work / "run"),
        "cache_dir": str(work / "cache"),
        "datasets": [
            {
                "chat": {
                    "data_files": str(data),
                    "format": "messages",
                    "val_split": HELDOUT / (n_train + HELDOUT),
                }
            }
        ],
    }
    if qlora_1b:
        d.update(
            peft={"mode": "qlora", "r": 16, "alpha": 32, "dropout": 0.0},
            gradient_checkpointing=True,
            use_flash_attention=True,
        )
    return d


# ---------------------------------------------------------------------------------------------------------
# One run (in a subprocess)
# ---------------------------------------------------------------------------------------------------------


class Counting:
    """Wraps the trainer's collator: real tokens (the examples' own), batch tokens and loss tokens per batch."""

    def __init__(self, inner):
        self.inner = inner
        self.real = 0
        self.total = 0
        self.loss_tokens: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real += sum(len(e["input_ids"]) for e in examples)
        self.total += batch["input_ids"].numel()
        self.loss_tokens.append(int((batch["labels"][..., 1:] != -100).sum()))
        return batch


def _instrument(trainer, record: dict):
    from transformers import TrainerCallback

    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _reset_peak()
            record["rss_before_mib"] = _rss_mib()
            record["t0"], record["cpu0"] = time.perf_counter(), time.process_time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kw):
            record["seconds"] = time.perf_counter() - record.pop("t0")
            record["cpu_seconds"] = time.process_time() - record.pop("cpu0")
            record["steps"] = state.global_step

    trainer.add_callback(Clock())
    record["_counting"], record["_losses"], record["_trainer"] = counting, losses, trainer


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def heldout_loss(model, dataset, device) -> float:
    """Token-weighted loss over the held-out conversations, one unpadded forward each."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]], device=device)
            mask = torch.tensor([row["assistant_masks"]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels != -100).sum())
    return total / count


def run(which: str, recipe_path: Path, core: int | None) -> dict:
    import torch
    from transformers import set_seed

    if core is not None:  # CPU: one training thread on its own core (see the module docstring)
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)

    import oasst_peft.train as train_mod
    from oasst_peft import settings, speed
    from oasst_peft.config import load_recipe
    from oasst_peft.model import load_model, load_tokenizer

    recipe = load_recipe(recipe_path)
    record: dict = {"run": which}
    quiet = lambda _line: None  # noqa: E731
    lines: list[str] = []
    if which == "ours":
        make = train_mod.make_trainer

        def make_trainer(**kwargs):  # the real train path, with the collator counted and the clock on
            trainer = make(**kwargs)
            _instrument(trainer, record)
            return trainer

        train_mod.make_trainer = make_trainer
        train_mod.train(recipe, overwrite=True, say=lines.append)
        record["batching"] = next((ln.split(": ", 1)[1] for ln in lines if ln.startswith("batching:")), "?")
        tokenized, _ = train_mod.prepare_data(recipe, load_tokenizer(recipe)[0], say=quiet)
    else:
        from trl import SFTTrainer

        recipe, run = settings.resolve(recipe, say=quiet)
        dtype = run.dtype
        tokenizer, fmt = load_tokenizer(recipe)
        tokenized, _ = train_mod.prepare_data(recipe, tokenizer, say=quiet)
        set_seed(recipe.seed % (2**32))  # as train() does: the same initial weights
        loaded = load_model(recipe, tokenizer, fmt, run, say=quiet)
        random_padded = speed.Batching(False, False, "plain TRL: random batches padded to their longest")
        args = train_mod.sft_config(
            recipe, Path(recipe.output_dir) / "baseline", dtype, None, False, None, batching=random_padded
        )
        trainer = SFTTrainer(
            model=loaded.model, args=args, train_dataset=tokenized.train, processing_class=tokenizer
        )
        _instrument(trainer, record)
        trainer.train()
        record["batching"] = random_padded.name
    counting, losses, trainer = record.pop("_counting"), record.pop("_losses"), record.pop("_trainer")
    device = next(trainer.model.parameters()).device
    record.update(
        real_tokens=counting.real,
        batch_tokens=counting.total,
        padding=1 - counting.real / counting.total,
        wall_tokens_per_s=counting.real / record["seconds"],
        tokens_per_s=counting.real / (record["cpu_seconds"] if core is not None else record["seconds"]),
        train_loss=sum(lo * n for lo, n in zip(losses, counting.loss_tokens, strict=False))
        / max(1, sum(counting.loss_tokens[: len(losses)])),
        heldout_loss=heldout_loss(trainer.model, tokenized.validation["chat"], device),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    record["rss_rise_mib"] = max(0.0, record["peak_rss_mib"] - record["rss_before_mib"])
    if torch.cuda.is_available():
        record["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def start_child(which: str, recipe_path: Path, device: str, core: int | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-W", "ignore", __file__, "--child", which, "--recipe", str(recipe_path)]
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        cmd += ["--core", str(core)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_child(which: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-5:]
        raise SystemExit(f"{which} run failed: " + " | ".join(tail))
    return json.loads(lines[-1].removeprefix(RESULT))


def run_both(recipe_path: Path, device: str) -> dict[str, dict]:
    """CPU: both runs at once, one core and one thread each; CUDA: one after the other."""
    arms = ("baseline", "ours")
    cores = sorted(os.sched_getaffinity(0))
    if device == "cpu" and len(cores) >= 2:
        procs = {w: start_child(w, recipe_path, device, cores[i]) for i, w in enumerate(arms)}
        return {w: finish_child(w, p) for w, p in procs.items()}
    core = cores[0] if device == "cpu" else None
    return {w: finish_child(w, start_child(w, recipe_path, device, core)) for w in arms}


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", type=int, default=48, help="baseline steps = one epoch of steps x 8 conversations"
    )
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--qlora-1b", action="store_true", help="random 1.1B Llama, QLoRA, bf16 (for a GPU)")
    ap.add_argument("--work", type=Path, default=None, help="keep the data, model and runs here")
    ap.add_argument("--json", type=Path, default=None, help="also write both runs' figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(run(args.child, args.recipe, args.core)), flush=True)
        return 0

    import yaml

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    n_train = args.steps * BATCH
    data, corpus = write_data(work, n_train, args.max_length)
    base = write_model(work, corpus, args.qlora_1b)
    recipe_path = work / "recipe.yaml"
    recipe = recipe_dict(work, base, data, n_train, args.max_length, args.qlora_1b)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    what = (
        "random 1.1B Llama, QLoRA r=16, bf16" if args.qlora_1b else "random Llama h256 x4 layers, full, fp32"
    )
    print(
        f"train_throughput: {what}; {n_train} conversations (lognormal lengths, 24-{args.max_length} "
        f"tokens), batch {BATCH}, one epoch, on {args.device}"
    )
    runs = run_both(recipe_path, args.device)
    mem_key = "cuda_peak_mib" if args.device == "cuda" else "peak_rss_mib"
    mem_name = "CUDA peak MiB" if args.device == "cuda" else "peak RSS MiB (rise)"
    rate = "real tok/s" if args.device == "cuda" else "real tok/cpu-s"
    print(
        f"{'run':9s} {'batching':15s} {'steps':>5s} {rate:>14s} {'(wall)':>8s} {'padding':>8s} {mem_name:>20s} "
        f"{'train loss':>10s} {'held-out loss':>13s}"
    )
    for which, r in runs.items():
        mem = f"{r[mem_key]:.0f}" + (f" ({r['rss_rise_mib']:.0f})" if args.device == "cpu" else "")
        name = r["batching"].split(" (")[0]
        print(
            f"{which:9s} {name:15s} {r['steps']:5d} {r['tokens_per_s']:14.0f} {r['wall_tokens_per_s']:8.0f} "
            f"{r['padding']:8.1%} {mem:>20s} {r['train_loss']:10.4f} {r['heldout_loss']:13.4f}"
        )
    b, o = runs["baseline"], runs["ours"]
    speedup = o["tokens_per_s"] / b["tokens_per_s"]
    loss_diff = abs(o["heldout_loss"] - b["heldout_loss"]) / b["heldout_loss"]
    print(f"ours: {o['batching']}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    misses = []
    if speedup < SPEEDUP_TARGET:
        misses.append("speed")
    if o["padding"] > PADDING_TARGET:
        misses.append("padding")
    if loss_diff > LOSS_TOLERANCE:
        misses.append("loss")
    verdict = "PASS" if not misses else "FAIL (" + ", ".join(misses) + ")"
    print(
        f"train_throughput: {speedup:.2f}x real tokens/s (target {SPEEDUP_TARGET}x), padding "
        f"{b['padding']:.1%} -> {o['padding']:.1%} (target <= {PADDING_TARGET:.0%}), held-out loss "
        f"{b['heldout_loss']:.4f} vs {o['heldout_loss']:.4f} ({loss_diff:.1%}, tolerance {LOSS_TOLERANCE:.0%}), "
        f"{time.perf_counter() - t_start:.0f}s: {verdict}"
    )
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
