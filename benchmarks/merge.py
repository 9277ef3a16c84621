"""Benchmark: merging a rank-64 all-linear LoRA into a ~1B Llama, peft's merge_and_unload vs ``oasst-peft merge``.

Builds a random Llama-architecture model of about 1.1B parameters stored as bf16 safetensors shards
and a random rank-64 adapter on every linear layer, then merges it in separate processes:

  (a) peft: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``
  (b) oasst-peft: ``python -m oasst_peft.cli merge ADAPTER --out DIR --no-verify`` (streaming, shard by shard)

and a plain copy of the checkpoint's files, synced (the disk's limit), right before and right after the
oasst-peft run (their mean is the baseline: both on the same load). Each process's wall time, CPU
time and peak RSS are measured (``os.wait4``); the base files are read once before each run so all
start from a warm page cache. The two merged checkpoints are compared tensor by tensor. Targets:
wall time <= 1.5x the copy's and peak RSS <= 0.2x peft's. Prints its figures (with the machine's
load average, since the wall times are shared-CPU wall times), then one summary line; exits 1 on a miss.

    PYTHONPATH=. python benchmarks/merge.py [--workdir DIR] [--keep] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # merge_tools, when run without PYTHONPATH=.
RSS_TARGET = 0.2  # x peft's peak RSS
TIME_TARGET = 1.5  # x the plain copy's wall time


def build_model(folder: Path, layers: int, shard_bytes: int = 10**9) -> int:
    """A random bf16 Llama (hidden 2048, intermediate 8192, vocab 32000) written shard by shard; returns params."""
    import torch
    from transformers import LlamaConfig

    from merge_tools.io import shard_names, write_index
    from merge_tools.names import meta_model
    from merge_tools.writer import SafetensorsWriter

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    meta = meta_model(json.loads((folder / "config.json").read_text()))
    params = [(n, tuple(p.shape)) for n, p in meta.state_dict().items()]
    groups, size = [[]], 0
    for name, shape in params:
        n = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for fname, group in zip(shard_names(len(groups)), groups, strict=True):
        w = SafetensorsWriter(folder / fname, [(n, torch.bfloat16, s) for n, s in group])
        for name, shape in group:
            if "norm" in name:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            w.write(t)
            weight_map[name] = fname
        w.close()
        total += w.total
    write_index(folder, weight_map, total)
    return sum(int(torch.Size(s).numel()) for _, s in params)


def build_adapter(folder: Path, base: Path, r: int = 64) -> int:
    """A random rank-``r`` LoRA on every linear layer but lm_head, in peft's saved format; returns params."""
    import torch
    from peft import LoraConfig

    from merge_tools.names import meta_model
    from merge_tools.writer import SafetensorsWriter

    meta = meta_model(json.loads((base / "config.json").read_text()))
    linears = [(n, m) for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    cfg.base_model_name_or_path = str(base)
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    plan, tensors = [], []
    for name, m in linears:
        a = torch.randn(r, m.in_features, generator=g) * 0.01
        b = torch.randn(m.out_features, r, generator=g) * 0.01
        for key, t in (
            (f"base_model.model.{name}.lora_A.weight", a),
            (f"base_model.model.{name}.lora_B.weight", b),
        ):
            plan.append((key, t.dtype, tuple(t.shape)))
            tensors.append(t)
    w = SafetensorsWriter(folder / "adapter_model.safetensors", plan)
    for t in tensors:
        w.write(t)
    w.close()
    return sum(t.numel() for t in tensors)


def peft_merge(base: str, adapter: str, out: str) -> None:
    """Worker (a): the usual peft recipe."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)


def timed_child(cmd: list[str], env: dict) -> tuple[float, int, float, str]:
    """Run ``cmd`` under a tiny wrapper that reports the child's own rusage (wait4 on its pid)."""
    wrapper = (
        "import os, subprocess, sys, tempfile, time, json\n"
        "t = time.perf_counter()\n"
        "log = tempfile.TemporaryFile()\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=log, stderr=subprocess.PIPE)\n"
        "err = p.stderr.read()\n"
        "_, status, ru = os.wait4(p.pid, 0)\n"
        "code = os.waitstatus_to_exitcode(status)\n"
        "log.seek(0); out = log.read()\n"
        "if code:\n"
        "    sys.stderr.write(err.decode()[-3000:]); sys.exit(code)\n"
        "print(json.dumps({'wall': time.perf_counter() - t, 'rss': ru.ru_maxrss * 1024,"
        " 'cpu': ru.ru_utime + ru.ru_stime, 'stdout': out.decode(errors='replace')[-2000:]}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return got["wall"], got["rss"], got["cpu"], got["stdout"]


def warm(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def compare(a: Path, b: Path) -> tuple[float, int]:
    """Max |difference| between two merged checkpoints (bf16 values) and the tensor count."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.is_file():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        f = folder / "model.safetensors"
        with safe_open(f, "pt") as h:
            return {k: f for k in list(h.keys())}

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        raise SystemExit(f"merged checkpoints hold different tensors: {sorted(ia.keys() ^ ib.keys())[:5]}")
    worst = 0.0
    for k in ia:
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            ta, tb = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        worst = max(worst, float((ta - tb).abs().max()))
        del ta, tb
    return worst, len(ia)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the model is built (default: a temp dir)"
    )
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 gives ~1.1B parameters)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--worker", choices=["peft"], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "peft":
        peft_merge(*a.args)
        return 0

    work = a.workdir or Path(tempfile.mkdtemp(prefix="oasst-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = int(2.3e9 * a.layers / 16 * 4 + 0.5e9)
    print(f"work dir: {work} ({free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed)")
    if free < need:
        print(f"SUMMARY merge: not run: {free / 1e9:.1f} GB free on {work}, {need / 1e9:.1f} GB needed")
        return 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    base, adapter = work / "base", work / "adapter"
    try:
        t = time.perf_counter()
        if not base.exists():
            n = build_model(base, a.layers)
            r = build_adapter(adapter, base)
        else:  # reuse a model built by an earlier --workdir run
            from merge_tools.io import SafetensorsFile, numel

            n = sum(
                numel(t.shape)
                for f in base.glob("*.safetensors")
                for t in SafetensorsFile(f).tensors.values()
            )
            r = sum(
                numel(t.shape)
                for t in SafetensorsFile(adapter / "adapter_model.safetensors").tensors.values()
            )
        size = sum(f.stat().st_size for f in base.iterdir())
        print(
            f"model: Llama, {a.layers} layers, {n / 1e9:.2f}B params, bf16, {size / 1e9:.2f} GB in "
            f"{len(list(base.glob('*.safetensors')))} shards; adapter: rank 64 on all linear layers, "
            f"{r / 1e6:.1f}M params fp32 (built in {time.perf_counter() - t:.0f} s)"
        )

        def plain_copy() -> float:
            warm(base)
            os.sync()
            t, c = time.perf_counter(), os.times()
            copy = work / "copy"
            shutil.copytree(base, copy)
            os.sync()
            seconds = time.perf_counter() - t
            c2 = os.times()
            shutil.rmtree(copy)
            print(
                f"plain copy of the checkpoint: {seconds:.1f} s wall, {c2.user - c.user + c2.system - c.system:.1f} s "
                f"CPU ({size / 1e9 / seconds:.2f} GB/s, synced; load average {os.getloadavg()[0]:.1f})"
            )
            return seconds

        results = {}
        runs = {
            "peft": [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "peft",
                str(base),
                str(adapter),
                str(work / "out-peft"),
            ],
            "oasst-peft": [
                sys.executable,
                "-m",
                "oasst_peft.cli",
                "merge",
                str(adapter),
                "--out",
                str(work / "out-oasst"),
                "--no-verify",
            ],
        }
        copies, merge_s = [], None
        for name, cmd in runs.items():
            if name == "oasst-peft":  # the disk's limit measured right before and after, on the same load
                copies.append(plain_copy())
            warm(base)
            os.sync()  # the other run's dirty pages are not this one's to flush
            load = os.getloadavg()[0]
            wall, rss, cpu, stdout = timed_child(cmd, env)
            results[name] = (wall, rss)
            print(
                f"{name:>10}: wall {wall:6.1f} s   CPU {cpu:6.1f} s   peak RSS {rss / 2**30:5.2f} GiB   "
                f"(load average {load:.1f} on {os.cpu_count()} cores)"
            )
            inside = re.search(r"done in ([0-9.]+) s", stdout)
            if name == "oasst-peft" and inside:
                merge_s = float(inside.group(1))
            if inside:  # where the process's time went: starting Python and importing torch, or merging
                print(
                    f"{'':>10}  of which merge() itself {float(inside.group(1)):.1f} s; the rest is starting "
                    f"Python, importing torch and the CLI, and exiting"
                )
        copies.append(plain_copy())
        copy_s = sum(copies) / len(copies)
        diff, count = compare(work / "out-peft", work / "out-oasst")
        print(f"merged checkpoints: {count} tensors, max |peft - oasst-peft| = {diff:.3g} (bf16 values)")
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    (pw, pr), (ow, orss) = results["peft"], results["oasst-peft"]
    rss_ratio, time_ratio = orss / pr, ow / copy_s
    ok = rss_ratio <= RSS_TARGET and time_ratio <= TIME_TARGET and diff < 0.05
    print(
        f"SUMMARY merge {n / 1e9:.2f}B rank-64: oasst-peft {ow:.1f} s / {orss / 2**30:.2f} GiB, copy {copy_s:.1f} s, "
        f"peft {pw:.1f} s / {pr / 2**30:.2f} GiB: time {time_ratio:.2f}x the copy (target <= {TIME_TARGET}"
        + (f"; merge() itself {merge_s / copy_s:.2f}x" if merge_s else "")
        + f"), RSS {rss_ratio:.2f}x peft's (target <= {RSS_TARGET}), time {ow / pw:.2f}x peft's "
        f"-> {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
