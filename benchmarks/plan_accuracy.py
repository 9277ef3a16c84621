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
import tempfile
import time
from pathlib import Path

TARGET = 0.20
REPO = Path(__file__).resolve().parent.parent

# (name, settings). Sizes are small enough for 2 CPU cores; each runs in a few seconds.
CPU_CONFIGS = [
    ("llama-h256-full", dict(arch="llama", hidden=256, layers=4, seq=256, batch=2, mode="full")),
    ("llama-h512-full-b4", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="full")),
    ("llama-h512-full-gc", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="full", gc=True)),
    (
        "llama-h512-full-eager",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="full", attn="eager"),
    ),
    ("llama-h512-lora", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="lora")),
    ("llama-h512-lora-gc", dict(arch="llama", hidden=512, layers=4, seq=512, batch=4, mode="lora", gc=True)),
    (
        "llama-h512-qlora-gc",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="qlora", gc=True),
    ),
    ("neox-h512-full", dict(arch="gpt_neox", hidden=512, layers=4, seq=512, batch=2, mode="full")),
    (
        "neox-h512-lora-gc",
        dict(arch="gpt_neox", hidden=512, layers=4, seq=512, batch=4, mode="lora", gc=True),
    ),
    ("neox-h512-qlora", dict(arch="gpt_neox", hidden=512, layers=4, seq=256, batch=2, mode="qlora")),
    ("bloom-h256-full", dict(arch="bloom", hidden=256, layers=4, seq=256, batch=2, mode="full")),
    ("bloom-h512-lora-gc", dict(arch="bloom", hidden=512, layers=4, seq=512, batch=2, mode="lora", gc=True)),
    # shapes the coefficients were not measured on (GQA, other head counts and lengths, no dropout)
    (
        "llama-h384-gqa-lora-nodrop",
        dict(
            arch="llama",
            hidden=384,
            heads=6,
            kv_heads=2,
            layers=3,
            seq=384,
            batch=3,
            mode="lora",
            dropout=0.0,
        ),
    ),
    (
        "neox-h768-full-gc",
        dict(arch="gpt_neox", hidden=768, heads=12, layers=3, seq=256, batch=4, mode="full", gc=True),
    ),
]

# Bigger sizes, only when a CUDA GPU is present (bf16 LoRA/QLoRA as the recipes run them; full in fp32).
GPU_CONFIGS = [
    (
        "llama-h512-lora-bf16",
        dict(arch="llama", hidden=512, layers=4, seq=512, batch=2, mode="lora", dtype="bf16"),
    ),
    (
        "llama-h1024-full-fp32",
        dict(arch="llama", hidden=1024, layers=8, seq=1024, batch=4, mode="full", dtype="fp32"),
    ),
    (
        "llama-h2048-lora-bf16-gc",
        dict(arch="llama", hidden=2048, layers=16, seq=2048, batch=4, mode="lora", dtype="bf16", gc=True),
    ),
    (
        "llama-h2048-qlora-bf16-gc",
        dict(arch="llama", hidden=2048, layers=16, seq=2048, batch=4, mode="qlora", dtype="bf16", gc=True),
    ),
    (
        "neox-h2048-lora-bf16",
        dict(arch="gpt_neox", hidden=2048, layers=8, seq=1024, batch=2, mode="lora", dtype="bf16"),
    ),
    (
        "neox-h2560-qlora-bf16-gc",
        dict(arch="gpt_neox", hidden=2560, layers=16, seq=2048, batch=2, mode="qlora", dtype="bf16", gc=True),
    ),
    (
        "bloom-h1024-lora-bf16-gc",
        dict(arch="bloom", hidden=1024, layers=8, seq=1024, batch=2, mode="lora", dtype="bf16", gc=True),
    ),
]

DEFAULTS = dict(
    heads=None,
    kv_heads=None,
    inter=None,
    vocab=8192,
    dtype="fp32",
    attn="sdpa",
    gc=False,
    r=16,
    dropout=0.05,
    device="cpu",
    steps=3,
)


