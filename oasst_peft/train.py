"""Training, top to bottom: recipe -> tokenizer -> data -> model -> TRL SFTTrainer -> saved run.

``train(recipe)`` is what ``oasst-peft train`` calls. Loss falls on assistant tokens only: the data
arrives tokenized with an ``assistant_masks`` column (from the template's ``{% generation %}``
markers) and TRL turns it into labels. The output dir gets the standard HF/PEFT layout plus
``oasst_recipe.yaml`` and ``oasst_run.json``, which ``merge`` and ``sample`` read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from oasst_peft import batches, curves, distributed, fingerprint, schedule, speed, tracking
from oasst_peft.checkpoints import (
    GracefulStop,
    LatestPointer,
    latest_checkpoint,
    resolve_resume,
    run_error,
)
from oasst_peft.config import Recipe
from oasst_peft.data.stats import summary_lines
from oasst_peft.ds_check import check_deepspeed_json
from oasst_peft.errors import OasstError, Unavailable
from oasst_peft.locks import holds_output_dir

RUN_RECORD = "oasst_run.json"
RECIPE_RECORD = "oasst_recipe.yaml"


@dataclass
class TrainResult:
    """Where the run went and what it did."""

    output_dir: Path
    mode: str
    dry_run: bool = False
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)


def deepspeed_config_path(recipe: Recipe) -> str | None:
    """A shipped config name (zero2, zero3, ...) or a JSON path from the recipe, as a file path."""
    name = recipe.deepspeed_config
    if not name:
        return None
    shipped = Path(__file__).parent / "deepspeed_configs" / f"{name}.json"
    if shipped.is_file():
        return str(shipped)
    path = recipe.resolve_path(name)
    if not path.is_file():
        raise OasstError(
            f"deepspeed_config: file not found: {path} (or use zero2, zero3, zero2-offload, zero3-offload)"
        )
    return check_deepspeed_json(path, recipe)


def check_output_dir(out: Path, resume, overwrite: bool) -> None:
    """Refuse to write into a finished run unless resuming or told to overwrite."""
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise OasstError(f"output_dir: {out} exists and is not a folder; choose another with --output-dir")
    if any(out.iterdir()) and not overwrite:
        raise OasstError(
            f"output_dir: {out} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or --output-dir for a new one"
        )


def prepare_data(recipe: Recipe, tokenizer, say=print, tolerate_unavailable: bool = False):
    """Load, split and tokenize the recipe's mix. Returns (TokenizedMix, list of unavailable-source lines)."""
    from oasst_peft.data import load_mix, parse_datasets, tokenize_mix

    specs = parse_datasets(recipe.datasets, recipe.recipe_dir)
    unavailable: list[str] = []
    try:
        mix = load_mix(specs, seed=recipe.seed)
    except Unavailable:
        if not tolerate_unavailable:
            raise
        # Find which sources cannot be reached from here (the hub while offline; a broken local file
        # still fails) and build the mix from the rest.
        usable = []
        for spec in specs:
            try:
                load_mix([spec], seed=recipe.seed)
            except Unavailable as e:
                unavailable.append(str(e))
                continue
            usable.append(spec)
        if not usable:
            return None, unavailable
        mix = load_mix(usable, seed=recipe.seed)
    tokenized = tokenize_mix(
        mix,
        tokenizer,
        max_length=recipe.max_length,
        excess_length=recipe.excess_length,
        cache_dir=recipe.cache_dir,
    )
    return tokenized, unavailable


