"""A few numbers that identify a base model's input embedding, so a merge into another base is refused.

A lean adapter (LoRA weights and trained token rows) carries no copy of the base's layers to compare
with, and a base of the same architecture fits it shape for shape. Training saves, in the run record,
the L1 and L2 norms of 16 rows spread over the base's input embedding; ``merge`` recomputes them from
the base it is given. Norms in float32 survive the dtype casts of loading (bf16 -> fp32 is exact) and
differ by far more than ``TOLERANCE`` between two different models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SIGNATURE_ROWS = 16
TOLERANCE = 1e-3  # relative


def signature_rows(n_rows: int) -> list[int]:
    """The rows measured: evenly spread from the first to the last."""
    if n_rows <= SIGNATURE_ROWS:
        return list(range(n_rows))
    return sorted({round(i * (n_rows - 1) / (SIGNATURE_ROWS - 1)) for i in range(SIGNATURE_ROWS)})


def embedding_signature(read_rows: Callable[[int, int], torch.Tensor], n_rows: int) -> dict:
    """``{"rows": [...], "norms": [[l1, l2], ...]}`` of the embedding whose rows ``read_rows(a, b)`` returns."""
    rows = signature_rows(n_rows)
    norms = []
    for r in rows:
        x = read_rows(r, r + 1).detach().float()
        norms.append([float(x.abs().sum()), float(torch.linalg.vector_norm(x))])
    return {"rows": rows, "norms": norms}


def first_mismatch(saved: dict, read_rows: Callable[[int, int], torch.Tensor]) -> int | None:
    """The first measured row whose norms differ from ``saved`` (None when all agree)."""
    for r, want in zip(saved["rows"], saved["norms"], strict=True):
        x = read_rows(int(r), int(r) + 1).float()
        got = (float(x.abs().sum()), float(torch.linalg.vector_norm(x)))
        if any(abs(g - w) > TOLERANCE * max(abs(w), 1e-6) for g, w in zip(got, want, strict=True)):
            return int(r)
    return None
