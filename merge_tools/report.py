"""What ``merge()`` did: the ``MergeReport`` it returns, the lines it printed, and the record it leaves in ``--out``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merge_tools.verify import VerifyResult

MERGE_RECORD = "oasst_merge.json"


@dataclass
class MergeReport:
    """What ``merge`` did."""

    out: Path
    source: Path
    kind: str  # adapter | full | zero
    mode: str  # lora | qlora | full
    base: str
    dtype: str
    qlora_base: str | None
    shards: int
    bytes: int
    merged_modules: int
    token_rows: int
    nf4_weights: int
    vocab_rows: int | None
    seconds: float
    verify: VerifyResult | None = None
    lines: list[str] = field(default_factory=list)


def format_report(report: MergeReport) -> str:
    """The report as the lines ``oasst-peft merge`` prints."""
    return "\n".join(report.lines)


def merge_record(report: MergeReport, argv: list[str]) -> dict:
    """The ``oasst_merge.json`` written beside the merged weights."""
    v = report.verify
    return {
        "source": str(report.source),
        "kind": report.kind,
        "mode": report.mode,
        "base": report.base,
        "dtype": report.dtype,
        "qlora_base": report.qlora_base,
        "merged_modules": report.merged_modules,
        "token_rows": report.token_rows,
        "nf4_weights": report.nf4_weights,
        "vocab_rows": report.vocab_rows,
        "verify": None
        if v is None
        else {
            "max_abs_diff": v.max_abs_diff,
            "top1_agreement": v.top1_agreement,
            "tolerance": v.tolerance,
            "positions": v.positions,
            "reference": v.reference,
        },
        "command": argv,
    }
