"""``oasst-peft --help``, a recipe typo and a wrong path answer without importing torch, transformers, TRL or peft.

Each check runs in a fresh interpreter (pytest's own process has long imported torch); the timing
against ``from trl import SFTTrainer`` is benchmarks/cli_startup.py's job, not a unit test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "datasets")

PROBE = """
import json, sys
from oasst_peft.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
import os
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules],
                  "openblas": os.environ.get("OPENBLAS_NUM_THREADS")}), file=sys.__stdout__)
"""


def _probe(*argv: str, **env_vars: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env_vars}
    if (
        "OPENBLAS_NUM_THREADS" not in env_vars
    ):  # what the CLI sets on its own, whatever the caller's shell has
        env.pop("OPENBLAS_NUM_THREADS", None)
    res = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,), *argv], env=env, capture_output=True, text=True, timeout=60
    )
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "stderr": res.stderr}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["merge", "--help"], []])
def test_help_imports_no_heavy_library(argv):
    got = _probe(*argv)
    assert got["code"] in (0, 2) and got["heavy"] == [], got


def test_a_recipe_typo_fails_without_importing_torch(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name: some/model\ndatasets: [dolly15k]\nlearning_rat: 1.0e-5\n")
    got = _probe("train", str(recipe))
    assert got["code"] == 1 and got["heavy"] == [], got
    assert "did you mean 'learning_rate'" in got["stderr"]


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "{missing}"],
        ["sample", "{missing}", "--config", "greddy"],
        ["chat", "{missing}"],
        ["merge", "{missing}", "--out", "{tmp}/out"],
        ["export", "{missing}", "--gguf", "{tmp}/m.gguf"],
        ["sample", "{tmp}", "--adapter", "{missing}"],
    ],
    ids=["sample", "sample-config", "chat", "merge", "export", "adapter"],
)
def test_a_wrong_path_or_name_fails_before_the_heavy_imports(argv, tmp_path):
    """A typo costs a fraction of a second, not the 2-6 s of importing torch and transformers first."""
    missing = str(tmp_path / "no-such-run")
    got = _probe(*(a.format(missing=missing, tmp=tmp_path) for a in argv))
    assert got["code"] in (1, 2) and got["heavy"] == [], got
    assert len(got["stderr"].strip().splitlines()) == 1, got["stderr"]
    assert "no-such-run" in got["stderr"] or "greddy" in got["stderr"], got["stderr"]


def test_numpys_unused_blas_threads_are_off_unless_the_user_set_them():
    """torch imports numpy, whose OpenBLAS pool spins on the cores a merge or training needs."""
    assert _probe("--help")["openblas"] == "1"
    assert _probe("--help", OPENBLAS_NUM_THREADS="4")["openblas"] == "4"


def test_merge_tools_stays_lazy_and_keeps_its_names():
    code = (
        "import sys, merge_tools\n"
        "from merge_tools import MergeError\n"
        "assert 'torch' not in sys.modules\n"
        "import merge_tools.merge as submodule_first\n"
        "from merge_tools import merge, format_report, MergeReport, consolidate_zero_checkpoint\n"
        "assert callable(merge) and merge.__module__ == 'merge_tools.merge', merge\n"
        "assert merge_tools.merge is merge\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
