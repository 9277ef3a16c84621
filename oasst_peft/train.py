"""Training, top to bottom: recipe -> tokenizer -> data -> model -> TRL SFTTrainer -> saved run.

``train(recipe)`` is what ``oasst-peft train`` calls. Loss falls on assistant tokens only: the data
arrives tokenized with an ``assistant_masks`` column (from the template's ``{% generation %}``
markers) and TRL turns it into labels. The output dir gets the standard HF/PEFT layout plus
``oasst_recipe.yaml`` and ``oasst_run.json``, which ``merge`` and ``sample`` read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from oasst_peft import batches, curves, distributed, fingerprint, quiet, schedule, settings, speed, tracking
from oasst_peft.checkpoints import (
    STATE_FILE,
    GracefulStop,
    LatestPointer,
    clear_previous_run,
    latest_checkpoint,
    resolve_resume,
    run_error,
    steps_done,
)
from oasst_peft.config import Recipe
from oasst_peft.data.prepare import prepare_data
from oasst_peft.data.stats import summary_lines
from oasst_peft.errors import OasstError, Unavailable
from oasst_peft.locks import holds_output_dir
from oasst_peft.run_record import RUN_RECORD
from oasst_peft.run_save import save_run


@dataclass
class TrainResult:
    """Where the run went and what it did."""

    output_dir: Path
    mode: str
    dry_run: bool = False
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)


def check_output_dir(out: Path, resume, overwrite: bool) -> None:
    """Refuse to write into a finished run unless resuming or told to overwrite, and refuse both at once."""
    if resume and overwrite:
        raise OasstError(
            f"--resume and --overwrite contradict each other: --resume continues the run in {out}, "
            "--overwrite replaces it; pass one of them"
        )
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise OasstError(f"output_dir: {out} exists and is not a folder; choose another with --output-dir")
    if any(out.iterdir()) and not overwrite:
        raise OasstError(
            f"output_dir: {out} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or --output-dir for a new one"
        )


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

    out = recipe.output_path(output_dir)
    settings.resolve(recipe, say=lambda _line: None)  # the workers' decisions and checks; they print them
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


def _print_plan(
    recipe: Recipe, out: Path, dtype: str, tokenized, unavailable: list[str], max_steps, say
) -> dict:
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
    steps = max_steps if max_steps is not None else recipe.max_steps
    length = (
        f"max_steps {steps} (num_train_epochs is not used)"
        if steps > 0
        else f"epochs {recipe.num_train_epochs}"
    )
    say(f"recipe: {plan['recipe']}")
    say(f"model: {recipe.model_name}  mode: {recipe.mode}  dtype: {dtype}  max_length: {recipe.max_length}")
    if recipe.peft and recipe.mode != "full":
        p = recipe.peft
        say(f"peft: r={p.r} alpha={p.alpha} dropout={p.dropout} target_modules={p.target_modules}")
    say(
        f"batch: {recipe.per_device_train_batch_size} x {recipe.gradient_accumulation_steps} accumulation per device; "
        f"lr {recipe.learning_rate}, warmup {recipe.warmup_steps}, {length}"
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


def _check_resume_plan(
    recipe, out: Path, resume, tokenizer, tokenized, max_steps, run, force: bool, say
) -> None:
    """``--resume --dry-run``: the checkpoint a real resume would take, and whether this run may continue it."""
    checkpoint = resolve_resume(out, resume)
    if tokenized is None:
        say(
            f"resume: {Path(checkpoint).name}; not compared with this run (its data could not be tokenized here)"
        )
        return
    saved = fingerprint.read_fingerprint(checkpoint)  # the process count is the launcher's, checked at start
    processes = saved.world_size if saved is not None else 1
    current = fingerprint.compute(
        recipe, tokenizer, tokenized, max_steps, processes, zero=bool(run.deepspeed_path)
    )
    fingerprint.check_resume(checkpoint, current, force=force, say=say)
    say(f"resume: would continue from {Path(checkpoint).name}, step {steps_done(checkpoint)}")


@quiet.hides_harmless  # the library warnings the CLI hides (oasst_peft/quiet.py), for this call only
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

    from oasst_peft.model import describe, load_model, load_tokenizer

    say = distributed.rank_zero(say)  # under a launcher, rank 0 speaks for all
    out = recipe.output_path(output_dir)
    if not dry_run:
        check_output_dir(out, resume, overwrite)
        resume = resolve_resume(out, resume) if resume else None
    recipe, run = settings.resolve(recipe, say=say, dry_run=dry_run)  # every per-run decision, said once
    dtype = run.dtype
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
        else:  # no tokenizer to tokenize with: the datasets list is still checked, name by name
            from oasst_peft.data import parse_datasets

            parse_datasets(recipe.datasets, recipe.recipe_dir)
            say(
                "data: not loaded or tokenized, since the tokenizer is unavailable here; the datasets list was checked"
            )
        plan = _print_plan(recipe, out, dtype, tokenized, unavailable, max_steps, say)
        if resume:
            _check_resume_plan(recipe, out, resume, tokenizer, tokenized, max_steps, run, force, say)
        batching = speed.planned_batching(recipe, run)
        plan["batching"] = batching.name
        say(batching.line())
        say("dry run: nothing was trained or written")
        return TrainResult(out, recipe.mode, dry_run=True, plan=plan)

    tokenizer, fmt = load_tokenizer(recipe)
    tokenized, _ = prepare_data(recipe, tokenizer, say=say)
    for line in summary_lines(tokenized.stats):  # never silent about truncation and drops
        say(line)
    # Multi-process runs (issue 4): process group, same init on every rank, resume fingerprint.
    extra_args = distributed.setup(run.deepspeed_path)
    run_fp = fingerprint.compute(
        recipe, tokenizer, tokenized, max_steps, distributed.world_size(), zero=bool(run.deepspeed_path)
    )
    if resume:
        fingerprint.check_resume(resume, run_fp, force=force, say=say)
    batching = speed.planned_batching(recipe, run)
    say(batching.line())
    has_eval = bool(tokenized.validation)
    # Before any weight loads: building the arguments sets this rank's device and process group and, for
    # ZeRO-3, puts the DeepSpeed config in force so that from_pretrained partitions at load (zero.Init).
    args = None
    if run.arguments_before_load:
        args = training_arguments(recipe, run, out, max_steps, has_eval, batching, **extra_args)
    set_seed(recipe.seed % (2**32))  # new embedding rows and LoRA init: identical on every rank and run
    loaded = load_model(recipe, tokenizer, fmt, run, say=say)
    say(describe(loaded, recipe))
    attn = loaded.model.config._attn_implementation
    run_fp = fingerprint.with_batching(run_fp, batching.name, attn)
    if resume:  # what this host decided: batching, attention
        fingerprint.check_resume(resume, run_fp, force=force, say=say, runtime_only=True)
    if args is None:  # see RunSettings.arguments_before_load
        args = training_arguments(recipe, run, out, max_steps, has_eval, batching, **extra_args)
    trainer = make_trainer(
        fused_loss=recipe.fused_loss,
        model=loaded.model,
        args=args,
        train_dataset=tokenized.train,
        eval_dataset=tokenized.validation or None,
        processing_class=tokenizer,
    )
    if recipe.sample_on_eval and has_eval and recipe.eval_steps > 0:
        from oasst_peft.eval_samples import SampleOnEvalCallback

        trainer.add_callback(SampleOnEvalCallback(tokenizer, say=say))
    if resume:
        done, total = steps_done(resume), planned_steps(trainer)
        if done >= total:  # Trainer.train would run one step more
            return _resumed_run_is_complete(trainer, loaded, tokenizer, fmt, recipe, out, resume, run, say)
        say(f"resume: from {Path(resume).name}, step {done} of {total}")
    if overwrite:  # only now that everything has loaded: a failed start keeps the old run
        removed = distributed.on_rank_zero(lambda: clear_previous_run(out))
        if removed:
            say(f"overwrite: removed the earlier run's {', '.join(removed)} from {out}")
    stopper = GracefulStop()
    trainer.add_callback(LatestPointer())
    trainer.add_callback(speed.SamplerEpoch())
    trainer.add_callback(batches.BatchReport(len(tokenized.train), batching.packing, say=say))
    trainer.add_callback(schedule.warmup_callback(recipe, say=say))
    batches.after_progress_bar(trainer)  # its line before the bar starts, not inside the bar's line
    trainer.add_callback(fingerprint.FingerprintCallback(run_fp.to_dict()))
    trainer.add_callback(stopper)
    # After the trackers' own callbacks, whose runs are open by then: the recipe as the run's parameters.
    trainer.add_callback(tracking.recipe_params_callback(recipe))
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
    try:
        save_run(trainer, loaded, tokenizer, fmt, recipe, out, _command(), run.deepspeed_path)
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


def _resumed_run_is_complete(trainer, loaded, tokenizer, fmt, recipe, out: Path, resume: str, run, say):
    """``--resume`` of a run whose checkpoint is already at its last step: nothing is trained.

    The final adapter or model is written from that checkpoint only when the run stopped before saving it.
    """
    name, step = Path(resume).name, steps_done(resume)
    if not (out / RUN_RECORD).is_file():
        if run.deepspeed_path:
            raise OasstError(
                f"--resume: {name} is the run's last step ({step}) but its final save is missing; "
                f"merge or sample the checkpoint itself (oasst-peft merge {resume} --out DIR)"
            )
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)  # (what Trainer.train loads on a resume, minus the optimizer)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / STATE_FILE))
        save_run(trainer, loaded, tokenizer, fmt, recipe, out, _command())
        png = curves.finish(trainer, out, say=say)
        say(f"done: {name} was the last step ({step}); saved from it in {out}{curves.named(png)}")
    else:
        say(
            f"nothing to train: {name} is the run's last step ({step}), and the run is saved in {out}; "
            "to train on, raise --max-steps (with --force, since the schedule changes)"
        )
    distributed.finish()
    return TrainResult(out, recipe.mode, metrics={"global_step": step})


def _command() -> list[str]:
    """The command line this run was started with, as the run record keeps it."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def _close_progress_bars(trainer) -> None:
    """End the Trainer's open progress bars, so that an error printed next starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def sft_config(*args, **kwargs):
    """``trainer.sft_config`` (imported when called: TRL loads only when a run needs it)."""
    from oasst_peft.trainer import sft_config as build

    return build(*args, **kwargs)


def training_arguments(*args, **kwargs):
    """``trainer.training_arguments``, imported when called."""
    from oasst_peft.trainer import training_arguments as build

    return build(*args, **kwargs)


def make_trainer(**kwargs):
    """``trainer.make_trainer``, imported when called."""
    from oasst_peft.trainer import make_trainer as make

    return make(**kwargs)


def planned_steps(trainer) -> int:
    """``trainer.planned_steps``, imported when called."""
    from oasst_peft.trainer import planned_steps as planned

    return planned(trainer)
