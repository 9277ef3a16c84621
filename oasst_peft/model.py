"""Model and tokenizer loading: hub id, local dir or GGUF file; precision, attention, dropout, QLoRA, LoRA.

``load_tokenizer`` returns the tokenizer with the oasst template installed; ``load_model`` returns a
model ready for the trainer in the recipe's mode, with the embedding grown for the added tokens and,
in LoRA/QLoRA, the rows of those tokens trainable (peft ``trainable_token_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oasst_peft.boundary import user_file
from oasst_peft.config import Recipe
from oasst_peft.errors import OasstError
from oasst_peft.model_info import MODEL_FIX, ModelSource, hub_error, load_model_config, resolve_model_source
from oasst_peft.settings import RunSettings
from oasst_peft.template import ChatFormat, check_turn_end, resize_embeddings, setup_tokenizer

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Config fields that carry residual / hidden-state dropout, per architecture.
RESIDUAL_DROPOUT_FIELDS = {
    "gpt_neox": ("hidden_dropout",),
    "bloom": ("hidden_dropout",),
    "stablelm": ("hidden_dropout",),
    "llama": ("attention_dropout",),
    "mistral": ("attention_dropout",),
    "qwen2": ("attention_dropout",),
    "gpt2": ("resid_pdrop",),
    "falcon": ("hidden_dropout",),
}


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer with the oasst tokens and chat template installed; returns (tokenizer, ChatFormat)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(recipe.tokenizer_name or recipe.model_name, recipe.recipe_dir)
    first, kwargs = source.metadata_args  # a GGUF: its header, no dequantizing
    with user_file("model_name", f"the tokenizer of {source.location}", MODEL_FIX):
        try:
            tok = AutoTokenizer.from_pretrained(first, trust_remote_code=recipe.trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            if source.kind == "hub":
                raise hub_error("tokenizer", source.location, e) from None
            raise OasstError(f"model_name: cannot load a tokenizer from {source.location}: {e}") from None
    template = recipe.chat_template
    if template != "oasst":
        template = str(recipe.resolve_path(template))
    with user_file("chat_template", template, "fix the Jinja template or use chat_template: oasst"):
        fmt = setup_tokenizer(tok, eos_token=recipe.eos_token, chat_template=template)
        if template != "oasst":  # a syntax error, a raise_exception or a wrong turn end shows now
            check_turn_end(tok, fmt, template)
    return tok, fmt


def apply_residual_dropout(config, p: float, say=print) -> None:
    """Set the architecture's residual dropout fields to ``p``."""
    if p <= 0:
        return
    fields = RESIDUAL_DROPOUT_FIELDS.get(config.model_type)
    if not fields:
        raise OasstError(
            f"residual_dropout: no known dropout field for model_type '{config.model_type}'; set it to 0"
        )
    for f in fields:
        setattr(config, f, p)
    if fields == ("attention_dropout",):
        say(
            f"residual_dropout: {config.model_type} has no residual dropout; applied {p} to attention_dropout"
        )


def nf4_config(quant_type: str, double_quant: bool, compute_dtype: str, storage: str | None = None):
    """The one bitsandbytes 4-bit config (training and sampling): ``compute_dtype`` is fp16 | bf16 | fp32."""
    from transformers import BitsAndBytesConfig

    kwargs = {"bnb_4bit_quant_storage": getattr(torch, storage)} if storage else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype],
        **kwargs,
    )


def exact_nf4_kernels(model) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its dequantize-and-matmul path; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster bf16 kernel the first time
    the layer runs in eval mode, and the weight stays repacked after ``model.train()``. That kernel has no
    backward: once an evaluation has run, training silently loses the gradient through every 4-bit base
    weight, so the LoRA layers below learn from a wrong signal. It also rounds through bf16, so replies
    would differ from what the run computed in its ``compute_dtype``. Training and sampling both call this.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantization_config(recipe: Recipe, dtype: str, zero3: bool = False, say=print):
    """bitsandbytes 4-bit NF4 config for qlora, else None."""
    if recipe.mode != "qlora":
        return None
    storage = recipe.peft.bnb_4bit_quant_storage
    if zero3 and storage is None:
        storage = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
        say(f"qlora under ZeRO-3: bnb_4bit_quant_storage set to {storage} (the model dtype)")
    return nf4_config(
        recipe.peft.bnb_4bit_quant_type, recipe.peft.bnb_4bit_use_double_quant, dtype, storage=storage
    )


def _load_base(recipe: Recipe, dtype: str, attn: str | None, quant, config, device_map=None):
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(recipe.model_name, recipe.recipe_dir)
    first, kwargs = source.pretrained_args
    if recipe.trust_remote_code:
        print("trust_remote_code: on (the recipe asked for it): code shipped with the model will run")
    kwargs.update(
        dtype=TORCH_DTYPES[dtype],
        trust_remote_code=recipe.trust_remote_code,
        config=config,
        use_safetensors=True,
    )
    if attn:
        kwargs["attn_implementation"] = attn
    if recipe.use_kernels:
        kwargs["use_kernels"] = True  # Hugging Face Hub kernels for the layers that have them
    if device_map is not None:
        kwargs["device_map"] = device_map  # QLoRA on this rank's own GPU (settings.placement)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        with user_file("model_name", f"the weights of {source.location}", MODEL_FIX, passes=OSError):
            model = AutoModelForCausalLM.from_pretrained(first, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise hub_error("model", source.location, e) from None
        if "safetensors" in str(e) or ".bin" in str(e):
            raise OasstError(
                f"model_name: {source.location} has no safetensors weights; pickle (.bin) weights are "
                "refused: convert them to safetensors first"
            ) from None
        raise OasstError(f"model_name: cannot load {source.location}: {e}") from None
    return model, source


def _partition_new_parameters(model) -> None:
    """Under ZeRO-3, partition the parameters made after load (transformers builds resized embeddings whole).

    With them, every parameter is partitioned from the moment the model is loaded, on every rank.
    """
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())


