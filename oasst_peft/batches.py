"""The line every run prints at start: conversations per optimizer step and optimizer steps per epoch.

These are what the seed cards' numbers mean (``warmup_steps``, ``--max-steps 4000``, "epoch 3.5"): with
batches of conversations a step holds per device x accumulation x processes of them; with packing, each
row is a pack of several, so the line gives their average over the epoch instead.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of ``batches_per_epoch`` micro-batches (a short last step counts)."""
    return max(math.ceil(batches_per_epoch / accumulation), 1)


def batch_line(
    conversations: int,
    batches_per_epoch: int,
    per_device: int,
    accumulation: int,
    processes: int,
    packed: bool,
) -> str:
    """The line (see the module docstring); ``batches_per_epoch`` counts one rank's micro-batches."""
    steps = steps_per_epoch(batches_per_epoch, accumulation)
    shape = f"{per_device} per device x {accumulation} accumulation x {processes} process(es)"
    if packed:
        rows = per_device * accumulation * processes
        return (
            f"batches: packed, {rows} rows per optimizer step ({shape}) holding about {conversations / steps:.1f} "
            f"conversations; {steps} optimizer steps per epoch of {conversations} conversations"
        )
    per_step = per_device * accumulation * processes
    return (
        f"batches: {per_step} conversations per optimizer step ({shape}); "
        f"{steps} optimizer steps per epoch of {conversations} conversations"
    )


class BatchReport(TrainerCallback):
    """Says ``batch_line`` once, when training begins (the loader and the process count are known then)."""

    def __init__(self, conversations: int, packed: bool, say=print):
        self.conversations = conversations
        self.packed = packed
        self.say = say

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            line = batch_line(
                self.conversations,
                len(train_dataloader),
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
                args.world_size,
                self.packed,
            )
            self.say(line)
        return control


def after_progress_bar(trainer) -> None:
    """Move the Trainer's progress bar behind the callbacks added so far, so their start lines print first."""
    from transformers.trainer_callback import ProgressCallback

    bar = trainer.pop_callback(ProgressCallback)
    if bar is not None:
        trainer.add_callback(bar)