def settings(spec: dict) -> dict:
    """The full settings of one configuration (defaults filled in)."""
    s = {**DEFAULTS, **spec}
    s["heads"] = s["heads"] or max(1, s["hidden"] // 64)
    s["kv_heads"] = s["kv_heads"] or s["heads"]
    if s["inter"] is None:
        s["inter"] = {"llama": s["hidden"] * 8 // 3 // 64 * 64}.get(s["arch"], 4 * s["hidden"])
    if s["arch"] == "bloom":
        s["attn"] = "eager"  # transformers has only eager attention for Bloom
    return s


def model_config(s: dict):
    """A transformers config of the asked architecture and size (untied embeddings except Bloom)."""
    from transformers import BloomConfig, GPTNeoXConfig, LlamaConfig

    if s["arch"] == "llama":
        return LlamaConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            vocab_size=s["vocab"],
            max_position_embeddings=max(2048, s["seq"]),
            tie_word_embeddings=False,
        )
    if s["arch"] == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            vocab_size=s["vocab"],
            rotary_pct=0.25,
            use_parallel_residual=True,
            max_position_embeddings=max(2048, s["seq"]),
            tie_word_embeddings=False,
        )
    if s["arch"] == "bloom":
        return BloomConfig(
            hidden_size=s["hidden"], n_layer=s["layers"], n_head=s["heads"], vocab_size=s["vocab"]
        )
    raise ValueError(f"unknown arch {s['arch']}")


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


# ---- the measured side (runs inside the per-configuration subprocess) ----


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _static_bytes(model, optimizer) -> int:
    """Bytes the model and optimizer hold between steps: parameters, buffers, 4-bit state, optimizer state."""
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            add(qs.absmax)
            add(qs.code)
            add(getattr(qs, "offset", None))
            qs = getattr(qs, "state2", None)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return sum(seen.values())


