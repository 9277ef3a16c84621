"""``merge()``: a LoRA/QLoRA run, adapter or ZeRO checkpoint in, one plain Hugging Face checkpoint out.

``merge()`` reads what it was given first (``merge_tools.run``: JSON files, safetensors headers, run
records), without torch, so a wrong path is one line at once; then ``merge_tools.build`` does the work
(torch, safetensors, peft). ``oasst-peft merge`` calls this.

    from merge_tools import merge
    report = merge("runs/demo-smollm2", "runs/demo-smollm2-merged")
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from merge_tools.errors import MergeError
from merge_tools.report import MergeReport, format_report
from merge_tools.run import check_input_files, resolve_input

__all__ = ["MergeReport", "format_report", "merge"]


def merge(
    run_or_adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    dtype: str | None = None,
    qlora_base: str = "dequantized-nf4",
    verify: bool | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    say=print,
    tolerance: float | None = None,
) -> MergeReport:
    """Fold an adapter into its base (or consolidate a ZeRO checkpoint) and write a plain HF checkpoint to ``out``.

    ``dtype``: fp16 | bf16 | fp32 (default: the base's). ``qlora_base``: dequantized-nf4 (default: the
    weights QLoRA training saw) | exact. ``verify``: None = on when the model fits in memory.
    Raises ``MergeError`` (one line) for any user error; nothing is left at ``out`` unless it succeeds.
    """
    check_input_files(run_or_adapter)
    run = resolve_input(run_or_adapter)

    from merge_tools.build import MergeOptions, build_merged  # torch from here on
    from merge_tools.io import NAMED_DTYPES, PARTIAL, existing_parent, parse_size
    from merge_tools.qlora import QLORA_BASES

    t0 = time.perf_counter()  # the report's seconds: the merge's work, not the imports before it
    lines: list[str] = []

    def note(msg: str) -> None:
        lines.append(msg)
        say(msg)

    if dtype is not None and dtype not in NAMED_DTYPES:
        raise MergeError(f"--dtype: '{dtype}' is not one of fp16, bf16, fp32")
    if qlora_base not in QLORA_BASES:
        raise MergeError(f"--qlora-base: '{qlora_base}' is not one of {', '.join(QLORA_BASES)}")
    out = Path(out).expanduser()
    opts = MergeOptions(
        out=out,
        base=base,
        dtype=dtype,
        qlora_base=qlora_base,
        verify=verify,
        overwrite=overwrite,
        max_bytes=parse_size(max_shard_size),
        tolerance=tolerance,
        scratch=existing_parent(out) / f".{out.name}{PARTIAL}{os.getpid()}-scratch-{uuid.uuid4().hex[:8]}",
        argv=_merge_command(run_or_adapter, out, base, dtype, qlora_base, verify, overwrite),
    )
    try:
        return build_merged(run, opts, note, lines, t0)
    finally:
        shutil.rmtree(opts.scratch, ignore_errors=True)


def _merge_command(run_or_adapter, out, base, dtype, qlora_base, verify, overwrite) -> list[str]:
    argv = ["oasst-peft", "merge", str(run_or_adapter), "--out", str(out)]
    if base:
        argv += ["--base", str(base)]
    if dtype:
        argv += ["--dtype", dtype]
    if qlora_base != "dequantized-nf4":
        argv += ["--qlora-base", qlora_base]
    if verify is not None:
        argv.append("--verify" if verify else "--no-verify")
    if overwrite:
        argv.append("--overwrite")
    return argv
