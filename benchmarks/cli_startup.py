"""Benchmark: the CLI answers instantly, ``oasst-peft --help``, a typo'd recipe and a wrong path vs importing TRL.

Runs these commands as fresh processes, side by side, each ``--repeat`` times (median wall time):

  (a) ``python -m oasst_peft.cli --help``
  (b) ``python -m oasst_peft.cli train TYPO.yaml`` where the recipe misspells ``learning_rate``
      (must exit 1 with one ``error:`` line)
  (c) ``sample``, ``chat``, ``merge`` and ``export`` given a run folder that does not exist (each must
      exit 1 with one ``error:`` line)
  (d) the baseline, ``python -c "from trl import SFTTrainer"``: what any command that imports torch,
      transformers and TRL pays before it can say anything.

Target: (a), (b) and each of (c) take < 0.1x of (d). Prints the figures and one summary line; exits 1 on
a miss.

    PYTHONPATH=. python benchmarks/cli_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.1


def timed(argv: list[str], env: dict, repeat: int, expect: int) -> float:
    """Median wall seconds of ``argv`` as a fresh process; fails loudly if it exits other than ``expect``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if res.returncode != expect:
            sys.exit(f"{' '.join(argv)} exited {res.returncode}, expected {expect}: {res.stderr[-400:]}")
        if expect == 1 and len(res.stderr.strip().splitlines()) != 1:
            sys.exit(f"{' '.join(argv)} printed more than one line on stderr: {res.stderr[-400:]}")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        typo = Path(tmp) / "typo.yaml"
        typo.write_text("model_name: some/model\ndatasets: [dolly15k]\nlearning_rat: 1.0e-5\n")
        # One untimed run of each first, so that every timed run starts from a warm page cache.
        for argv in ([py, "-c", "from trl import SFTTrainer"], [py, "-m", "oasst_peft.cli"]):
            subprocess.run(argv, env=env, capture_output=True)
        baseline = timed([py, "-c", "from trl import SFTTrainer"], env, args.repeat, 0)
        rows = {
            "oasst-peft --help": timed([py, "-m", "oasst_peft.cli", "--help"], env, args.repeat, 0),
            "train typo.yaml": timed([py, "-m", "oasst_peft.cli", "train", str(typo)], env, args.repeat, 1),
        }
        missing = str(Path(tmp) / "runs" / "no-such-run")
        for argv in (
            ["sample", missing],
            ["chat", missing],
            ["merge", missing, "--out", str(Path(tmp) / "merged")],
            ["export", missing, "--gguf", str(Path(tmp) / "m.gguf")],
        ):
            rows[f"{argv[0]} no-such-run"] = timed([py, "-m", "oasst_peft.cli", *argv], env, args.repeat, 1)
    ok = True
    print(f"baseline  python -c 'from trl import SFTTrainer': {baseline:.3f} s")
    for name, seconds in rows.items():
        ratio = seconds / baseline
        ok &= ratio < TARGET
        print(f"{name:20s} {seconds:.3f} s  ratio {ratio:.3f}  (target < {TARGET})")
    print(f"cli startup: {'PASS' if ok else 'FAIL'} (median of {args.repeat})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
