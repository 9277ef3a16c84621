"""Concurrent writers, with real processes: one tokenized cache shared by several jobs, one run per output dir.

* Several processes tokenize the same mix into one fresh ``cache_dir`` at the same moment (they start
  together on a barrier file): all succeed, all get the same rows, and the cache holds exactly one
  complete entry, no temp folder, and reloads warm with the same rows.
* A second ``train`` on an output dir whose lock a live process holds is refused with one line that
  names the holder; the output dir is untouched. A lock left by a ``kill -9``-ed holder is stale and
  the next run takes it. A failed run releases its lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oasst_peft import locks
from oasst_peft.cli import main
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ROOT = Path(__file__).resolve().parent.parent
# bitsandbytes 0.50.2 logs this at import on a CPU without the `kernels` package (not our line).
BNB_NOISE = "Failed to load CPU gemm_4bit_forward"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

TOKENIZE = """
import hashlib, json, sys, time
from pathlib import Path
from oasst_peft.data import load_mix, parse_datasets, tokenize_mix
from oasst_peft.template import setup_tokenizer
from tests.tiny import make_tokenizer

data, cache, go = sys.argv[1:4]
tok = make_tokenizer("neox")
setup_tokenizer(tok)
mix = load_mix(parse_datasets([{"chat": {"data_files": data, "format": "messages"}}], "."), seed=1)
while not Path(go).exists():  # every process is imported and ready: start together
    time.sleep(0.01)
t = tokenize_mix(mix, tok, max_length=64, cache_dir=cache)
rows = [list(r) for r in t.train["input_ids"]] + [list(r) for r in t.train["assistant_masks"]]
print(json.dumps({"digest": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
                  "warm": t.from_cache, "n": len(t.train)}))
"""


def _spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_concurrent_tokenizers_share_one_fresh_cache(tmp_path):
    data = write_conversations(tmp_path / "convs.jsonl", n=600)
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [_spawn(TOKENIZE, data, cache, go) for _ in range(3)]
    time.sleep(8.0)  # imports done (they take a few seconds), each process waits on the barrier
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["digest"] for r in results}) == 1, results
    assert {r["n"] for r in results} == {570}  # 600 conversations, 5% held out for validation
    entries = [p for p in (cache / "tokenized").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file(), entries
    assert not list((cache / "tokenized").glob(".tmp-*")), "a temp folder was left behind"
    again = _spawn(TOKENIZE, data, cache, go)
    out, err = again.communicate(timeout=300)
    warm = json.loads(out.strip().splitlines()[-1])
    assert warm == {**results[0], "warm": True}


HOLD = """
import sys, time
from pathlib import Path
from oasst_peft import locks
locks.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def _recipe(tmp_path: Path, out: Path) -> Path:
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl")
    return write_recipe(tmp_path / "recipe.yaml", recipe_dict(base, data, out, tmp_path / "cache"))


def test_a_second_run_on_a_locked_output_dir_is_refused_then_a_killed_holder_is_stale(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _spawn(HOLD, out)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        recipe = _recipe(tmp_path, out)
        capsys.readouterr()  # (the base's save progress bar)
        with pytest.raises(SystemExit) as e:
            main(["train", str(recipe), "--max-steps", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: output_dir: {out} is in use by another run (pid {holder.pid} on ")
        assert "choose another --output-dir" in err
        assert not out.exists(), "the refused run wrote into the output dir"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stale = locks.lock_path(out)
    assert json.loads(stale.read_text())["pid"] == holder.pid  # the killed holder left its file
    taken = locks.acquire(out)  # ... but not its lock
    assert taken == stale and json.loads(stale.read_text())["pid"] == os.getpid()
    locks.release(taken)
    assert not stale.exists()


def test_a_failed_run_releases_its_lock(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out)
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"a finished run")
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--max-steps", "1"])
    assert "already holds a run" in capsys.readouterr().err
    assert not locks.lock_path(out).exists()
    taken = locks.acquire(out)
    assert taken is not None
    locks.release(taken)


@pytest.mark.slow
def test_two_real_train_runs_on_one_output_dir(tmp_path):
    """The holder is a real ``oasst-peft train`` this time, refused mid-run; once it ends, the lock is free."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out)
    cli = [sys.executable, "-m", "oasst_peft.cli", "train", str(recipe)]
    first = subprocess.Popen(
        [*cli, "--max-steps", "400"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not locks.lock_path(out).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert locks.lock_path(out).exists(), "the first run never took its lock"
        second = subprocess.run(
            [*cli, "--max-steps", "1", "--output-dir", str(out)], env=ENV, capture_output=True, text=True
        )
        assert second.returncode == 1, second.stderr
        lines = [line for line in second.stderr.splitlines() if not line.startswith(BNB_NOISE)]
        assert len(lines) == 1 and f"is in use by another run (pid {first.pid} on " in lines[0], lines
    finally:
        first.send_signal(signal.SIGINT)  # a graceful stop: the run saves a checkpoint and exits
        first.wait(timeout=300)
    assert not locks.lock_path(out).exists(), "the lock outlived its run"
