"""The corpus of bad inputs: what a case gets, and the one check every case must pass.

Each case runs through the real CLI (``oasst_peft.cli.main``) and must end with exit code 1 and exactly
one line on stderr, ``error: ...``, holding the words that name the file, key or line and what to do; no
traceback; nothing written to the run's output dir; and, for ``train``, neither the model weights loaded
nor a launcher started (both are patched to fail the test if reached). Cases tested elsewhere with their
message are listed again here so the corpus is complete in one folder: ``tests/bad_inputs/test_*.py``
hold the cases by what is wrong (recipes, files, runs) and a disk filling up mid-run.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest

from oasst_peft.cli import main
from tests.tiny_run import recipe_dict, write_recipe

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

Case = namedtuple("Case", "build needles loads_model", defaults=(False,))


class Corpus:
    """What a case needs: a fresh folder, the shared tiny base and data, and a recipe writer."""

    def __init__(self, tmp: Path, shared: dict):
        self.tmp = tmp
        self.base: Path = shared["base"]
        self.data: Path = shared["data"]
        self.cache: Path = shared["cache"]
        self.shared = {**shared}  # a case may add keys (a fault to simulate) for its own run only
        self.run = tmp / "run"  # the output dir of every recipe here: a failed start must not create it

    def recipe(self, name: str = "recipe.yaml", **over) -> Path:
        return write_recipe(self.tmp / name, recipe_dict(self.base, self.data, self.run, self.cache, **over))

    def text_recipe(self, text: str) -> Path:
        path = self.tmp / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    def with_data(self, path: Path) -> Path:
        return self.recipe(
            datasets=[{"chat": {"data_files": str(path), "format": "messages", "val_split": 0.0}}]
        )

    def train(self, recipe: Path, *extra) -> list:
        return ["train", recipe, "--max-steps", "1", *extra]


def registry() -> tuple[dict[str, Case], Callable]:
    """A module's cases and its ``@case(name, *needles, loads_model=False)`` decorator."""
    cases: dict[str, Case] = {}

    def case(name: str, *needles: str, loads_model: bool = False):
        def register(build: Callable[[Corpus], list]):
            cases[name] = Case(build, needles, loads_model)
            return build

        return register

    return cases, case


def shared_world(tmp: Path) -> dict:
    """The tiny base, data and a second base of the same shapes (other weights), built once per folder."""
    from tests.merge.runs import bad_input_world, make_base

    return {
        **bad_input_world(tmp),
        "cache": tmp / "cache",
        "other_base": make_base(tmp, "gpt_neox", seed=7),
    }


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_case(case: Case, c: Corpus, monkeypatch, capsys) -> None:
    """Build the case's command line, run it through the CLI and check the one-line contract."""
    build, needles, loads_model = case
    shared = c.shared

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    def no_launcher(*args, **kwargs):
        raise AssertionError("a launcher started before the bad input was found")

    if not loads_model:
        monkeypatch.setattr("oasst_peft.model.load_model", no_weights)
    monkeypatch.setattr("oasst_peft.launch.run_launcher", no_launcher)
    monkeypatch.delenv("OASST_PEFT_DEBUG", raising=False)

    argv = [str(a) for a in build(c)]
    if "unreadable" in shared:
        if not ROOT_USER:
            assert not os.access(shared["unreadable"], os.R_OK)
        else:  # root reads anything: make opening this one file fail as a chmod 000 would
            import builtins

            real_open = builtins.open
            target = str(shared["unreadable"])

            def guarded_open(file, *args, **kwargs):
                if str(file) == target:
                    raise PermissionError(errno.EACCES, "Permission denied", target)
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr("oasst_peft.data.readers.open", guarded_open, raising=False)
    if "disk_free" in shared:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**12, 10**12, shared["disk_free"]))
    if shared.get("cache_enospc"):
        import datasets

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)

    if "cwd" in shared:
        monkeypatch.chdir(shared["cwd"])
    if "hide_module" in shared:  # as if that optional package were not installed
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == shared["hide_module"] else find_spec(name, *a),
        )

    before = snapshot(c.run)
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    assert snapshot(c.run) == before, "a failed start wrote into the output dir"
    assert not list(c.tmp.glob(".run.partial-*")), "a failed merge left its temp folder"
