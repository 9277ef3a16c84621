"""What ``benchmarks/train_throughput.py`` measures inside a run: tokens per batch, time, memory, FLOPs, held-out loss.

``instrument(trainer, record)`` wraps the trainer's collator (``Counting``) and adds a callback that
times the training; ``flops_per_token`` and ``matmul_gflops`` give the compute limit the rows are set
against; ``heldout_loss`` is the loss the runs are compared on.
"""

from __future__ import annotations

import time


class Counting:
    """Wraps the trainer's collator: real tokens (the examples' own), batch tokens and loss tokens per batch."""

    def __init__(self, inner):
        self.inner = inner
        self.real = 0
        self.total = 0
        self.loss_tokens: list[int] = []
        self.lengths: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real += sum(len(e["input_ids"]) for e in examples)
        self.lengths += [len(e["input_ids"]) for e in examples]
        self.total += batch["input_ids"].numel()
        self.loss_tokens.append(int((batch["labels"][..., 1:] != -100).sum()))
        return batch


def instrument(trainer, record: dict):
    """Count the batches' tokens and time the training into ``record`` (its ``_``-keys are for the caller)."""
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


def flops_per_token(model, lengths: list[int]) -> float:
    """Training FLOPs per real token: 6 x the matmul parameters (all but the input embedding) plus causal
    attention over each conversation's own tokens (QK^T and AV, forward and backward: 6 x layers x hidden x
    length per token on average). Padding is not counted: this is the work the data needs."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - emb
    per_layer_attn = 6 * cfg.num_hidden_layers * cfg.hidden_size
    total = sum(n * 6 * params + per_layer_attn * n * n for n in lengths)
    return total / max(1, sum(lengths))


def matmul_gflops(device: str) -> dict:
    """fp32 matmul throughput of one thread (CPU: pinned to one core, per CPU-second) or of the GPU."""
    import torch

    shapes = {"square 1024": (1024, 1024, 1024), "model 800x256x688": (800, 256, 688)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        c = torch.empty(m, n, device=device)
        for _ in range(3):
            torch.mm(a, b, out=c)
        reps = max(3, int(2e9 / (2 * m * k * n)))
        if device == "cuda":
            torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t if device == "cuda" else time.process_time() - cpu
        out[name] = 2 * m * k * n * reps / dt / 1e9
    return out


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
