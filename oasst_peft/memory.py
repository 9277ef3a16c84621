"""Per-GPU training memory, one formula per term, in bytes.

Every term is a small function of explicit numbers with its formula in its docstring; ``memory_terms``
adds them up for one ``Setup`` (how the model is trained) of one ``ModelShape`` (``model_info``). The
model-state terms (weights, adapters, gradients, optimizer, overhead) are in ``memory_states``; the
activation terms are here. The planner's table and the recipe's own setup are in ``plan``.

The activation coefficients were measured (``benchmarks/plan_accuracy.py --coefficients``) on
transformers 5.23, peft 0.21, TRL 1.16 and torch 2.11-2.13: fp32 on CPU, bf16 under autocast on an H100.
``benchmarks/plan_accuracy.py`` compares the whole estimate with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from oasst_peft.errors import OasstError
from oasst_peft.memory_states import (  # noqa: F401  (re-exported: they were defined here)
    ADAM_STATE_BYTES,
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    CUDA_WORKSPACE_BYTES,
    GIB,
    LORA_BYTES,
    MASTER_BYTES,
    NF4_BLOCK,
    NF4_BYTES,
    NF4_DOUBLE_QUANT_BLOCK,
    adapter_bytes,
    gradient_bytes,
    nf4_bytes_per_param,
    optimizer_bytes,
    overhead_bytes,
    weight_bytes,
    zero3_live_params,
)
from oasst_peft.model_info import EAGER_ONLY, Linear, ModelShape

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# TRL's SFTTrainer computes the loss with a chunked LM head (trl.kernels.chunked_logprob): it never builds the
# (tokens x vocab) logits, but uses a (min(tokens, 4096) x 32768) scratch tile in the compute dtype.
HEAD_TOKEN_CHUNK = 4096
HEAD_VOCAB_CHUNK = 32768
# Without Triton (CPU) the tile is folded with torch ops: about this many fp32 (tokens x vocab-chunk) temporaries
# live at once in the forward and in the backward (measured).
HEAD_CPU_TEMPS_FWD = 3.3
HEAD_CPU_TEMPS_BWD = 7.25


# Activation bytes one decoder layer keeps for the backward, per token: c_h * hidden + c_i * intermediate.
# Keyed by (family, precision, mode); "half" is bf16/fp16 under autocast on CUDA (as the HF Trainer runs it),
# "fp32" is full precision. LoRA/QLoRA rows are for lora_dropout > 0 (the recipes' 0.05); attention scores
# (eager), the LoRA rank terms and the dropout corrections are added by ``layer_activation_bytes``. What the
# numbers hold, e.g. llama fp32 full = 10 h + 4 i floats: the layer input, two RMSNorm results per norm, q and k
# after RoPE, v, the attention output, the mid residual; gate, SiLU(gate), up and their product.
LAYER_COEFFS: dict[tuple[str, str, str], tuple[float, float]] = {
    ("llama", "fp32", "full"): (40, 16),
    ("llama", "fp32", "lora"): (72, 20),
    ("llama", "fp32", "qlora"): (72, 20),
    ("llama", "half", "full"): (24, 8),
    ("llama", "half", "lora"): (34, 9),
    ("llama", "half", "qlora"): (34, 15),
    ("gpt_neox", "fp32", "full"): (40, 8),
    ("gpt_neox", "fp32", "lora"): (52, 12),
    ("gpt_neox", "fp32", "qlora"): (52, 12),
    ("gpt_neox", "half", "full"): (26, 4),
    ("gpt_neox", "half", "lora"): (34, 5),
    ("gpt_neox", "half", "qlora"): (25.5, 6),
    ("bloom", "fp32", "full"): (32, 8),
    ("bloom", "fp32", "lora"): (44, 12),
    ("bloom", "fp32", "qlora"): (44, 12),
    ("bloom", "half", "full"): (20, 4),
    ("bloom", "half", "lora"): (25.5, 5),
    ("bloom", "half", "qlora"): (28.5, 6),
}
# Eager attention (and GPT-NeoX's, whose sdpa path copies q, k and v): fewer per-layer bytes than with sdpa,
# before the attention scores are added.
EAGER_COEFF_H = {("gpt_neox", "fp32"): 28, ("gpt_neox", "half"): 16}
# fp32 LoRA without dropout: the adapter reads the layer's own tensors instead of dropped-out copies.
LORA_NO_DROPOUT_COEFFS = {"llama": (32, 16), "gpt_neox": (40, 8), "bloom": (32, 8)}


# ---------------------------------------------------------------------------------------------------------
# One training setup
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """How the model is trained, per GPU."""

    mode: str = "full"  # full | lora | qlora
    dtype: str = "bf16"  # fp32 | bf16 | fp16: weights and autocast dtype
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | flash | eager
    zero_stage: int = 0  # 0 = no DeepSpeed partitioning
    offload_optimizer: bool = False
    offload_params: bool = False
    gpus: int = 1
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    double_quant: bool = True
    new_tokens: int = 16  # embedding rows of added tokens, trained in LoRA/QLoRA too
    grad_accum: int = 1
    reduce_bucket: int | None = None  # DeepSpeed reduce_bucket_size in elements (None: "auto" = hidden^2)
    overlap_comm: bool = False
    device: str = "cuda"  # cuda | cpu (the accuracy check)


def _targets(shape: ModelShape, targets) -> list[Linear]:
    if targets == "all-linear":
        return list(shape.linears)
    names = [targets] if isinstance(targets, str) else list(targets)
    return [lin for lin in shape.linears if lin.name in names]


def lora_params(linears: list[Linear], r: int) -> int:
    """LoRA adapter parameters: r * (in + out) per targeted linear (A is r x in, B is out x r)."""
    return sum(r * (lin.in_features + lin.out_features) * lin.count for lin in linears)


def trainable_params(shape: ModelShape, setup: Setup) -> int:
    """Parameters the optimizer updates: all of them (full), else the adapters plus the added-token rows."""
    if setup.mode == "full":
        return shape.params
    token_rows = setup.new_tokens * shape.hidden * (1 if shape.tied else 2)
    return lora_params(_targets(shape, setup.lora_targets), setup.lora_r) + token_rows


# ---------------------------------------------------------------------------------------------------------
# The terms, in bytes per GPU
# ---------------------------------------------------------------------------------------------------------


def _precision(setup: Setup) -> str:
    return "fp32" if setup.dtype == "fp32" else "half"


def _attention(shape: ModelShape, setup: Setup) -> str:
    return "eager" if shape.model_type in EAGER_ONLY or shape.family in EAGER_ONLY else setup.attention


def lora_input_elements(shape: ModelShape, setup: Setup) -> int:
    """Sum of in_features over the targeted linears of one layer (what LoRA dropout copies, per token)."""
    if setup.mode == "full":
        return 0
    per_model = sum(lin.in_features * lin.count for lin in _targets(shape, setup.lora_targets))
    return per_model // max(1, shape.layers)


def layer_activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes one decoder layer keeps for the backward, for one micro-batch of ``micro_batch * seq_len`` tokens.

    tokens * (c_h * hidden + c_i * intermediate)  [LAYER_COEFFS, per family, precision and mode]
    + tokens * n_adapters * r * a                 [LoRA A outputs, a = 4 in fp32, 2 under autocast]
    - tokens * lora_inputs * m                    [no LoRA dropout: no dropout masks, m = 1 (CUDA mask);
                                                   fp32 rows use LORA_NO_DROPOUT_COEFFS instead]
    - tokens * lora_inputs * 3                    [fp32 on CUDA: bool dropout masks, CPU keeps fp32 noise]
    + micro_batch * heads * seq_len^2 * (4 + a)   [eager attention: fp32 softmax + its copy in the dtype]
    """
    tokens = setup.micro_batch * setup.seq_len
    prec = _precision(setup)
    attn = _attention(shape, setup)
    fam = shape.family
    c_h, c_i = LAYER_COEFFS[(fam, prec, setup.mode)]
    lora_in = lora_input_elements(shape, setup)
    if setup.mode != "full" and setup.lora_dropout == 0:
        if prec == "fp32":
            c_h, c_i = LORA_NO_DROPOUT_COEFFS[fam]
        else:
            c_h -= lora_in / shape.hidden
    elif setup.mode != "full" and prec == "fp32" and setup.device == "cuda":
        c_h -= 3 * lora_in / shape.hidden
    if attn == "eager" and (fam, prec) in EAGER_COEFF_H:
        c_h = EAGER_COEFF_H[(fam, prec)] + (c_h - LAYER_COEFFS[(fam, prec, "full")][0])
    per_token = c_h * shape.hidden + c_i * shape.intermediate
    if setup.mode != "full":
        n_adapters = sum(lin.count for lin in _targets(shape, setup.lora_targets)) / max(1, shape.layers)
        per_token += n_adapters * setup.lora_r * (4 if prec == "fp32" else 2)
    total = tokens * per_token
    if attn == "eager":
        total += setup.micro_batch * shape.heads * setup.seq_len**2 * (4 + (2 if prec == "half" else 0))
    return total


