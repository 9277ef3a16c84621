"""Recipes: every shipped recipe validates; extends, --set, and one-line errors for bad recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from oasst_peft.cli import main
from oasst_peft.config import apply_override, load_recipe, recipe_from_dict
from oasst_peft.errors import OasstError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
MINIMAL = "model_name: some/model\ndatasets: [alpaca]\n"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_shipped_recipes_exist():
    names = {p.stem for p in RECIPES}
    for seed in ("pythia12b-sft1", "pythia12b-sft4", "stablelm7b", "bloom-zh-3b"):
        assert {seed, f"{seed}-lora", f"{seed}-qlora"} <= names
    assert "demo-smollm2" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.datasets
    if path.stem.endswith("-qlora"):
        assert r.mode == "qlora"
    elif path.stem.endswith("-lora"):
        assert r.mode == "lora"


def test_seed_recipes_carry_the_card_hyperparameters():
    sft7 = load_recipe(RECIPES[0].parent / "stablelm7b.yaml")
    assert (sft7.max_length, sft7.per_device_train_batch_size, sft7.gradient_accumulation_steps) == (
        4096,
        4,
        2,
    )
    assert (sft7.deepspeed_config, sft7.learning_rate, sft7.num_train_epochs) == ("zero2", 1e-5, 4)
    names = [next(iter(d)) if isinstance(d, dict) else d for d in sft7.datasets]
    assert names == ["oasst_export", "vicuna", "dolly15k", "grade_school_math_instructions", "code_alpaca"]
    bloom = load_recipe(RECIPES[0].parent / "bloom-zh-3b.yaml")
    assert (bloom.deepspeed_config, bloom.learning_rate, bloom.max_length) == ("zero3", 8e-6, 5120)
    sft4 = load_recipe(RECIPES[0].parent / "pythia12b-sft4.yaml")
    assert (sft4.residual_dropout, sft4.use_flash_attention, sft4.num_train_epochs) == (0.2, True, 8)


def test_extends_and_later_keys_win(tmp_path):
    write(tmp_path, MINIMAL + "learning_rate: 1.0e-5\npeft: {mode: lora, r: 8}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\npeft: {r: 32}\nmax_length: 1024\n")
    r = load_recipe(child)
    assert (r.learning_rate, r.max_length, r.peft.r, r.peft.mode) == (1e-5, 1024, 32, "lora")
    assert "extends" not in r.to_dict()


def test_extends_from_another_folder_keeps_the_parents_relative_paths(tmp_path):
    """A parent recipe's relative paths mean relative to the parent, wherever the child lives."""
    from oasst_peft.data import parse_datasets

    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "convs.jsonl").write_text("{}\n")
    (shared / "ds.json").write_text("{}")
    (shared / "tiny-model").mkdir()
    write(
        shared,
        "model_name: tiny-model\ndeepspeed_config: ds.json\nchat_template: oasst\n"
        "datasets:\n  - chat: {data_files: data/convs.jsonl, format: messages}\n  - alpaca\n",
        "base.yaml",
    )
    (tmp_path / "me").mkdir()
    child = write(tmp_path / "me", "extends: ../shared/base.yaml\nlearning_rate: 1.0e-5\n")
    r = load_recipe(child)
    assert Path(r.model_name) == shared / "tiny-model" and Path(r.deepspeed_config) == shared / "ds.json"
    assert r.chat_template == "oasst"  # not a path
    spec = parse_datasets(r.datasets, r.recipe_dir)[0]
    assert [Path(f).resolve() for f in spec.data_files] == [(shared / "data" / "convs.jsonl").resolve()]
    # What the child writes itself stays relative to the child.
    own = write(
        tmp_path / "me",
        "extends: ../shared/base.yaml\ndatasets: [{chat: {data_files: mine.jsonl, format: messages}}]\n",
    )
    spec = parse_datasets(load_recipe(own).datasets, load_recipe(own).recipe_dir)[0]
    assert [Path(f) for f in spec.data_files] == [tmp_path / "me" / "mine.jsonl"]


