"""Checkpoints that survive crashes: a ``latest`` pointer written last, and a clean stop on SIGINT/SIGTERM.

The HF Trainer writes ``checkpoint-N/`` in place. A kill during that write leaves a partial folder, so
the run keeps a ``latest`` file (replaced atomically after each complete save) and resume only ever
picks a complete checkpoint. The first SIGINT/SIGTERM finishes the current step, saves a checkpoint and
stops; a second one exits at once. Under a launcher the stop flag is all-reduced at every step end, so
a signal that reaches one worker (or reaches them in different steps) stops every rank after the same
step, and they save that checkpoint together.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from oasst_peft.errors import OasstError
from oasst_peft.run_record import RUN_RECORD

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def _step(p: Path) -> int:
    return _step_of(p.name)


def _step_of(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def is_complete(ckpt: Path) -> bool:
    """A checkpoint whose trainer state (written last by the Trainer) parses."""
    try:
        json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def steps_done(ckpt: str | Path) -> int:
    """The optimizer steps a complete checkpoint holds (``global_step`` of its trainer state)."""
    return int(json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8")).get("global_step", 0))


def write_latest(out: Path, ckpt: Path) -> None:
    """Point ``out/latest`` at ``ckpt`` (temp file, then rename)."""
    tmp = out / f".{LATEST}.tmp"
    tmp.write_text(ckpt.name + "\n", encoding="utf-8")
    os.replace(tmp, out / LATEST)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in ``out``: the ``latest`` pointer if valid, else the highest complete."""
    pointer = out / LATEST
    if pointer.is_file():
        named = out / pointer.read_text(encoding="utf-8").strip()
        if named.is_dir() and is_complete(named):
            newer = [p for p in out.glob("checkpoint-*") if _step(p) > _step(named) and is_complete(p)]
            if not newer:
                return named
    complete = [p for p in out.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0 and is_complete(p)]
    return max(complete, key=_step) if complete else None


def clear_previous_run(out: Path) -> list[str]:
    """``--overwrite``: remove what an earlier run left in ``out``; returns the names removed.

    Its checkpoints and ``latest`` pointer (else a later ``--resume`` would continue the old run), its run
    record and its final weights (else the folder would look finished while this run trains). Files no run
    writes stay, and the rest of the old run's files are replaced by this run's final save.
    """
    if not out.is_dir():
        return []
    removed = []
    for p in sorted(out.iterdir(), key=lambda p: (not p.name.startswith("checkpoint-"), _step(p), p.name)):
        ckpt = p.is_dir() and p.name.startswith("checkpoint-") and _step(p) >= 0
        final = p.is_file() and (
            p.name in (LATEST, RUN_RECORD, "adapter_config.json", "model.safetensors.index.json")
            or (p.name.endswith(".safetensors") and p.name.startswith(("adapter_model", "model")))
        )
        if ckpt:
            shutil.rmtree(p)
        elif final:
            p.unlink()
        else:
            continue
        removed.append(p.name)
    return removed


def resolve_resume(out: Path, resume: bool | str) -> str:
    """The checkpoint to resume from: the latest complete one (``True``) or a named folder."""
    if resume is True:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise OasstError(
                f"--resume: no complete checkpoint-* folder in {out}; train without --resume or name a checkpoint"
            )
        return str(ckpt)
    path = Path(resume)
    if not path.is_dir():
        path = out / str(resume)
    if not path.is_dir():
        found = sorted(
            (p.name for p in out.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0), key=_step_of
        )
        where = f"{out} holds {', '.join(found)}" if found else f"{out} holds no checkpoint-* folder"
        raise OasstError(
            f"--resume: checkpoint not found: {resume} ({where}); name one of them, or --resume alone"
        )
    if not is_complete(path):
        raise OasstError(
            f"--resume: {path} is incomplete (no readable {STATE_FILE}); pick an earlier checkpoint"
        )
    return str(path)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# torch.save reports a short write as a bare RuntimeError from its zip writer, without an errno.
TORCH_WRITER_WORDS = ("inline_container", "PytorchStreamWriter", "file write failed")
LOW_FREE_BYTES = 64 * 2**20


def _free_bytes(folder: Path) -> int | None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disk_full_error(err: BaseException, out: Path) -> OasstError | None:
    """One line for a write that failed because the disk of ``out`` is full (else None).

    It names the newest complete checkpoint, which the failed write left as it was, and what to do.
    """
    text = str(err)
    full = getattr(err, "errno", None) in DISK_FULL_ERRNOS or any(w in text for w in DISK_FULL_WORDS)
    if not full and isinstance(err, RuntimeError) and any(w in text for w in TORCH_WRITER_WORDS):
        free = _free_bytes(out)
        full = free is not None and free < LOW_FREE_BYTES
    if not full:
        return None
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    keep = (
        f"{ckpt.name} is the latest complete checkpoint: free some space, then continue with --resume"
        if ckpt
        else "no checkpoint was completed: free some space and start again"
    )
    if isinstance(err, OSError) and err.strerror:
        what = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        what = text.splitlines()[0][:160] if text.strip() else type(err).__name__
    return OasstError(f"output_dir: the disk of {out} is full ({what}); {keep}")


def refused_checkpoint_error(err: BaseException, checkpoint: str | Path | None) -> OasstError | None:
    """One line when resuming met a pickle that is more than tensors (``torch.load(weights_only=True)`` refused it)."""
    if checkpoint is None or not isinstance(err, pickle.UnpicklingError):
        return None
    return OasstError(
        f"--resume: {Path(checkpoint).name} holds pickled objects other than plain tensors, which are refused "
        "so that no code in them runs; resume only from checkpoints you trust (or an earlier one)"
    )


def run_error(err: BaseException, out: Path, checkpoint: str | Path | None = None) -> OasstError | None:
    """The one-line error for a run that failed on a full disk or an unsafe checkpoint, else None (a bug)."""
    return disk_full_error(err, out) or refused_checkpoint_error(err, checkpoint)


class LatestPointer(TrainerCallback):
    """After each complete save, point ``latest`` at it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            out = Path(args.output_dir)
            ckpt = out / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_latest(out, ckpt)
        return control


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save, stop. Second: exit at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                return

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            print("second signal: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal_name = signal.Signals(signum).name
        print(
            f"{self.signal_name}: finishing this step and saving a checkpoint (send again to exit now)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def stopped(self) -> bool:
        return self.signal_name is not None

    def shared_flag(self, args) -> bool:
        """True when any rank has been signalled: one all-reduce (max) over the process group, every step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return self.stopped
        flag = torch.tensor([1 if self.stopped else 0], dtype=torch.int32, device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.shared_flag(args):
            if self.signal_name is None:
                self.signal_name = "a signal to another rank"
            control.should_save = True
            control.should_training_stop = True
        return control
