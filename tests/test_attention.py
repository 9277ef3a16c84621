"""The flash-attention gate (issue 12 item 7): transformers' check, compute capability >= 8, broken installs.

The GPU is the one thing this CPU machine cannot have, so the capability probe is replaced where a test
needs a GPU; the flash-attn packages are real packages written to tmp (a working one and a broken build).
"""

from __future__ import annotations

import sys

import pytest

from oasst_peft import attention
from oasst_peft.config import recipe_from_dict

BROKEN = (
    'raise ImportError("/site-packages/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")\n'
)
WORKING = "def flash_attn_func(*args, **kwargs):\n    raise RuntimeError('not on CPU')\n"


@pytest.fixture
def flash_package(tmp_path, monkeypatch):
    """Put a ``flash_attn`` package with the given ``__init__`` on sys.path."""

    def make(body: str) -> None:
        pkg = tmp_path / "site" / "flash_attn"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(body, encoding="utf-8")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)

    yield make
    sys.modules.pop("flash_attn", None)


def _gpu(monkeypatch, capability, accepted=True):
    monkeypatch.setattr(attention, "cuda_capability", lambda: capability)
    monkeypatch.setattr(attention, "transformers_accepts_flash", lambda: accepted)


def test_without_flash_attn_or_gpu_it_is_sdpa(flash_package, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        assert attention.flash_gate("bf16") == (
            "sdpa",
            "flash-attn is not installed (pip install -e '.[flash]')",
        )
    flash_package(WORKING)
    assert attention.flash_gate("bf16") == ("sdpa", "no CUDA GPU")


def test_transformers_own_check_decides_installs(flash_package, monkeypatch):
    flash_package(WORKING)  # no dist-info and no CUDA: transformers' real check says no
    monkeypatch.setattr(attention, "cuda_capability", lambda: (8, 0))
    attn, why = attention.flash_gate("bf16")
    assert attn == "sdpa" and "transformers does not accept" in why


@pytest.mark.parametrize(("capability", "name"), [((7, 0), "V100"), ((7, 5), "T4")])
def test_compute_capability_below_8_falls_back_to_sdpa(flash_package, monkeypatch, capability, name):
    flash_package(WORKING)
    _gpu(monkeypatch, capability)
    attn, why = attention.flash_gate("fp16")
    assert attn == "sdpa" and f"compute capability {capability[0]}.{capability[1]}" in why and name in why


def test_a_broken_flash_attn_build_is_one_line_not_a_traceback(flash_package, monkeypatch):
    flash_package(BROKEN)
    _gpu(monkeypatch, (9, 0))
    lines: list[str] = []
    recipe = recipe_from_dict({"model_name": "m", "datasets": ["alpaca"], "use_flash_attention": True})
    assert attention.pick(recipe, say=lines.append) == "sdpa"
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(
        "attention: sdpa, because flash-attn is installed but does not import (ImportError"
    )
    assert "undefined symbol" in lines[0] and "reinstall" in lines[0]


def test_ampere_or_newer_with_a_working_install_uses_flash_attention(flash_package, monkeypatch):
    flash_package(WORKING)
    _gpu(monkeypatch, (9, 0))
    assert attention.flash_gate("bf16") == (
        "flash_attention_2",
        "flash-attn installed, CUDA GPU with compute capability 9.0",
    )
    assert attention.flash_gate("fp32") == ("sdpa", "flash attention needs fp16/bf16")
    recipe = recipe_from_dict({"model_name": "m", "datasets": ["alpaca"]})
    assert attention.pick(recipe, say=lambda _: pytest.fail("nothing to say")) is None
