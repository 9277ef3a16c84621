"""Samples during training: greedy replies to the widget prompts at each evaluation, printed and sent to tensorboard.

``train()`` adds ``SampleOnEvalCallback`` to the trainer. It lives apart from ``oasst_peft.sample`` because
it subclasses transformers' ``TrainerCallback``, whose import takes seconds; the ``sample`` and ``chat``
commands do not need it.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from oasst_peft.sample import check_messages, generate_replies, last_user, widget_prompts


class SampleOnEvalCallback(TrainerCallback):
    """At each evaluation, greedy replies to the widget prompts (or ``prompts``), printed and sent to tensorboard."""

    def __init__(self, tokenizer, prompts=None, max_new_tokens: int = 64, say=print, log_dir=None):
        self.tokenizer = tokenizer
        self.prompts = [check_messages(m, f"prompts[{i}]") for i, m in enumerate(prompts or widget_prompts())]
        self.max_new_tokens = max_new_tokens
        self.say = say
        self.log_dir = log_dir
        self.history: list[dict] = []  # {"step", "replies"} per evaluation, for tests and callers
        self._writer = None
        self._last_step = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # With several validation sets the Trainer evaluates each in turn: sample once per step.
        if model is None or state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
        if not (state.is_world_process_zero or zero3):
            return  # ZeRO-3 shards the weights: every rank must join the forward passes
        was_training = model.training
        model.eval()
        try:
            rows = generate_replies(
                model,
                self.tokenizer,
                self.prompts,
                "greedy",
                self.max_new_tokens,
                eos_ids=[self.tokenizer.eos_token_id],
                batch_size=len(self.prompts),
                seed=None,
                synced_gpus=zero3,
            )
        finally:
            model.train(was_training)
        if not state.is_world_process_zero:
            return
        self.history.append({"step": state.global_step, "replies": [r["reply"] for r in rows]})
        for m, r in zip(self.prompts, rows, strict=True):
            end = "" if r["ended_with_eot"] else " [no end-of-turn]"
            self.say(f"sample @ step {state.global_step}: {last_user(m)!r} -> {r['reply']!r}{end}")
        self._tensorboard(args, state.global_step, rows)

    def _tensorboard(self, args, step: int, rows: list[dict]) -> None:
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if "tensorboard" not in report_to and "all" not in report_to:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        if self._writer is None:
            log_dir = (
                self.log_dir
                or os.environ.get("TENSORBOARD_LOGGING_DIR")
                or os.path.join(args.output_dir, "runs", "samples")
            )
            self._writer = SummaryWriter(log_dir=log_dir)
        for i, (m, r) in enumerate(zip(self.prompts, rows, strict=True)):
            text = f"**prompt:** {last_user(m)}\n\n**reply:** {r['reply']}"
            self._writer.add_text(f"samples/prompt_{i}", text, step)
        self._writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
