"""The built wheel works outside a checkout: shipped recipes listed, planned, dry-run and copied by name.

Builds the wheel from this checkout, installs it with ``--no-deps`` into a temporary target (the
dependencies come from the running environment), and runs the CLI from a folder outside the repo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args, cwd: Path, env: dict, timeout: int = 300) -> str:
    res = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert res.returncode == 0, f"{args}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    pip = [sys.executable, "-m", "pip", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)], tmp, env)
    (wheel,) = (tmp / "dist").glob("oasst_peft-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], tmp, env)
    env["PYTHONPATH"] = str(tmp / "site")
    outside = tmp / "elsewhere"
    outside.mkdir()
    return outside, env, tmp / "site"


def cli(installed, *args: str) -> str:
    outside, env, _ = installed
    return _run([sys.executable, "-m", "oasst_peft.cli", *args], outside, env)


def test_the_wheel_is_what_runs(installed):
    outside, env, site = installed
    where = _run([sys.executable, "-c", "import oasst_peft; print(oasst_peft.__file__)"], outside, env)
    assert where.strip().startswith(str(site))
    shipped = site / "oasst_peft" / "recipes"
    assert (shipped / "stablelm7b-qlora.yaml").is_file() and not shipped.is_symlink()
    assert (shipped / "base_models" / "stabilityai__stablelm-base-alpha-7b" / "config.json").is_file()
    assert (shipped / "data" / "demo-oasst.jsonl").is_file()


def test_recipes_plan_dry_run_and_copy_by_name(installed):
    outside = installed[0]
    listing = cli(installed, "recipes")
    for name in ("demo-smollm2", "stablelm7b-qlora", "pythia12b-sft4", "bloom-zh-3b-lora"):
        assert name in listing
    assert "qlora" in listing and "stabilityai/stablelm-base-alpha-7b" in listing
    assert "7.869 B parameters" in cli(installed, "plan", "stablelm7b-qlora", "--gpu-mem", "24")
    dry = cli(installed, "train", "stablelm7b-qlora", "--dry-run")
    assert "dry run: nothing was trained or written" in dry and "stablelm-base-alpha-7b" in dry
    cli(installed, "recipes", "copy", "stablelm7b-qlora", "mine.yaml")
    copy = outside / "mine.yaml"
    assert copy.is_file() and "extends:" in copy.read_text()
    assert "7.869 B parameters" in cli(installed, "plan", str(copy), "--gpu-mem", "24")
    cli(installed, "recipes", "copy", "demo-smollm2", "demo.yaml")
    demo = cli(installed, "data", "stats", "demo.yaml", "--json")
    assert '"train"' in demo or "train" in demo
