"""The trainer: TRL's SFTTrainer with the project's sampler and loss, beside its TrainingArguments builder.

``training_arguments`` turns a recipe and its ``RunSettings`` into TRL's ``SFTConfig``. Build it before the
model loads: constructing it sets up the process group and this rank's device and, for ZeRO-3, puts the
DeepSpeed config in force, so that ``from_pretrained`` partitions the weights as they load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from oasst_peft import speed, tracking
from oasst_peft.config import Recipe


def sft_config(
    recipe: Recipe,
    out: Path,
    dtype: str,
    max_steps: int | None,
    has_eval: bool,
    ds_path: str | None,
    batching: speed.Batching | None = None,
    **extra,
):
    """TRL SFTConfig from the recipe; ``extra`` adds TrainingArguments (see ``distributed.setup``).

    ``batching`` is the run's packing / length-grouping decision (``speed.choose_batching``); without it,
    nothing is packed and batches are length-grouped unless ``sort_by_length: false``.
    """
    fp16 = dtype == "fp16"
    bf16 = dtype == "bf16"
    report_to = tracking.report_to(recipe)
    batching = batching or speed.Batching(False, recipe.sort_by_length is not False, "no model to pack for")
    checkpointing = bool(recipe.gradient_checkpointing)
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_eval_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        adam_beta1=recipe.adam_beta1,
        adam_beta2=recipe.adam_beta2,
        adam_epsilon=recipe.adam_epsilon,
        max_grad_norm=recipe.max_grad_norm,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=max_steps if max_steps is not None else recipe.max_steps,
        logging_steps=recipe.logging_steps,
        save_strategy=recipe.save_strategy,
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        eval_strategy="steps" if has_eval and recipe.eval_steps > 0 else "no",
        eval_steps=recipe.eval_steps or None,
        fp16=fp16,
        bf16=bf16,
        activation_checkpointing=checkpointing,  # the transformers 5 name of gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        use_liger_kernel=recipe.use_liger_kernel,
        **batching.sft_kwargs(),
        seed=recipe.seed % (2**32),
        data_seed=recipe.seed % (2**32),
        report_to=report_to,
        include_num_input_tokens_seen="non_padding",  # real tokens, for training_curves.png
        deepspeed=ds_path,
        max_length=recipe.max_length,
        assistant_only_loss=False,  # the data carries assistant_masks already; TRL builds labels from them
        dataset_num_proc=None,
        save_only_model=False,
        disable_tqdm=False,
        # Every trainable parameter of a LoRA/QLoRA model (the adapters, the trained token rows) takes part in
        # every forward, so DDP need not walk the graph for unused ones after each backward; transformers
        # asks it to for any model that is not a PreTrainedModel, a PeftModel included (full runs: its default).
        ddp_find_unused_parameters=False if recipe.mode != "full" else None,
        **extra,
    )


def training_arguments(recipe: Recipe, settings, out: Path, max_steps, has_eval: bool, batching, **extra):
    """``sft_config`` for a run decided by ``settings`` (``RunSettings``)."""
    return sft_config(
        recipe, out, settings.dtype, max_steps, has_eval, settings.deepspeed_path, batching=batching, **extra
    )


class OasstSFTTrainer(SFTTrainer):
    """SFTTrainer with length-grouped batches from ``speed.LengthGroupedSampler`` and no KV cache in training.

    The loss comes from the model's own logits when ``fused_loss`` is off or must be: TRL computes it from
    ``lm_head.weight`` directly (a fused, chunked head), which would skip the trained rows of the added tokens
    that peft keeps beside an untied lm_head. Without a KV cache sdpa/eager mask packed conversations apart.
    """

    def __init__(self, *args, fused_loss: bool = True, **kwargs):
        self.fused_loss = fused_loss
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = speed.train_sampler(self.args, dataset)  # project-owned: SamplerEpoch sets its epoch
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict:  # DeepSpeed's copy of the weights: a tied lm_head would be written a second time
            state_dict = reshare_tied(state_dict, self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict=state_dict)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if not self.fused_loss or _head_is_wrapped(self.model):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def reshare_tied(state_dict: dict, model) -> dict:
    """``state_dict`` with every name of one shared parameter pointing at one tensor again; returns it.

    Under ZeRO-2 accelerate clones each tensor before saving, so a tied lm_head no longer shares the input
    embedding's storage and ``save_pretrained`` wrote it as a second matrix (SmolLM2-135M: 651 MB instead
    of 538). With the sharing restored, transformers keeps one copy, as in a run without DeepSpeed.
    """
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name and kept in state_dict and name in state_dict:
            state_dict[name] = state_dict[kept]
    return state_dict


def planned_steps(trainer: Trainer) -> int:
    """The optimizer step ``trainer.train()`` runs to: ``max_steps``, or the epochs' worth of this loader."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def make_trainer(fused_loss: bool = True, **kwargs) -> OasstSFTTrainer:
    """The project's trainer (``OasstSFTTrainer``) from SFTTrainer keyword arguments."""
    return OasstSFTTrainer(fused_loss=fused_loss, **kwargs)


def _head_is_wrapped(model) -> bool:
    """True when peft wraps the output embedding (trainable token rows on an untied lm_head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and type(head) not in (torch.nn.Linear,) and hasattr(model, "peft_config")