def test_extends_cycle_is_one_line(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(OasstError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


def test_set_overrides_are_typed(tmp_path):
    p = write(tmp_path, MINIMAL)
    r = load_recipe(p, ["peft.r=32", "peft.mode=qlora", "learning_rate=2e-4", "gradient_checkpointing=true"])
    assert (r.peft.r, r.mode, r.learning_rate, r.gradient_checkpointing) == (32, "qlora", 2e-4, True)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("learning_rat=1", "did you mean 'learning_rate'"),
        ("peft.alpah=4", "did you mean 'alpha'"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_set_is_one_line(tmp_path, override, needle):
    with pytest.raises(OasstError, match=needle):
        load_recipe(write(tmp_path, MINIMAL), [override])


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("learning_rat: 1.0e-5\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("peft: {mode: lora, alpah: 16}\n", "unknown key 'peft.alpah' (did you mean 'alpha'?)"),
        ("peft: {mode: lora, r: 0}\n", "peft.r: must be > 0"),
        ("peft: {mode: xyz}\n", "peft.mode"),
        ("learning_rate: 10\n", "learning_rate: must be > 0 and < 1"),
        ("max_length: 3\n", "max_length: must be >= 16"),
        ("per_device_train_batch_size: 0\n", "per_device_train_batch_size: must be >= 1"),
        ("dtype: fp8\n", "dtype"),
        ("deepspeed_config: zero4\n", "did you mean"),
        ("max_length: many\n", "max_length"),
    ],
)
def test_bad_values_are_one_line(tmp_path, extra, needle):
    p = write(tmp_path, MINIMAL + extra)
    with pytest.raises(OasstError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg and str(p) in msg


def test_missing_required_key(tmp_path):
    with pytest.raises(OasstError, match="missing required key 'datasets'"):
        load_recipe(write(tmp_path, "model_name: x\n"))


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "model_name: x\ndatasets: [a\nfoo: : bar\n")
    with pytest.raises(OasstError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = write(tmp_path, "model_name: !!python/object/apply:os.system ['echo pwned']\ndatasets: [a]\n")
    with pytest.raises(OasstError, match="invalid YAML"):
        load_recipe(p)


def test_missing_and_empty_and_non_mapping(tmp_path):
    with pytest.raises(OasstError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(OasstError, match="empty"):
        load_recipe(write(tmp_path, "\n"))
    with pytest.raises(OasstError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_non_utf8_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"model_name: \xff\xfe\ndatasets: [a]\n")
    with pytest.raises(OasstError, match="UTF-8"):
        load_recipe(p)


def test_paths_resolve_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    r = load_recipe(write(tmp_path / "sub", MINIMAL))
    assert r.resolve_path("data/x.jsonl") == tmp_path / "sub" / "data" / "x.jsonl"


def test_peft_mode_full_means_full():
    r = recipe_from_dict({"model_name": "x", "datasets": ["a"], "peft": {"mode": "full"}})
    assert r.mode == "full"


def test_apply_override_creates_sections():
    data = {"model_name": "x"}
    apply_override(data, "peft.r=4")
    assert data["peft"] == {"r": 4}


def test_cli_bad_recipe_is_one_line_exit_1(tmp_path, capsys):
    p = write(tmp_path, MINIMAL + "learning_rat: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", str(p), "--dry-run"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'learning_rate'" in err and "Traceback" not in err


def test_cli_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    "text,message",
    [
        ("base_model: x\ndatasets: [alpaca]\n", "unknown key 'base_model' (here it is model_name)"),
        ("model_name: x\ndatasets: [alpaca]\nlora_r: 8\n", "unknown key 'lora_r' (here it is peft.r)"),
        (
            "model_name: x\ndatasets: [alpaca]\npeft: {rank: 8}\n",
            "unknown key 'peft.rank' (here it is peft.r)",
        ),
        (
            "model_name: x\ndatasets: [alpaca]\nsequence_len: 8\n",
            "unknown key 'sequence_len' (here it is max_length)",
        ),
        ("model_name: x\ndatasets: [alpaca]\nlearnig_rate: 1\n", "(did you mean 'learning_rate'?)"),
    ],
)
def test_other_trainers_key_names_point_at_ours(tmp_path, text, message):
    with pytest.raises(OasstError) as e:
        load_recipe(write(tmp_path, text))
    assert str(e.value).startswith(str(tmp_path / "r.yaml")) and str(e.value).endswith(message)


def test_every_alias_names_a_real_key():
    from oasst_peft import key_aliases
    from oasst_peft.config import PEFT_KEYS, RECIPE_KEYS

    for alias, target in key_aliases.TOP_LEVEL.items():
        assert alias not in RECIPE_KEYS
        first = target.split()[0].rstrip(":")
        if first == "nothing":
            continue
        if first.startswith("peft."):
            assert first.removeprefix("peft.") in PEFT_KEYS, alias
        else:
            assert first in RECIPE_KEYS or first == "val_split", alias
    for alias, target in key_aliases.PEFT.items():
        assert alias not in PEFT_KEYS and target.split()[0].rstrip(":") in PEFT_KEYS, alias


def test_set_paths_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    """A path typed with --set means relative to where the command runs, even for a shipped recipe."""
    from oasst_peft.data import parse_datasets

    monkeypatch.chdir(tmp_path)
    r = load_recipe("demo-smollm2", ["datasets=[{chat: {data_files: mine.jsonl, format: messages}}]"])
    spec = parse_datasets(r.datasets, r.recipe_dir)[0]
    assert [Path(f) for f in spec.data_files] == [tmp_path / "mine.jsonl"]
    with pytest.raises(
        OasstError, match=r"--set datasets.0.chat.max_train_set: datasets is a list, set it whole"
    ):
        load_recipe("demo-smollm2", ["datasets.0.chat.max_train_set=3"])


def test_an_unknown_key_in_a_parent_recipe_names_the_parent(tmp_path):
    write(tmp_path, MINIMAL + "learning_rat: 1.0e-5\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nmax_length: 1024\n", "child.yaml")
    with pytest.raises(OasstError) as e:
        load_recipe(child)
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}: unknown key 'learning_rat'")
    own = write(tmp_path, "extends: base.yaml\nmax_lenght: 1024\n", "own.yaml")  # the child's own typo first
    with pytest.raises(OasstError, match=r"own\.yaml: unknown key 'max_lenght'"):
        load_recipe(own)


def test_a_bad_value_in_a_parent_recipe_names_the_parent_unless_the_child_sets_it(tmp_path):
    write(tmp_path, MINIMAL + "learning_rate: fast\npeft: {mode: lora, r: -4}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nmax_length: 1024\n", "child.yaml")
    with pytest.raises(OasstError) as e:
        load_recipe(child)
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}: learning_rate: ")
    fixed = write(tmp_path, "extends: base.yaml\nlearning_rate: 1.0e-5\n", "fixed.yaml")
    with pytest.raises(OasstError) as e:  # the section merges: peft.r still comes from the parent
        load_recipe(fixed)
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}: peft.r: ")
    own = write(tmp_path, "extends: base.yaml\nlearning_rate: slow\npeft: {r: 0}\n", "own.yaml")
    with pytest.raises(OasstError) as e:
        load_recipe(own)
    assert str(e.value).startswith(f"{own}: learning_rate: ")


def test_a_cross_key_error_names_where_the_value_came_from(tmp_path, monkeypatch):
    write(tmp_path, MINIMAL + "deepspeed_config: zero9\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nmax_length: 1024\n", "child.yaml")
    with pytest.raises(OasstError) as e:
        load_recipe(child)
    assert str(e.value).startswith(f"{tmp_path / 'base.yaml'}: deepspeed_config: 'zero9' is neither")
    with pytest.raises(OasstError) as e:
        load_recipe("demo-smollm2", ["deepspeed_config=zero9"])
    assert str(e.value).startswith(
        "--set deepspeed_config: 'zero9' is neither"
    ) and "did you mean 'zero3'" in str(e.value)


def test_a_path_typed_with_set_is_relative_to_the_current_folder_even_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe("demo-smollm2", ["deepspeed_config=./missing.json", "chat_template=mine.jinja"])
    assert r.deepspeed_config == str(tmp_path / "missing.json")
    assert r.chat_template == str(tmp_path / "mine.jinja")
    hub = load_recipe("demo-smollm2", ["model_name=org/name", "deepspeed_config=zero2"])
    assert (hub.model_name, hub.deepspeed_config) == ("org/name", "zero2")  # a hub id, a shipped name
