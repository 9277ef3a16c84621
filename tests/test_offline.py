"""oasst-peft reads the offline variables as huggingface_hub and datasets do, so "offline" messages agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from oasst_peft.offline import hub_offline

VALUES = ["", "0", "1", "true", "TRUE", "yes", "on", "false", "no", "off", " 1 ", "2"]

_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _library_readings() -> dict[str, dict[str, list[bool]]]:
    """What the installed huggingface_hub and datasets conclude for each variable and value (one process)."""
    code = f"""
import importlib, json, os
import huggingface_hub.constants as h
import datasets.config as d
seen = {{}}
for var in {list(_ENV)!r}:
    seen[var] = {{}}
    for value in {VALUES!r}:
        for name in {list(_ENV)!r}:
            os.environ.pop(name, None)
        os.environ[var] = value
        importlib.reload(h)
        importlib.reload(d)
        seen[var][value] = [bool(h.HF_HUB_OFFLINE), bool(d.HF_HUB_OFFLINE)]
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def readings():
    return _library_readings()


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_agrees_with_the_libraries(var, readings, monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    for value, (hub, ds) in readings[var].items():
        monkeypatch.setenv(var, value)
        if var != "HF_DATASETS_OFFLINE":
            assert hub_offline() == hub, (var, value)
        assert hub_offline(datasets=True) == ds, (var, value)


def test_read_at_call_time(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    assert not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")
    assert not hub_offline()