def head_bytes(shape: ModelShape, setup: Setup) -> tuple[float, float]:
    """(kept, transient) bytes of the final norm and TRL's chunked LM head + loss.

    kept: 2 * tokens * hidden * r  (final norm output and the head's input copy; r = residual-stream bytes)
    transient, the larger of forward and backward:
      rows * 32768 * c                          [scratch tile, rows = min(tokens, 4096), c = compute bytes]
      + tokens * hidden * 4                     [backward: fp32 gradient of the head input]
      + vocab * hidden * (4 + a)                [full: fp32 accumulator of the LM head gradient + its cast]
      + vocab * hidden * 2                      [qlora in half: the fp32 LM head cast to the compute dtype]
      + rows * min(vocab, 32768) * 4 * k        [CPU only: torch temporaries, k = 3.3 forward, 7.25 backward]
    """
    tokens = setup.micro_batch * setup.seq_len
    rows = min(setup.micro_batch * (setup.seq_len - 1), HEAD_TOKEN_CHUNK)
    prec = _precision(setup)
    compute = 4 if prec == "fp32" else 2
    resid = 4 if (prec == "fp32" or setup.mode == "qlora") else 2
    kept = 2 * tokens * shape.hidden * resid
    tile = rows * HEAD_VOCAB_CHUNK * compute
    cpu_cols = rows * min(shape.vocab, HEAD_VOCAB_CHUNK) * 4
    fwd = tile + (HEAD_CPU_TEMPS_FWD * cpu_cols if setup.device == "cpu" else 0)
    bwd = tile + tokens * shape.hidden * 4
    if setup.mode == "full":
        bwd += shape.vocab * shape.hidden * (4 + (compute if compute != 4 else 0))
    if setup.mode == "qlora" and prec == "half":
        bwd += shape.vocab * shape.hidden * 2
    if setup.device == "cpu":
        bwd += HEAD_CPU_TEMPS_BWD * cpu_cols
    return kept, max(fwd, bwd)