def preflight(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    resume: bool | str | None = None,
    overwrite: bool = False,
    force: bool = False,
    say=print,
) -> None:
    """The checks ``train`` makes before it loads weights, for ``--nproc``/``--hostfile`` to run before a launcher.

    DeepSpeed config, output dir, the checkpoint to resume, tokenizer and chat template, every dataset of the
    mix, and the resume fingerprint of the data and tokenizer (the workers also compare the recipe and the
    process count, before they load weights). Writes nothing but the tokenized-data cache the workers reuse.
    """
    from oasst_peft.model import load_tokenizer

    out = Path(output_dir or recipe.output_dir)
    schedule.check(recipe, deepspeed_config_path(recipe))
    check_output_dir(out, resume, overwrite)
    checkpoint = resolve_resume(out, resume) if resume else None
    tokenizer, _ = load_tokenizer(recipe)
    tokenized, _ = prepare_data(recipe, tokenizer, say=say)
    if checkpoint and not force:
        saved = fingerprint.read_fingerprint(checkpoint) or fingerprint.Fingerprint("", "", "")
        current = replace(
            saved,
            data=fingerprint.data_fingerprint(tokenized),
            tokenizer=fingerprint.tokenizer_fingerprint(tokenizer),
        )
        fingerprint.check_resume(checkpoint, current, say=say)


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
    from trl import SFTConfig

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
        **extra,
    )


