"""The one way a test says it needs GPUs: ``pytestmark = requires_gpu(2)`` or ``@requires_gpu()`` stacked marks."""

from __future__ import annotations

import pytest
import torch


def requires_gpu(n: int = 1) -> list:
    """Marks for a test that needs ``n`` CUDA GPUs: the ``gpu`` marker, and a skip where fewer are present."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.mark.gpu, pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), {have} here")]