def lora_token_targets(model, token_ids: list[int]) -> dict[str, list[int]]:
    """peft ``trainable_token_indices``: the input embedding, and the lm_head too when untied."""
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    targets = {names[id(emb)].split(".")[-1]: list(token_ids)}
    out = model.get_output_embeddings()
    if out is not None and out.weight is not emb.weight:
        targets[names[id(out)].split(".")[-1]] = list(token_ids)
    return targets


def wrap_lora(model, recipe: Recipe, token_ids: list[int]):
    """Wrap ``model`` in a peft LoRA model as the recipe's ``peft`` section says."""
    from peft import LoraConfig, get_peft_model

    p = recipe.peft
    cfg = LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules,
        use_rslora=p.rslora,
        use_dora=p.dora,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=lora_token_targets(model, token_ids)
        if p.train_new_tokens and token_ids
        else None,
    )
    fix = "set peft.target_modules to all-linear or to module names of this model"
    with user_file("peft.target_modules", recipe.model_name, fix):
        return get_peft_model(model, cfg)


@dataclass
class LoadedModel:
    """The model ready to train, and what the run record needs to know about it."""

    model: object
    source: ModelSource
    dtype: str
    base_vocab_rows: int
    vocab_rows: int
    trainable_token_ids: list[int]
    base_signature: dict | None = (
        None  # the base embedding's norms (merge_tools.signature), for the run record
    )


def describe(loaded: LoadedModel, recipe: Recipe) -> str:
    """The run's ``model:`` line: what trains, on which base weights, and how many parameters that is."""
    model = loaded.model
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts 4-bit weights as unpacked
        trainable, total = model.get_nb_trainable_parameters()
    else:
        sizes = [(getattr(p, "ds_numel", 0) or p.numel(), p.requires_grad) for p in model.parameters()]
        trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)  # ds_numel: ZeRO-3
    p = recipe.peft
    if recipe.mode == "full":
        what = f"full fine-tuning ({loaded.dtype} weights)"
    else:
        kind = "DoRA" if p.dora else ("rsLoRA" if p.rslora else "LoRA")
        targets = p.target_modules if isinstance(p.target_modules, str) else ", ".join(p.target_modules or [])
        what = f"{kind} r {p.r}, alpha {p.alpha:g} on {targets or 'peft defaults'}"
        if recipe.mode == "qlora":
            dq = ", double quant" if p.bnb_4bit_use_double_quant else ""
            what = f"QLoRA: 4-bit {p.bnb_4bit_quant_type} base ({loaded.dtype} compute{dq}), {what}"
        else:
            what = f"{what}, {loaded.dtype} base"
    return f"model: {what}; {_count(trainable)} of {_count(total)} parameters trainable"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def load_model(
    recipe: Recipe, tokenizer, fmt: ChatFormat, settings: RunSettings | None = None, say=print
) -> LoadedModel:
    """Load the base as ``settings`` say (resolved here, quietly, when not given), grow its vocab for the
    oasst tokens, and apply the recipe's mode.

    Under a launcher, build the TrainingArguments first (``trainer.training_arguments``): the rank's
    device and, for ZeRO-3, the DeepSpeed config must be in force before the weights load.
    """
    if settings is None:
        from oasst_peft.settings import resolve

        recipe, settings = resolve(recipe, say=lambda _m: None)
    dtype = settings.dtype
    config = load_model_config(recipe.model_name, recipe.recipe_dir, recipe.trust_remote_code)
    apply_residual_dropout(config, recipe.residual_dropout, say=say)
    quant = quantization_config(recipe, dtype, zero3=settings.zero3, say=say)
    model, source = _load_base(
        recipe, settings.weights_dtype, settings.attention, quant, config, settings.device_map(recipe.mode)
    )
    weight = model.get_input_embeddings().weight
    base_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitioned at load: ds_shape is whole
    from oasst_peft.adapter_file import base_signature, save_lean

    signature = base_signature(model)
    rows = resize_embeddings(model, tokenizer, recipe.pad_vocab_multiple)
    if settings.zero3 and quant is None and settings.arguments_before_load:
        _partition_new_parameters(model)
    model.generation_config.eos_token_id = fmt.eot_id
    model.generation_config.pad_token_id = fmt.pad_id
    model.config.eos_token_id = fmt.eot_id
    model.config.pad_token_id = fmt.pad_id
    # Rows the base never had (and the role tokens, which may reuse existing rows) are trained in every mode.
    token_ids = sorted(set(fmt.trainable_token_ids) | set(range(base_rows, rows)))
    if recipe.mode in ("lora", "qlora"):
        if recipe.mode == "qlora":
            from peft import prepare_model_for_kbit_training

            exact_nf4_kernels(model)

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recipe.gradient_checkpointing
            )
        model = wrap_lora(model, recipe, token_ids)
        save_lean(model, base_rows, rows)  # the adapter holds LoRA + trained token rows, not the embedding
    return LoadedModel(model, source, dtype, base_rows, rows, token_ids, signature)
