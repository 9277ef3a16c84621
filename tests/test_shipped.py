"""Shipped package data by name: DeepSpeed JSONs, base-model configs and recipes (list, by name, copy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oasst_peft import shipped
from oasst_peft.cli import app, main
from oasst_peft.config import load_recipe
from oasst_peft.errors import OasstError

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_live_in_the_package_and_recipes_is_their_one_source():
    assert shipped.RECIPES_DIR.parent == Path(shipped.__file__).resolve().parent
    assert shipped.RECIPES_DIR.resolve() == (ROOT / "recipes").resolve()
    assert sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")) == shipped.recipe_names()


def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    assert shipped.find_recipe("stablelm7b-qlora") == shipped.RECIPES_DIR / "stablelm7b-qlora.yaml"
    assert shipped.find_recipe("stablelm7b-qlora.yaml") == shipped.RECIPES_DIR / "stablelm7b-qlora.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stablelm7b-qlora.yaml").write_text("model_name: mine\ndatasets: [alpaca]\n")
    assert shipped.find_recipe("stablelm7b-qlora.yaml") == Path("stablelm7b-qlora.yaml")
    with pytest.raises(OasstError, match="did you mean 'stablelm7b-qlora'"):
        shipped.find_recipe("stablelm7b-qlor")


def test_python_api_loads_a_shipped_recipe_by_name_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a checkout: no recipes/ folder here
    recipe = load_recipe("demo-smollm2", ["max_steps=10"])
    assert recipe.max_steps == 10
    assert recipe.recipe_path == (shipped.RECIPES_DIR / "demo-smollm2.yaml").resolve()
    with pytest.raises(OasstError, match="no such recipe file or shipped recipe"):
        load_recipe("demo-smolm2")


def test_python_m_oasst_peft_is_the_command(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "oasst_peft", "recipes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo-smollm2" in proc.stdout
    from importlib.metadata import version

    proc = subprocess.run(
        [sys.executable, "-m", "oasst_peft", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == f"oasst-peft {version('oasst-peft')}\n"


def test_copy_works_where_it_is_written(tmp_path):
    out = shipped.copy_recipe("demo-smollm2", tmp_path)
    assert out == tmp_path / "demo-smollm2.yaml"
    original, copy = load_recipe(shipped.RECIPES_DIR / "demo-smollm2.yaml"), load_recipe(out)
    same = {k: v for k, v in copy.to_dict().items() if k != "datasets"}
    assert same == {k: v for k, v in original.to_dict().items() if k != "datasets"}
    assert out.read_text().startswith("# The CPU demo")  # comments kept: an editable copy
    data = copy.datasets[0]["oasst_export"]["input_file_path"]
    shipped_data = original.resolve_path(original.datasets[0]["oasst_export"]["input_file_path"])
    assert Path(data).is_absolute() and Path(data).samefile(shipped_data)
    child = shipped.copy_recipe("stablelm7b-qlora", tmp_path / "mine.yaml")
    assert (
        load_recipe(child).to_dict() == load_recipe(shipped.RECIPES_DIR / "stablelm7b-qlora.yaml").to_dict()
    )
    text = child.read_text()  # every key in the file to edit, not a pointer into the installed package
    assert "extends" not in yaml.safe_load(text) and "learning_rate:" in text and "vicuna:" in text
    assert (
        text.startswith("# stablelm7b as QLoRA adapters")
        and "(stablelm7b-lora.yaml, stablelm7b.yaml)" in text
    )
    with pytest.raises(OasstError, match="already exists"):
        shipped.copy_recipe("stablelm7b-qlora", tmp_path / "mine.yaml")


def test_recipes_command_lists_name_model_mode_data_mix_and_description():
    res = CliRunner().invoke(app, ["recipes"], terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    at = next(i for i, line in enumerate(lines) if "stablelm7b-qlora" in line)
    row = lines[at]
    assert "stabilityai/stablelm-base-alpha-7b" in row and "qlora" in row
    assert "QLoRA" in row or "4-bit" in row  # the recipe's first comment line
    rows = [row] + [line for line in lines[at + 1 :] if line.count("│") > 4][:3]
    rows = rows[: 1 + next((i for i, line in enumerate(rows[1:]) if line.split("│")[1].strip()), 3)]
    cells = " ".join(line.split("│")[4] for line in rows)  # the data mix column, wrapped over the row's lines
    assert (
        " ".join(cells.split())
        == "oasst_export, vicuna, dolly15k, grade_school_math_instructions, code_alpaca"
    )
    listed = CliRunner().invoke(app, ["recipes", "list"], terminal_width=200)
    assert listed.exit_code == 0 and listed.output == res.output


def test_every_shipped_recipe_describes_itself_in_one_whole_sentence():
    for name in shipped.recipe_names():
        text = shipped.recipe_description(shipped.RECIPES_DIR / f"{name}.yaml")
        assert text.endswith(".") and len(text) > 20, (name, text)


def test_shipped_deepspeed_and_base_model_lookups():
    assert shipped.deepspeed_config_path("zero3") == shipped.DEEPSPEED_DIR / "zero3.json"
    assert shipped.read_deepspeed("zero3-offload").offload_params
    assert shipped.shipped_model_config("EleutherAI/pythia-12b-deduped").is_file()
    assert set(shipped.DEEPSPEED_NAMES) == {p.stem for p in shipped.DEEPSPEED_DIR.glob("*.json")}


def test_recipes_copy_cli_into_a_new_folder_and_bad_sources(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["recipes", "copy", "demo-smollm2", "newdir/"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "newdir" / "demo-smollm2.yaml").is_file()
    for source, message in [
        (
            "recipes/demo-smollm2.yaml",
            "the shipped recipe of that name is 'demo-smollm2'",
        ),  # outside a checkout
        ("foo/bar.yaml", "foo/bar.yaml: no such recipe file or shipped recipe"),
    ]:
        with pytest.raises(SystemExit) as code:
            main(["recipes", "copy", source, "x.yaml"])
        err = capsys.readouterr().err
        assert code.value.code == 1 and message in err and err.count("\n") == 1, err
    with pytest.raises(OasstError, match="the shipped recipe of that name is 'stablelm7b-qlora'"):
        load_recipe("recipes/stablelm7b-qlora.yaml")


def test_recipes_copy_to_a_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as code:
        main(["recipes", "copy", "demo-smollm2", str(tmp_path / "afile" / "x.yaml")])
    err = capsys.readouterr().err
    assert code.value.code == 1 and "cannot write the copy" in err and err.count("\n") == 1, err


def test_a_copy_of_a_derived_recipe_keeps_unshipped_data_files_relative_to_itself(tmp_path, monkeypatch):
    ship = tmp_path / "ship"
    (ship / "data").mkdir(parents=True)
    (ship / "data" / "small.jsonl").write_text("")
    (ship / "parent.yaml").write_text(
        "# The parent.\nmodel_name: org/model\ndatasets:\n"
        "  - oasst_export: {input_file_path: my-export.jsonl.gz}\n"
        "  - chat: {data_files: data/small.jsonl, format: messages}\n"
    )
    (ship / "child.yaml").write_text("# The child.\nextends: parent.yaml\nlearning_rate: 1.0e-5\n")
    monkeypatch.setattr(shipped, "RECIPES_DIR", ship)
    out = shipped.copy_recipe("child", tmp_path / "mine.yaml")
    data = yaml.safe_load(out.read_text())
    assert out == tmp_path / "mine.yaml" and out.read_text().startswith("# The child.\n")
    assert data["model_name"] == "org/model" and data["learning_rate"] == 1e-5 and "extends" not in data
    assert (
        data["datasets"][0]["oasst_export"]["input_file_path"] == "my-export.jsonl.gz"
    )  # put it beside the copy
    assert data["datasets"][1]["chat"]["data_files"] == str(
        ship.resolve() / "data" / "small.jsonl"
    )  # shipped
