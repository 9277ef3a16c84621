"""The measured side of ``benchmarks/plan_accuracy.py``: a real training step's peak memory, in its own process.

``measure(s)`` builds the model in the mode's shape, runs the steps and returns the peak bytes (the torch
CPU allocator's, through ``torch.profiler``, plus what the model and optimizer hold; on CUDA
``max_memory_allocated``). ``coefficients`` measures the per-layer activation bytes per token that
``oasst_peft.plan`` writes down.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.plan_configs import model_config, settings


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
