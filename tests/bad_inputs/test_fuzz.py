"""The fuzz harness run through the real CLI: every generated bad input gives one line and writes nothing.

tests/bad_inputs/fuzz.py generates the cases (corrupt variants of every kind of file the project reads, and
bad values for every recipe key). The default suite runs a seeded sample of them in-process through
``oasst_peft.cli.main`` and a few through a real ``python -m oasst_peft.cli`` process; the whole sweep
runs under the ``slow`` marker. Each case must exit 1 or 2, print exactly one line on stderr
(``error: ...``), no traceback, and leave its folder exactly as it was after the corruption.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oasst_peft.cli import main
from tests.bad_inputs import fuzz
from tests.bad_inputs.corpus import ROOT_USER
from tests.bad_inputs.fuzz_targets import DATA, Ws

ROOT = Path(__file__).resolve().parents[2]
QUICK = 20
QUICK_PROCESSES = 3


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if not p.name.endswith(".lock")  # (the cache's lock files: empty, and kept by design)
    }


def _prepare(case: fuzz.Case, shared: dict, tmp_path: Path) -> list[str]:
    if case.skip_as_root and ROOT_USER:
        pytest.skip("root reads a chmod 000 file (test_files.py simulates an unreadable data file)")
    return [str(a) for a in case.build(Ws(tmp_path, shared))]


def _check(case_id: str, code, err: str, before: dict, tmp_path: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), f"{case_id}: exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case_id}: {err[-2000:]}"
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before, f"{case_id}: the failed command wrote something"


def _run_in_process(case: fuzz.Case, shared, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OASST_PEFT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = _prepare(case, shared, tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    _, err = capsys.readouterr()
    _check(case.id, e.value.code, err, before, tmp_path)


@pytest.fixture(scope="module")
def cases(shared) -> list[fuzz.Case]:
    return fuzz.all_cases(shared)


@pytest.fixture(scope="module")
def runnable(cases) -> list[fuzz.Case]:
    """The cases this user can run (root reads a chmod 000 file, so those are left out as root)."""
    return [c for c in cases if not (c.skip_as_root and ROOT_USER)]


@pytest.mark.parametrize("i", range(QUICK))
def test_quick_sample_in_process(i, runnable, shared, tmp_path, capsys, monkeypatch):
    case = fuzz.sample(runnable, QUICK)[i]
    _run_in_process(case, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("i", range(QUICK_PROCESSES))
def test_quick_sample_in_a_real_process(i, runnable, shared, tmp_path):
    case = fuzz.sample(runnable, QUICK_PROCESSES, seed=fuzz.SEED + 1)[i]
    argv = _prepare(case, shared, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OASST_PEFT_DEBUG", None)
    before = _snapshot(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = "\n".join(
        line
        for line in res.stderr.splitlines()
        if not line.startswith("Failed to load CPU gemm_4bit_forward")
    )  # (bitsandbytes 0.50.2 logs that at import on a CPU without `kernels`; not a project line)
    _check(case.id, res.returncode, err, before, tmp_path)


def test_the_harness_covers_every_target_and_corruption(cases):
    ids = {c.id for c in cases}
    targets = {i.split("/")[0] for i in ids}
    for t in (
        "recipe",
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "gguf",
        "deepspeed.json",
        "template.jinja",
        "key",
    ):
        assert t in targets, t
    for fmt in DATA:
        assert f"data-{fmt}" in targets, fmt
    kinds = {i.split("/")[1].split("-")[0] for i in ids if not i.startswith("key/")}
    assert {"empty", "truncated", "random", "directory", "unreadable", "wrong"} <= kinds, kinds
    assert fuzz.sample(cases, QUICK) == fuzz.sample(cases, QUICK), "the sample must be seeded"
    from oasst_peft.config import PEFT_KEYS, RECIPE_KEYS

    keyed = {i.split("/")[1] for i in ids if i.startswith("key/")}
    assert keyed >= {k for k in RECIPE_KEYS if k != "peft"} | {f"peft.{k}" for k in PEFT_KEYS}


@pytest.mark.slow
def test_full_sweep(cases, shared, tmp_path_factory, capsys, monkeypatch):
    """Every case; failures are collected so one run reports them all."""
    failures = []
    for case in cases:
        if case.skip_as_root and ROOT_USER:
            continue
        tmp = tmp_path_factory.mktemp("case")
        try:
            with monkeypatch.context() as m:
                _run_in_process(case, shared, tmp, capsys, m)
        except (AssertionError, Exception) as e:  # noqa: BLE001 - collected and reported below
            failures.append(f"{case.id}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