def _atomic_save(out: Path, write) -> None:
    """Call ``write(tmp_dir)``, then move every file it wrote into ``out``; the run record lands last."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        write(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == RUN_RECORD)
        for f in files:
            target = out / f.name
            if target.is_dir() and f.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_run(trainer, loaded, tokenizer, fmt, recipe: Recipe, out: Path, command: list[str]) -> None:
    """Write the final model or adapter, tokenizer, generation config, resolved recipe and run record."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = base.generation_config
    gen.eos_token_id = fmt.eot_id
    gen.pad_token_id = fmt.pad_id
    full_state = distributed.zero3_peft_state_dict(trainer)  # ZeRO-3 LoRA/QLoRA: every rank joins the gather

    def write(tmp: Path) -> None:
        if full_state is not None:
            trainer.model.save_pretrained(str(tmp), state_dict=full_state)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        gen.save_pretrained(str(tmp))
        (tmp / RECIPE_RECORD).write_text(recipe.to_yaml(), encoding="utf-8")
        record = {
            "base_model": loaded.source.location,
            "base_kind": loaded.source.kind,
            "mode": recipe.mode,
            "dtype": loaded.dtype,
            "eot_token": fmt.eot,
            "eot_token_id": fmt.eot_id,
            "pad_token_id": fmt.pad_id,
            "base_vocab_rows": loaded.base_vocab_rows,
            "vocab_rows": loaded.vocab_rows,
            "trainable_token_ids": loaded.trainable_token_ids,
            "base_signature": loaded.base_signature,
            "command": command,
        }
        if recipe.mode == "qlora":
            p = recipe.peft
            record["bnb_4bit"] = {
                "quant_type": p.bnb_4bit_quant_type,
                "double_quant": p.bnb_4bit_use_double_quant,
                "compute_dtype": loaded.dtype,
                "blocksize": 64,
            }
        (tmp / RUN_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")

    if trainer.args.should_save:
        _atomic_save(out, write)
    elif trainer.is_deepspeed_enabled and full_state is None:
        trainer.save_model(str(out))  # ZeRO-3 gathers weights collectively: other ranks join, write nothing


def make_trainer(fused_loss: bool = True, **kwargs):
    """TRL's SFTTrainer; the loss comes from the model's own logits when ``fused_loss`` is off or must be.

    TRL computes the loss from ``lm_head.weight`` directly (a fused, chunked head), which would skip the
    trained rows of the added tokens that peft keeps beside an untied lm_head. Then the plain HF loss is used.
    No KV cache in training: with one, sdpa/eager would not mask packed conversations apart. Length-grouped
    batches come from ``speed.LengthGroupedSampler``.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class OasstSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            sampler = speed.train_sampler(self.args, dataset)  # project-owned: SamplerEpoch sets its epoch
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            if not fused_loss or _head_is_wrapped(self.model):
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return OasstSFTTrainer(**kwargs)


def _head_is_wrapped(model) -> bool:
    """True when peft wraps the output embedding (trainable token rows on an untied lm_head)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and type(head) not in (torch.nn.Linear,) and hasattr(model, "peft_config")


def _print_plan(recipe: Recipe, out: Path, dtype: str, tokenized, unavailable: list[str], say) -> dict:
    plan = {
        "recipe": str(recipe.recipe_path) if recipe.recipe_path else None,
        "model_name": recipe.model_name,
        "mode": recipe.mode,
        "dtype": dtype,
        "output_dir": str(out),
        "deepspeed_config": recipe.deepspeed_config,
        "effective_batch_per_device": recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps,
        "max_length": recipe.max_length,
        "learning_rate": recipe.learning_rate,
        "datasets": {},
        "unavailable": unavailable,
    }
    say(f"recipe: {plan['recipe']}")
    say(f"model: {recipe.model_name}  mode: {recipe.mode}  dtype: {dtype}  max_length: {recipe.max_length}")
    if recipe.peft and recipe.mode != "full":
        p = recipe.peft
        say(f"peft: r={p.r} alpha={p.alpha} dropout={p.dropout} target_modules={p.target_modules}")
    say(
        f"batch: {recipe.per_device_train_batch_size} x {recipe.gradient_accumulation_steps} accumulation per device; "
        f"lr {recipe.learning_rate}, warmup {recipe.warmup_steps}, epochs {recipe.num_train_epochs}"
    )
    if recipe.deepspeed_config:
        say(f"deepspeed: {recipe.deepspeed_config}")
    if tokenized is not None:
        for name, n in tokenized.train_sizes().items():
            plan["datasets"][name] = {"train": n, "validation": tokenized.validation_size(name)}
        for line in summary_lines(tokenized.stats):
            say(line)
    for line in unavailable:
        say(f"data: unavailable here: {line}")
    say(f"output: {out}")
    return plan


@holds_output_dir  # one run per output dir, for the run's lifetime
def train(
    recipe: Recipe,
    *,
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    resume: bool | str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    force: bool = False,
    say=print,
) -> TrainResult:
    """Train as the recipe says (see module docstring). ``resume`` is True (latest checkpoint) or a path.

    ``force`` resumes a checkpoint whose recipe, data or tokenizer fingerprint differs from this run's.
    """
    from transformers import set_seed

    from oasst_peft.lora_targets import check_target_modules
    from oasst_peft.model import effective_dtype, load_model, load_tokenizer

    say = distributed.rank_zero(say)  # under a launcher, rank 0 speaks for all
    out = Path(output_dir or recipe.output_dir)
    ds_path = deepspeed_config_path(recipe)
    schedule.settle(recipe, ds_path, say=say)  # the schedule that runs, one line; a conflicting JSON refused
    if not dry_run:
        check_output_dir(out, resume, overwrite)
    check_target_modules(recipe)  # the base's config and the LoRA targets, before data or weights
    dtype = effective_dtype(recipe, say=say)
    recipe = speed.settle(recipe, say=say, dry_run=dry_run)  # gradient checkpointing by model size; kernels
    tracking.prepare(recipe, out, say=say, dry_run=dry_run)  # report_to: installed, offline-first
    if dry_run:
        try:
            tokenizer, fmt = load_tokenizer(recipe)
        except Unavailable as e:
            say(f"tokenizer: unavailable here: {e}")
            tokenizer = None
        tokenized, unavailable = (None, [])
        if tokenizer is not None:
            tokenized, unavailable = prepare_data(recipe, tokenizer, say=say, tolerate_unavailable=True)
        plan = _print_plan(recipe, out, dtype, tokenized, unavailable, say)
        batching = speed.planned_batching(recipe)
        plan["batching"] = batching.name
        say(batching.line())
        say("dry run: nothing was trained or written")
        return TrainResult(out, recipe.mode, dry_run=True, plan=plan)

    resume = resolve_resume(out, resume) if resume else None
    tokenizer, fmt = load_tokenizer(recipe)
    tokenized, _ = prepare_data(recipe, tokenizer, say=say)
    for line in summary_lines(tokenized.stats):  # never silent about truncation and drops
        say(line)
    # Multi-process runs (issue 4): process group, same init on every rank, resume fingerprint.
    extra_args = distributed.setup(ds_path)
    run_fp = fingerprint.compute(
        recipe, tokenizer, tokenized, max_steps, distributed.world_size(), zero=bool(ds_path)
    )
    if resume:
        fingerprint.check_resume(resume, run_fp, force=force, say=say)
    set_seed(recipe.seed % (2**32))  # new embedding rows and LoRA init: identical on every rank and run
    loaded = load_model(recipe, tokenizer, fmt, zero3=_is_zero3(ds_path), say=say, deepspeed=bool(ds_path))

    model_config = loaded.model.config
    batching = speed.choose_batching(recipe, model_config._attn_implementation, model_config)
    say(batching.line())
    run_fp = fingerprint.with_batching(run_fp, batching.name, model_config._attn_implementation)
    if resume:  # what the loaded model decided: batching, attention
        fingerprint.check_resume(resume, run_fp, force=force, say=say, runtime_only=True)

    has_eval = bool(tokenized.validation)
    args = sft_config(recipe, out, dtype, max_steps, has_eval, ds_path, batching=batching, **extra_args)
    if recipe.log_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(recipe.log_dir))
    trainer = make_trainer(
        fused_loss=recipe.fused_loss,
        model=loaded.model,
        args=args,
        train_dataset=tokenized.train,
        eval_dataset=tokenized.validation or None,
        processing_class=tokenizer,
    )
    if recipe.sample_on_eval and has_eval and recipe.eval_steps > 0:
        from oasst_peft.sample import SampleOnEvalCallback

        trainer.add_callback(SampleOnEvalCallback(tokenizer, say=say))
    stopper = GracefulStop()
    trainer.add_callback(LatestPointer())
    trainer.add_callback(speed.SamplerEpoch())
    trainer.add_callback(batches.BatchReport(len(tokenized.train), batching.packing, say=say))
    trainer.add_callback(fingerprint.FingerprintCallback(run_fp.to_dict()))
    trainer.add_callback(stopper)
    trainer.add_callback(tracking.end_runs_callback())
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume or None)
    except Exception as e:  # a full disk, or a resumed pickle that is more than tensors: one line
        error = run_error(e, out, resume)
        if error is None:
            raise
        _close_progress_bars(trainer)
        raise error from None
    finally:
        stopper.uninstall()
    if stopper.stopped:
        png = curves.finish(trainer, out, say=say)
        distributed.finish()
        ckpt = latest_checkpoint(out)
        say(
            f"stopped by {stopper.signal_name}: checkpoint saved in {ckpt}; continue with --resume"
            + curves.named(png)
        )
        return TrainResult(out, recipe.mode, metrics=dict(result.metrics), interrupted=True)
    command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    try:
        save_run(trainer, loaded, tokenizer, fmt, recipe, out, command)
    except Exception as e:
        error = run_error(e, out)
        if error is None:
            raise
        _close_progress_bars(trainer)
        raise error from None
    png = curves.finish(trainer, out, say=say)
    distributed.finish()  # ranks wait for rank 0's writes, then close the process group
    kind = "adapter" if recipe.mode in ("lora", "qlora") else "model"
    say(f"done: {kind} saved in {out}{curves.named(png)}. Sample from it: oasst-peft sample {out}")
    return TrainResult(out, recipe.mode, metrics=dict(result.metrics))


def _close_progress_bars(trainer) -> None:
    """End the Trainer's open progress bars, so that an error printed next starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def _is_zero3(ds_path: str | None) -> bool:
    if not ds_path:
        return False
    cfg = json.loads(Path(ds_path).read_text())
    return cfg.get("zero_optimization", {}).get("stage") == 3
