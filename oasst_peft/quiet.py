"""The library warnings known to be harmless here, in one list, each with the reason; ``install()`` hides them.

Only these are hidden, each matched by its category (or logger), the start of its message and the
module that emits it; every other warning and log record still shows. The CLI calls ``install()``
before it imports anything heavy; from Python, ``train()`` and ``sample()`` hide them for their own
duration only (``hides_harmless``), so a notebook's own warnings settings are left as they were. To see
them all again, set ``OASST_PEFT_ALL_WARNINGS=1``.

Not in the list, because it was not harmless: peft's "Could not find a config file in ... will assume
that the vocabulary was not modified" (saving an adapter trained on a GGUF base). The vocabulary was
modified; peft guesses so to decide whether to save the whole embedding matrix. The run now makes
that decision itself (``oasst_peft.adapter_file.save_lean``: lean when the trainable token rows cover
every added row), so peft no longer guesses or warns.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass

SHOW_ALL_ENV = "OASST_PEFT_ALL_WARNINGS"


@dataclass(frozen=True)
class Harmless:
    """One known-harmless message: a ``warnings`` category (or a logger name), its text and why it is harmless."""

    message: str  # regex matched at the start of the message
    why: str
    category: type[Warning] | None = None  # a warnings.warn() warning ...
    module: str = ""  # ... raised from this module (regex), or
    logger: str | None = None  # a record of this logger


HARMLESS: tuple[Harmless, ...] = (
    Harmless(
        message=r"'pin_memory' argument is set as true but no accelerator is found",
        category=UserWarning,
        module=r"torch\.utils\.data\.dataloader",
        why="the Trainer asks for pinned batches by default; pinning only speeds copies to a GPU, and "
        "with no accelerator the batches simply stay in ordinary memory",
    ),
    Harmless(
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
        why="peft and TRL read the old property name; in transformers 5 it is an alias that returns "
        "is_activation_checkpointing, so they get the right answer",
    ),
    Harmless(
        message=r"`torch\.distributed\..*_tensor` is deprecated",  # all_gather_into_tensor, reduce_scatter_tensor
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
        why="DeepSpeed's ZeRO calls torch's collectives by the names torch 2.13 deprecated; they still run "
        "the same collective, and under ZeRO-3 the warning came back thousands of times a run",
    ),
    Harmless(
        message=r"Setting accelerator to CPU",
        logger="DeepSpeed",
        why="DeepSpeed is imported by transformers on a machine without a GPU and picks its CPU backend; "
        "runs that use DeepSpeed print their own plan, and the others do not use it",
    ),
    Harmless(
        message=r"(Creating initial MLflow database tables|Updating database tables)",
        logger="mlflow.store.db.utils",
        why="mlflow sets up the run's new sqlite store, whose location the run's tracking: line already "
        "names; later runs into the same store do not print it",
    ),
    Harmless(
        message=r"Failed to load CPU gemm_4bit_forward from kernels-community",
        logger="bitsandbytes.backends.cpu.ops",
        why="bitsandbytes looks for an optional faster CPU 4-bit kernel from the Hub (never reachable "
        "offline) and falls back to its own CPU kernel, which gives the same results",
    ),
)


class _DropHarmless(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record whose args do not format: let the handler report it
            return True
        return not any(p.match(text) for p in self.patterns)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def install() -> None:
    """Hide the HARMLESS messages (logger filters once per process; nothing when OASST_PEFT_ALL_WARNINGS=1)."""
    if os.environ.get(SHOW_ALL_ENV, "") not in ("", "0"):
        return
    for h in (
        HARMLESS
    ):  # every call: warnings.catch_warnings may have reset the filters (an identical one is replaced)
        if h.logger is None:
            warnings.filterwarnings("ignore", message=h.message, category=h.category, module=h.module)
    if _installed:
        return
    by_logger: dict[str, list[re.Pattern]] = {}
    for h in HARMLESS:
        if h.logger is not None:
            by_logger.setdefault(h.logger, []).append(re.compile(h.message))
    for name, patterns in by_logger.items():
        logger, flt = logging.getLogger(name), _DropHarmless(patterns)
        logger.addFilter(flt)
        _installed.append((logger, flt))
    if not _installed:
        _installed.append((logging.getLogger(), logging.Filter()))  # remember that install() ran


def uninstall() -> None:
    """Undo ``install()`` for the loggers (the warnings filters are reset by ``warnings.resetwarnings``)."""
    while _installed:
        logger, flt = _installed.pop()
        logger.removeFilter(flt)


def hides_harmless(fn):
    """Decorate a library entry point so that the HARMLESS messages are hidden while it runs, then restored."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _installed or os.environ.get(SHOW_ALL_ENV, "") not in ("", "0"):
            return fn(*args, **kwargs)  # the CLI installed them already, or all are wanted
        with warnings.catch_warnings(), contextlib.ExitStack() as undo:
            install()
            undo.callback(uninstall)
            return fn(*args, **kwargs)

    return wrapper
