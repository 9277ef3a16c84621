"""Process-group plumbing for a run started by the launcher, including the CPU-only path that tests use.

On GPUs nothing here changes anything: the HF Trainer and accelerate set up NCCL (and DeepSpeed) as
usual. On a machine without CUDA, several ranks need three things the Trainer does not do by itself
(``use_cpu=True`` would silently turn DeepSpeed off, and without it accelerate treats every rank as a
lone process): tell accelerate DeepSpeed is in use (or, without DeepSpeed, that this is a multi-CPU run,
so the Trainer wraps the model in DDP), create its process state on the gloo backend before the Trainer,
and have the Trainer reuse that state. ``setup`` does exactly that and returns the
extra ``TrainingArguments`` it needs. ``zero3_peft_state_dict`` and ``finish`` serve the end of any
multi-process run, on CPUs and GPUs alike.
"""

from __future__ import annotations

import os


def world_size() -> int:
    """Processes in this run (1 when not launched by torchrun or the DeepSpeed launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def on_cpu_ranks() -> bool:
    """True for a multi-process run on a machine without a CUDA GPU."""
    import torch

    return world_size() > 1 and not torch.cuda.is_available()


def setup(deepspeed_config: str | None) -> dict:
    """Prepare this process for a multi-process run; returns extra ``TrainingArguments`` keyword arguments.

    Call it before the model is loaded and the Trainer is built. A no-op (``{}``) for one process or on GPUs,
    except that ranks other than 0 draw no library progress bars ("Loading weights" once, not once per rank).
    """
    if world_size() > 1 and rank() != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the Trainer's own bar is drawn by rank 0 only anyway
    if not on_cpu_ranks():
        return {}
    from accelerate import PartialState

    if deepspeed_config:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    else:  # plain data parallel: without cpu=True accelerate sees no distributed run, and every rank
        PartialState(cpu=True, backend="gloo")  # would train alone on its shard (no gradient all-reduce)
    return {"accelerator_config": {"use_configured_state": True}}


def rank_zero(say):
    """``say`` on rank 0, silence on the others (so N ranks print each line once)."""
    if rank() == 0:
        return say
    return lambda _line: None


def on_rank_zero(fn):
    """Run ``fn`` on rank 0 while the other ranks wait for it; returns its result there (None elsewhere)."""
    import torch.distributed as dist

    result = fn() if rank() == 0 else None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result


def finish() -> None:
    """End a multi-process run cleanly: wait for every rank (rank 0 may still be writing), then close the group.

    Without it a rank that finishes first can tear down the process group under the others at exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def zero3_peft_state_dict(trainer):
    """Under ZeRO-3 with a peft model: the full 16-bit state dict (on rank 0; ``{}`` on the others), else None.

    The Trainer's own ZeRO-3 adapter save leaves frozen weights out, and with them the resized embedding
    layers peft saves beside the adapter; from the full state dict the adapter is saved exactly as it is
    under ZeRO-2 or on one GPU. Collective: call it on every rank.
    """
    if not trainer.is_deepspeed_enabled or not hasattr(trainer.model, "peft_config"):
        return None
    if trainer.deepspeed.zero_optimization_stage() != 3:
        return None
    return trainer.accelerator.get_state_dict(trainer.deepspeed) or {}  # DeepSpeed gives None off rank 0
