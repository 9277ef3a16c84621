"""A merge stopped halfway: killed, terminated or interrupted with Ctrl-C, it leaves no --out behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_tools import merge
from tests.merge.runs import make_base, make_run

ROOT = Path(__file__).resolve().parents[2]
quiet = {"say": lambda _m: None}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-stopped")
    return make_run(root, make_base(root, "gpt_neox"), "neox-lora")


_KILLABLE = """
import sys, time
from pathlib import Path
import merge_tools.produce as plan

original = plan.produce
def slow(*args, **kwargs):
    for chunk in original(*args, **kwargs):
        yield chunk
        Path(sys.argv[3]).touch()
        time.sleep(30)
plan.produce = slow
from merge_tools import merge
merge(sys.argv[1], sys.argv[2], verify=False)
"""


def _paused_merge(run, tmp_path: Path, through_cli: bool = False) -> tuple[subprocess.Popen, Path]:
    """A merge process into ``tmp_path/merged`` that pauses once it has written a chunk; returns (process, out)."""
    out, marker = tmp_path / "merged", tmp_path / "writing"
    script = tmp_path / "killable.py"
    call = "merge(sys.argv[1], sys.argv[2], verify=False)"
    cli = "from oasst_peft.cli import main\nmain(['merge', sys.argv[1], '--out', sys.argv[2], '--no-verify'])"
    script.write_text(_KILLABLE.replace(call, cli) if through_cli else _KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run), str(out), str(marker)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
    )
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-2000:]
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.partial-")]
    assert partial and any(partial[0].glob("model-*.safetensors"))  # it was writing the shard
    return proc, out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_merge_leaves_no_out(run, tmp_path, sig):
    proc, out = _paused_merge(run, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    if sig == signal.SIGTERM:
        assert leftovers == [] and "SIGTERM" in err  # cleaned up on the way out
    else:
        assert leftovers  # a kill cannot clean up ...
        merge(run, out, verify=False, **quiet)  # ... the next merge removes the dead one's temp folder
        assert out.is_dir()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")] == []


def test_ctrl_c_in_cli_merge_says_interrupted_exits_130_and_leaves_nothing(run, tmp_path):
    """typer turns a KeyboardInterrupt into a silent exit 130; the CLI says what happened."""
    proc, out = _paused_merge(run, tmp_path, through_cli=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")] == []
