"""The weights half of a GGUF: which architectures, their hyperparameter keys, tensor names and layouts.

Llama-family models (Llama, Mistral, SmolLM2) go out as llama.cpp's ``llama`` architecture and Bloom
as ``bloom``. Names come from the ``gguf`` package's ``TensorNameMap``. Two layouts differ from
Hugging Face's, following llama.cpp's conventions: llama's q/k rows are reordered from the
rotate-half rotary layout to the interleaved-pairs one, and Bloom's fused qkv (heads outermost,
q/k/v inside each head) becomes q, k and v blocks one after the other. GPT-NeoX is refused:
transformers cannot read a GPT-NeoX GGUF back, so nothing here could check the file.

Tensor types: ``f32`` keeps everything in float32; ``f16``/``bf16``/``q8_0`` store matrices that way
and keep vectors (norms, biases) in float32; a matrix whose rows are not a whole number of 32-value
blocks falls back from q8_0 to f16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oasst_peft.errors import OasstError

TYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED = ("llama", "mistral", "bloom")
_REFUSED = {
    "gpt_neox": (
        "GPT-NeoX (Pythia, StableLM-alpha) is not exported: transformers cannot load a GPT-NeoX GGUF back, "
        "so the file could not be verified here; serve the merged model (oasst-peft merge) instead"
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """The config values the GGUF needs, read once."""

    model_type: str
    arch: str  # llama.cpp architecture: llama | bloom
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    context: int
    norm_eps: float
    rope_theta: float
    tied: bool
    vocab_rows: int


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise OasstError(
            f"export: rope scaling '{rope_type}' is not exported (transformers cannot read it back from a GGUF)"
        )
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def model_shape(cfg, where: str) -> ModelShape:
    """Check that ``cfg`` (a transformers config) is exportable and read its shape."""
    mt = cfg.model_type
    if mt in _REFUSED:
        raise OasstError(f"export: {where}: {_REFUSED[mt]}")
    if mt not in SUPPORTED:
        raise OasstError(
            f"export: {where}: architecture '{mt}' is not supported (export handles llama, mistral and bloom)"
        )
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if mt == "bloom":
        if not tied:
            raise OasstError(f"export: {where}: a Bloom model with an untied lm_head cannot be exported")
        h, n = cfg.hidden_size, cfg.n_head
        return ModelShape(
            mt, "bloom", cfg.n_layer, h, n, n, h // n, 4 * h, int(getattr(cfg, "seq_length", 0) or 2048),
            float(cfg.layer_norm_epsilon), 0.0, True, cfg.vocab_size,
        )  # fmt: skip
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise OasstError(f"export: {where}: llama attention/mlp biases are not exported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        mt, "llama", cfg.num_hidden_layers, cfg.hidden_size, heads, cfg.num_key_value_heads or heads, head_dim,
        cfg.intermediate_size, cfg.max_position_embeddings, float(cfg.rms_norm_eps), _rope_theta(cfg), tied,
        cfg.vocab_size,
    )  # fmt: skip


def file_type(qtype: str) -> int:
    import gguf

    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[qtype]


def add_hparams(writer, shape: ModelShape, qtype: str, name: str) -> None:
    """The architecture keys llama.cpp reads (and transformers maps back to a config)."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_vocab_size(shape.vocab_rows)
    writer.add_file_type(file_type(qtype))
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if shape.arch == "bloom":
        writer.add_layer_norm_eps(shape.norm_eps)
        return
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.head_dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def gguf_name(name_map, hf_name: str) -> str | None:
    """The GGUF tensor name for a Hugging Face weight name (None: not part of the GGUF)."""
    for key in (hf_name, hf_name.removeprefix("transformer."), hf_name.removeprefix("model.")):
        found = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is not None:
            return found
    return None


def tensor_names(shape: ModelShape, hf_names: list[str]) -> list[tuple[str, str]]:
    """(hf name, gguf name) for every weight that goes into the file, in file order."""
    import gguf

    arch = gguf.MODEL_ARCH.LLAMA if shape.arch == "llama" else gguf.MODEL_ARCH.BLOOM
    name_map = gguf.get_tensor_name_map(arch, shape.layers)
    pairs = []
    for hf in hf_names:
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and shape.tied:
            continue  # the runtime reuses token_embd, as transformers does
        out = gguf_name(name_map, hf)
        if out is None:
            raise OasstError(
                f"export: weight '{hf}' has no GGUF name for {shape.arch}; the model is not exportable"
            )
        pairs.append((hf, out))
    return pairs


def to_gguf_layout(shape: ModelShape, name: str, w: np.ndarray) -> np.ndarray:
    """Reorder a weight from the Hugging Face layout to llama.cpp's (a no-op for most tensors)."""
    if shape.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        n = shape.heads if ".attn_q." in name else shape.kv_heads
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if shape.arch == "bloom" and ".attn_qkv." in name:
        rest = w.shape[1:]
        per_head = w.reshape(shape.heads, 3, shape.head_dim, *rest)
        return np.ascontiguousarray(per_head.swapaxes(0, 1)).reshape(w.shape)
    return w


def storage_type(qtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor of ``shape`` is stored as under ``--type qtype``."""
    import gguf

    t = gguf.GGMLQuantizationType
    if qtype == "f32" or len(shape) < 2:
        return t.F32
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[t.Q8_0][0]
        return t.Q8_0 if shape[-1] % block == 0 else t.F16
    return t.BF16 if qtype == "bf16" else t.F16


def stored_bytes(gtype, shape: tuple[int, ...]) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return int(np.prod(quant_shape_to_byte_shape(shape, gtype)))


def encode(w: np.ndarray, gtype) -> np.ndarray:
    """``w`` (float32) as the bytes/values the file stores for ``gtype``."""
    import gguf

    t = gguf.GGMLQuantizationType
    if gtype == t.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if gtype == t.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gtype)
