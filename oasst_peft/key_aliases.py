"""Other trainers' names for recipe keys, so a recipe written from habit gets the key it meant.

Users come from axolotl, LLaMA-Factory, torchtune and plain transformers/TRL scripts. Their names for the
same settings are close to none of ours by spelling (``lora_r`` is nearer ``log_dir`` than ``peft.r``), so
a spelling suggestion would mislead. ``key_hint`` gives the mapped key instead, or the spelling suggestion
when the name is not a known alias.
"""

from __future__ import annotations

from collections.abc import Iterable

from oasst_peft.errors import did_you_mean

# Top-level keys of other tools -> what to write in an oasst-peft recipe.
TOP_LEVEL = {
    "base_model": "model_name",
    "model_name_or_path": "model_name",
    "model_id": "model_name",
    "tokenizer_config": "tokenizer_name",
    "tokenizer_name_or_path": "tokenizer_name",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "micro_batch_size": "per_device_train_batch_size",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "num_epochs": "num_train_epochs",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps (a number of optimizer steps)",
    "lora_r": "peft.r",
    "lora_rank": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "lora_target_modules": "peft.target_modules",
    "lora_target": "peft.target_modules",
    "lora_target_linear": "peft.target_modules: all-linear",
    "adapter": "peft.mode (lora or qlora)",
    "finetuning_type": "peft.mode (full, lora or qlora)",
    "load_in_4bit": "peft.mode: qlora",
    "quantization_bit": "peft.mode: qlora (4-bit NF4)",
    "use_dora": "peft.dora",
    "use_rslora": "peft.rslora",
    "sample_packing": "packing",
    "neat_packing": "packing",
    "deepspeed": "deepspeed_config",
    "flash_attention": "use_flash_attention",
    "flash_attn": "use_flash_attention",
    "bf16": "dtype: bf16",
    "fp16": "dtype: fp16",
    "torch_dtype": "dtype",
    "template": "chat_template",
    "dataset": "datasets",
    "val_set_size": "val_split under each entry of datasets",
    "val_size": "val_split under each entry of datasets",
    "wandb_project": "report_to: [wandb] (and WANDB_PROJECT in the environment)",
    "train_on_inputs": "nothing: the loss is always on the assistant's tokens only",
}

# Keys inside the peft: section -> the peft key.
PEFT = {
    "lora_r": "r",
    "rank": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target": "target_modules",
    "lora_target": "target_modules",
    "lora_target_modules": "target_modules",
    "use_dora": "dora",
    "use_rslora": "rslora",
    "adapter": "mode",
    "type": "mode",
    "load_in_4bit": "mode: qlora",
    "bits": "mode: qlora (4-bit NF4)",
}


def key_hint(key: str, valid: Iterable[str], section: str | None = None) -> str:
    """' (here it is X)' for another tool's name of a key, else the closest valid key, else ''."""
    aliases = PEFT if section == "peft" else TOP_LEVEL
    if key in aliases:
        target = aliases[key]
        return f" (here it is {'peft.' if section == 'peft' else ''}{target})"
    return did_you_mean(key, valid)