def _build(s: dict, tmp: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.utils import add_fused_lm_head

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s["dtype"]]
    cfg = model_config(s)
    attn = s["attn"] if s["arch"] != "bloom" else "eager"
    torch.manual_seed(0)
    if s["mode"] == "qlora":
        AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=quant,
            dtype=dtype,
            attn_implementation=attn,
            device_map={"": s["device"]} if s["device"] != "cpu" else None,
        )
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).to(s["device"])
    model.config.use_cache = False
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if s["mode"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if s["mode"] == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gc"])
        lcfg = LoraConfig(
            r=s["r"],
            lora_alpha=2 * s["r"],
            lora_dropout=s["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    if s["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return model, optimizer


def _step(model, optimizer, batch, autocast=None):
    """One optimizer step; the forward runs under autocast in half precision, as the HF Trainer runs it."""
    import contextlib

    import torch

    device = batch["input_ids"].device.type
    ctx = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(**batch, fused_lm_head=True)
    loss = out.loss
    with torch.no_grad():  # the metrics TRL's SFTTrainer logs from the same outputs
        _ = (out.entropy.sum().item(), out.is_top1.sum().item(), out.label_mask.sum().item())
    del out
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(s: dict) -> dict:
    """Peak bytes of a steady-state training step for settings ``s`` (run in a fresh process)."""
    import peft  # noqa: F401  (imported before the RSS baseline, so module memory does not count)
    import torch
    import transformers  # noqa: F401
    import trl.trainer.utils  # noqa: F401

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cuda = s["device"] == "cuda"
    base_rss = _rss()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model, optimizer = _build(s, tmp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g)
    labels = ids.clone()
    labels[:, : s["seq"] // 4] = -100  # prompt tokens carry no loss, as in SFT
    batch = {
        "input_ids": ids.to(s["device"]),
        "attention_mask": torch.ones_like(ids).to(s["device"]),
        "labels": labels.to(s["device"]),
    }
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s["dtype"])
    _step(model, optimizer, batch, half)  # the first step creates the optimizer state
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(s["steps"] - 1):
            _step(model, optimizer, batch, half)
        torch.cuda.synchronize()
        return {
            "static": static,
            "peak": torch.cuda.max_memory_allocated(),
            "rss_peak": None,
            "seconds": time.perf_counter() - t0,
        }
    from torch.profiler import ProfilerActivity, profile

    static = _static_bytes(model, optimizer)
    reset_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(s["steps"] - 1):
            _step(model, optimizer, batch, half)
    seconds = time.perf_counter() - t0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    rss_peak = _rss()[1] - base_rss if reset_ok else None
    return {"static": static, "peak": static + peak, "rss_peak": rss_peak, "seconds": seconds}


def layer_bytes(s: dict) -> dict:
    """Activation bytes of one forward/backward on settings ``s``: live after the forward, and the backward peak.

    Used by ``--coefficients``: running it with 1 and 2 layers gives the bytes one layer keeps per token
    (what ``oasst_peft.plan`` writes down per architecture), and what the LM head keeps and needs.
    """
    import contextlib

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model, optimizer = _build(s, tmp)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.to(s["device"]) for k, v in batch.items()}
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s["dtype"])
    _step(model, optimizer, batch, half)
    ctx = torch.autocast(s["device"], dtype=half) if half is not None else contextlib.nullcontext()
    if s["device"] == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with ctx:
            out = model(**batch, fused_lm_head=True)
        loss = out.loss
        del out
        fwd_end = torch.cuda.memory_allocated() - start
        fwd_peak = torch.cuda.max_memory_allocated() - start
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        bwd_peak = torch.cuda.max_memory_allocated() - start
        return {"fwd_end": fwd_end, "fwd_peak": fwd_peak, "bwd_peak": bwd_peak}
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("forward"):
            with ctx:
                out = model(**batch, fused_lm_head=True)
            loss = out.loss
            del out
        with record_function("backward"):
            loss.backward()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    live = peak = 0
    marks = {}
    for e in events:
        if e.name() == "backward" and "backward" not in marks:
            marks["fwd_end"], marks["fwd_peak"] = live, peak
            peak = live
        if e.name() == "[memory]":
            live += e.nbytes()
            peak = max(peak, live)
    return {"fwd_end": marks["fwd_end"], "fwd_peak": marks["fwd_peak"], "bwd_peak": peak}


def coefficients(device: str, dtypes: tuple[str, ...]) -> list[dict]:
    """Per-layer activation bytes per token for each architecture, mode and dtype (1- vs 2-layer difference)."""
    rows = []
    h, seq, batch = 512, 512, 2
    for arch in ("llama", "gpt_neox", "bloom"):
        for dtype in dtypes:
            for mode, attn in (("full", "sdpa"), ("full", "eager"), ("lora", "sdpa"), ("qlora", "sdpa")):
                if arch == "bloom" and attn == "sdpa" and mode == "full":
                    continue
                for inter in (2 * h, 4 * h):
                    base = dict(
                        arch=arch,
                        hidden=h,
                        inter=inter,
                        seq=seq,
                        batch=batch,
                        mode=mode,
                        dtype=dtype,
                        attn=attn,
                        device=device,
                        dropout=0.05 if mode != "full" else 0.0,
                    )
                    one = layer_bytes(settings({**base, "layers": 1}))
                    two = layer_bytes(settings({**base, "layers": 2}))
                    tokens = seq * batch
                    layer = two["fwd_end"] - one["fwd_end"]
                    row = {
                        **base,
                        "layer_per_token": layer / tokens,
                        "head_saved": one["fwd_end"] - layer,
                        "head_fwd_transient": two["fwd_peak"] - two["fwd_end"],
                        "bwd_transient": two["bwd_peak"] - two["fwd_end"],
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


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
