"""Planner accuracy: predicted vs measured peak memory of real training steps on tiny and small models.

Run: ``PYTHONPATH=. python benchmarks/plan_accuracy.py`` (about 3 minutes on 2 CPU cores; on a CUDA machine it
also runs bigger sizes on the GPU). Each configuration runs in its own subprocess: it builds a random model
of the given architecture, puts it in the mode's shape (full with AdamW; LoRA via peft; QLoRA via
bitsandbytes 4-bit + peft), patches in TRL's chunked LM head the way ``SFTTrainer`` does, and runs three
training steps (fused AdamW, gradients set to None after each step, as the HF Trainer does).

What is measured:
- on CPU, every allocation and free of the torch CPU allocator (``torch.profiler`` with
  ``profile_memory=True``) during the steady-state steps, added to the bytes the model and optimizer hold
  when the step starts (parameters, buffers, 4-bit quantization state, optimizer state); the peak RSS rise
  over a baseline taken before the model is built is printed beside it as a cross-check;
- on CUDA, ``torch.cuda.max_memory_allocated``.

It is compared with ``oasst_peft.plan``'s total without the ``overhead`` term (CUDA context and allocator
slack, which neither measurement sees; on CUDA the cuBLAS workspaces, which ``max_memory_allocated`` does
see, are added back). The last line is the summary; the exit code is 1 when any configuration misses by
more than 20 percent.

Other uses: ``--measure-only --json FILE`` measures without comparing (e.g. on a machine with a GPU) and
``--compare FILE`` compares such a file with the planner here; ``--coefficients`` prints the per-layer
activation bytes per token that ``oasst_peft.plan.LAYER_COEFFS`` writes down, for re-measuring them after a
library upgrade.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.20
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.plan_configs import CPU_CONFIGS, GPU_CONFIGS, model_config, settings  # noqa: E402
from benchmarks.plan_measure import coefficients, measure  # noqa: E402


def predict(s: dict, gpus: int = 1) -> dict:
    """The planner's estimate for the same settings (overhead term excluded from the compared total)."""
    from oasst_peft import memory, model_info

    shape = model_info.model_shape(model_config(s), name=s["arch"])
    setup = memory.Setup(
        mode=s["mode"],
        dtype=s["dtype"],
        micro_batch=s["batch"],
        seq_len=s["seq"],
        gradient_checkpointing=s["gc"],
        attention=s["attn"],
        zero_stage=0,
        offload_optimizer=False,
        offload_params=False,
        gpus=gpus,
        lora_r=s["r"],
        lora_targets="all-linear",
        lora_dropout=s["dropout"],
        new_tokens=0,
        device=s["device"],
    )
    terms = memory.memory_terms(shape, setup)
    compared = sum(v for k, v in terms.items() if k != "overhead")
    if s["device"] == "cuda":  # the one part of the overhead term that max_memory_allocated sees
        compared += memory.CUDA_WORKSPACE_BYTES
    return {"terms": terms, "compared": compared}


# ---- the driver ----


def compare_row(name: str, s: dict, got: dict) -> dict:
    """Print one table line (predicted, measured, ratio) and return it with its relative error."""
    if "error" in got:
        print(f"{name:28s} ERROR {got['error']}")
        return {"config": name, "error": float("inf"), "message": got["error"]}
    pred = predict(s)["compared"]
    ratio = pred / got["peak"]
    rss = f"{got['rss_peak'] / 2**20:8.1f}" if got.get("rss_peak") else f"{'-':>8s}"
    print(
        f"{name:28s} {s['mode']:6s} {s['dtype']:5s} {pred / 2**20:13.1f} {got['peak'] / 2**20:13.1f}"
        f" {ratio:6.2f} {rss}",
        flush=True,
    )
    return {
        "config": name,
        "settings": s,
        "predicted": pred,
        "measured": got["peak"],
        "ratio": ratio,
        "error": abs(ratio - 1),
        "rss_peak": got.get("rss_peak"),
    }


def run_one(name: str, spec: dict, timeout: int = 300) -> dict:
    """Measure one configuration in a subprocess (so baselines and allocator state start clean)."""
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    cmd = [sys.executable, "-W", "ignore", __file__, "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument(
        "--only", help="run only configurations whose name contains one of these (comma-separated)"
    )
    ap.add_argument("--json", help="also write the table to this JSON file")
    ap.add_argument("--measure-only", action="store_true", help="measure, print JSON lines, compare nothing")
    ap.add_argument("--coefficients", action="store_true", help="print per-layer activation bytes per token")
    ap.add_argument(
        "--compare", help="compare a --measure-only JSON file with the planner instead of measuring"
    )
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(settings(json.loads(args.one)))))
        return 0

    import torch

    if args.coefficients:
        cuda = torch.cuda.is_available()
        rows = coefficients("cuda" if cuda else "cpu", ("bf16",) if cuda else ("fp32", "bf16"))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0

    configs = [(n, {**c}) for n, c in CPU_CONFIGS]
    measured: dict[str, dict] = {}
    if args.compare:
        saved = [json.loads(ln) for ln in Path(args.compare).read_text().splitlines() if ln.startswith("{")]
        if not saved:
            saved = json.loads(Path(args.compare).read_text())
        measured = {r["config"]: r for r in saved}
        configs = [(r["config"], r["settings"]) for r in saved]
    elif torch.cuda.is_available():
        configs = [(n, {**c, "device": "cuda"}) for n, c in CPU_CONFIGS]
        configs += [(n, {**c, "device": "cuda"}) for n, c in GPU_CONFIGS]
    if args.only:
        wanted = args.only.split(",")
        configs = [(n, c) for n, c in configs if any(w in n for w in wanted)]
    cuda = torch.cuda.is_available() or any(c.get("device") == "cuda" for _, c in configs)
    where = "cuda (max_memory_allocated)" if cuda else "cpu (torch allocator via profiler)"
    print(
        f"planner accuracy on {where}; compared: weights+trainable+gradients+optimizer+activations "
        "(+not_live_together); overhead (CUDA context, allocator slack) excluded"
    )
    print(
        f"{'config':28s} {'mode':6s} {'dtype':5s} {'predicted MiB':>13s} {'measured MiB':>13s} {'ratio':>6s}"
        f" {'rss MiB':>8s}"
    )
    rows, worst = [], 0.0
    t0 = time.perf_counter()
    for name, spec in configs:
        s = settings(spec)
        got = measured[name] if name in measured else run_one(name, spec)
        if args.measure_only:
            print(json.dumps({"config": name, "settings": s, **got}), flush=True)
            rows.append({"config": name, "settings": s, **got})
            continue
        row = compare_row(name, s, got)
        worst = max(worst, row["error"])
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.measure_only:
        return 0
    ok = worst <= TARGET
    print(
        f"plan_accuracy: {len(rows)} configs, worst error {worst * 100:.1f}% (target {TARGET * 100:.0f}%), "
        f"{time.perf_counter() - t0:.0f}s: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