def activation_bytes(shape: ModelShape, setup: Setup) -> tuple[float, float]:
    """(peak, per-layer backward transient) activation bytes of one micro-batch.

    kept = layers * layer_activation_bytes                 (no checkpointing)
         = layers * tokens * hidden * r + mask             (checkpointing: each layer keeps its input only)
    mask = micro_batch * seq_len^2 * (1 byte for sdpa; the dtype's bytes for eager; none for flash-attn)
    layer transient = 2 * tokens * (hidden + intermediate) * r  (gradient buffers while a layer runs backward)
                      + 2 * tokens * intermediate * 4  (LoRA on a half base: fp32 gradients of the adapter input)
                      + layer_activation_bytes with checkpointing (the layer is recomputed)
    peak = kept + head kept + max(head transient, layer transient)
    """
    tokens = setup.micro_batch * setup.seq_len
    prec = _precision(setup)
    a = 4 if prec == "fp32" else 2
    resid = 4 if (prec == "fp32" or setup.mode == "qlora") else 2
    layer = layer_activation_bytes(shape, setup)
    attn = _attention(shape, setup)
    mask = 0 if attn == "flash" else setup.micro_batch * setup.seq_len**2 * (a if attn == "eager" else 1)
    grad_buffers = 2 * tokens * (shape.hidden + shape.intermediate) * resid
    if setup.mode == "lora" and prec == "half":
        grad_buffers += 2 * tokens * shape.intermediate * 4
    if setup.gradient_checkpointing:
        kept = shape.layers * tokens * shape.hidden * resid
        layer_transient = layer + grad_buffers
    else:
        kept = shape.layers * layer
        layer_transient = grad_buffers
    head_kept, head_transient = head_bytes(shape, setup)
    return kept + mask + head_kept + max(head_transient, layer_transient), layer_transient


