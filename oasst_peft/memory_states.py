"""The model-state terms of per-GPU training memory, in bytes: weights, adapters, gradients, optimizer.

Each term is a function of explicit numbers (parameter counts, bytes per element, ZeRO stage, GPU
count) with its formula in its docstring; with them are the constants they use (AdamW state, the fp32
master and adapter copies, NF4 packing), ZeRO-3's gathered working set and the fixed CUDA overhead.
``memory.memory_terms`` derives the numbers from a ``Setup`` and a ``ModelShape`` and adds these terms
to the activation terms.
"""

from __future__ import annotations

from oasst_peft.model_info import ModelShape

GIB = 2**30

ADAM_STATE_BYTES = 8  # AdamW keeps exp_avg and exp_avg_sq in fp32: 2 x 4 bytes per trainable parameter
MASTER_BYTES = 4  # fp32 master copy of each trainable weight in fp16/bf16 mixed precision (full)
LORA_BYTES = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype) even on a bf16 base

# QLoRA: NF4 packs two weights per byte; each block of 64 weights has an absmax, stored as 8 bits when the
# constants are quantized again (double quant) with one fp32 absmax per 256 of them, else as fp32.
NF4_BYTES = 0.5
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256

CUDA_CONTEXT_GIB = 0.5  # the CUDA context and kernels: resident, invisible to torch's allocator
CUDA_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS/cuBLASLt workspaces, allocated through torch's caching allocator
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the other terms


def nf4_bytes_per_param(double_quant: bool) -> float:
    """0.5 byte per weight + the block constants: 1/64 byte (8-bit absmax) + 4/(64*256) with double quant,
    else 4/64 (fp32 absmax)."""
    if double_quant:
        return NF4_BYTES + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)
    return NF4_BYTES + 4 / NF4_BLOCK


def weight_bytes(
    mode: str,
    params: int,
    quantizable: int,
    dtype_bytes: int,
    zero_stage: int,
    gpus: int,
    offload_params: bool,
    double_quant: bool = True,
    live_params: int = 0,
) -> float:
    """Base-model weights resident on one GPU.

    full / lora: params * dtype_bytes. qlora: quantizable * nf4_bytes_per_param + (params - quantizable) * 4
    (embeddings, LM head, norms and biases stay unquantized and peft's prepare_model_for_kbit_training upcasts
    them to fp32). ZeRO-3 divides by ``gpus`` and adds the gathered working set ``live_params * dtype_bytes``;
    with parameter offload only the working set stays on the GPU.
    """
    if mode == "qlora":
        resident = quantizable * nf4_bytes_per_param(double_quant) + (params - quantizable) * 4
    else:
        resident = params * dtype_bytes
    if zero_stage < 3:
        return resident
    live = live_params * dtype_bytes
    return live if offload_params else resident / gpus + live


def adapter_bytes(trainable: int) -> float:
    """LoRA adapters and added-token rows: trainable * 4 (peft keeps them in fp32)."""
    return trainable * LORA_BYTES


def gradient_bytes(
    trainable: int,
    grad_bytes: int,
    zero_stage: int,
    gpus: int,
    offload_optimizer: bool,
    mixed_precision_full: bool,
    bucket: int,
) -> float:
    """Gradients on one GPU.

    trainable * grad_bytes, divided by ``gpus`` from ZeRO-2 on, plus DeepSpeed's reduce bucket
    (``bucket`` elements * grad_bytes) from ZeRO-1 on. The mixed-precision step (full, fp16/bf16) also holds
    an fp32 copy of the gradients for the fp32 master weights (4 * trainable, / gpus from ZeRO-1 on). With
    the optimizer offloaded that partition lives in CPU memory and only the bucket stays.
    """
    fp32_copy = 4 * trainable if mixed_precision_full else 0
    if zero_stage == 0:
        return trainable * grad_bytes + fp32_copy
    bucket_bytes = min(bucket, trainable) * grad_bytes
    if offload_optimizer:
        return bucket_bytes
    shard = trainable / gpus if zero_stage >= 2 else trainable
    return shard * grad_bytes + fp32_copy / gpus + bucket_bytes


def optimizer_bytes(trainable: int, master_weights: bool, zero_stage: int, gpus: int, offload: bool) -> float:
    """AdamW state: trainable * (8 + 4 if fp32 master weights are kept), divided by ``gpus`` from ZeRO-1 on;
    0 on the GPU when offloaded to CPU."""
    if offload:
        return 0.0
    per_param = ADAM_STATE_BYTES + (MASTER_BYTES if master_weights else 0)
    return trainable * per_param / (gpus if zero_stage >= 1 else 1)


def zero3_live_params(shape: ModelShape) -> int:
    """Parameters ZeRO-3 holds gathered at once: the largest module (often the embedding) or one layer,
    whichever is bigger, plus the prefetch bucket (HF "auto": 0.9 * hidden^2)."""
    return max(shape.largest_param, shape.layer_params) + int(0.9 * shape.hidden**2)


def overhead_bytes(other: float, device: str) -> float:
    """CUDA context (CUDA_CONTEXT_GIB) + cuBLAS workspaces (CUDA_WORKSPACE_BYTES) + caching-allocator slack
    (ALLOCATOR_SLACK * other); 0 on CPU."""
    if device != "cuda":
        return 0.0
    return CUDA_CONTEXT_GIB * GIB + CUDA_WORKSPACE_BYTES + ALLOCATOR_SLACK * other