def memory_terms(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Every term of the per-GPU peak, in bytes; their sum is the estimate.

    ``not_live_together`` (<= 0): with one micro-batch per step, gradients appear as activations are
    freed, so the peak is max(activations, gradients + one layer's transient), not their sum. With
    gradient accumulation the gradients of earlier micro-batches are live during the next one: 0.
    """
    if setup.mode not in ("full", "lora", "qlora"):
        raise OasstError(f"peft.mode: '{setup.mode}' is not one of full, lora, qlora")
    wbytes = DTYPE_BYTES[setup.dtype]
    half = setup.dtype != "fp32"
    trainable = trainable_params(shape, setup)
    full = setup.mode == "full"
    # Full half-precision training without DeepSpeed keeps the weights themselves in fp32 (the master
    # copy; model.weights_dtype) and autocast caches a half copy of every matmul weight for the forward.
    amp_master = full and half and setup.zero_stage == 0
    if amp_master:
        wbytes = DTYPE_BYTES["fp32"]
    live = zero3_live_params(shape) if setup.zero_stage >= 3 else 0
    weights = weight_bytes(
        setup.mode,
        shape.params,
        shape.quantizable_params,
        wbytes,
        setup.zero_stage,
        setup.gpus,
        setup.offload_params,
        setup.double_quant,
        live,
    )
    if amp_master:
        weights += shape.quantizable_params * DTYPE_BYTES[setup.dtype]
    adapters = 0.0 if full else adapter_bytes(trainable)
    if not full and setup.zero_stage >= 3 and not setup.offload_params:
        adapters /= setup.gpus
    grad_b = wbytes if full else LORA_BYTES
    mixed = full and half and not amp_master  # DeepSpeed's half weights + separate fp32 master copy
    bucket = setup.reduce_bucket if setup.reduce_bucket is not None else shape.hidden**2
    bucket *= 2 if setup.overlap_comm else 1
    grads = gradient_bytes(
        trainable, grad_b, setup.zero_stage, setup.gpus, setup.offload_optimizer, mixed, bucket
    )
    optim = optimizer_bytes(trainable, mixed, setup.zero_stage, setup.gpus, setup.offload_optimizer)
    acts, layer_transient = activation_bytes(shape, setup)
    together = 0.0
    if setup.grad_accum <= 1:
        together = max(acts, grads + layer_transient) - (acts + grads)
    terms = {
        "weights": weights,
        "trainable": adapters,
        "gradients": grads,
        "optimizer": optim,
        "activations": acts,
        "not_live_together": together,
    }
    terms["overhead"] = overhead_bytes(sum(terms.values()), setup.device)
    return terms


# ---------------------------------------------------------------------------------------------------------
# Estimates, the recipe, and the table
# ---------------------------------------------------------------------------------------------------------


def total_bytes(shape: ModelShape, setup: Setup) -> float:
    return sum(memory_terms(shape, setup).values())


def max_micro_batch(shape: ModelShape, setup: Setup, gpu_mem_gib: float, limit: int = 4096) -> int:
    """The largest micro-batch whose estimate fits ``gpu_mem_gib`` (0 when even 1 does not)."""
    budget = gpu_mem_gib * GIB
    if total_bytes(shape, replace(setup, micro_batch=1)) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and total_bytes(shape, replace(setup, micro_batch=hi)) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total_bytes(shape, replace(setup, micro_batch=mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
