"""Bad recipes through the real CLI: YAML, unknown and misspelled keys, wrong types, absurd values, extends."""

from __future__ import annotations

import pytest

from oasst_peft.cli import main
from tests.bad_inputs.corpus import Corpus, registry, run_case

CASES, case = registry()


@case("malformed-yaml", "recipe.yaml:3: invalid YAML")
def _(c):
    return c.train(c.text_recipe("model_name: x\ndatasets: [a, b\nlearning_rate: 1e-5\n"))


@case("yaml-python-tag", "invalid YAML", "could not determine a constructor")
def _(c):
    return c.train(
        c.text_recipe("model_name: !!python/object/apply:os.system ['touch pwned']\ndatasets: [a]\n")
    )


@case("empty-recipe", "recipe is empty", "model_name and datasets")
def _(c):
    return c.train(c.text_recipe("# nothing yet\n"))


@case("unknown-key", "recipe.yaml: unknown key 'shuffle_buffer'")
def _(c):
    return c.train(c.recipe(shuffle_buffer=1000))


@case("misspelled-key", "unknown key 'learning_rat'", "(did you mean 'learning_rate'?)")
def _(c):
    return c.train(c.recipe(learning_rat=1e-5))


@case("misspelled-peft-key", "unknown key 'peft.alpah'", "(did you mean 'alpha'?)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "alpah": 16}))


@case("misspelled-set", "--set peft.alhpa: unknown key 'alhpa' in peft", "(did you mean 'alpha'?)")
def _(c):
    return c.train(c.recipe(), "--set", "peft.alhpa=16")


@case("set-absurd-value", "error: --set learning_rate: must be > 0 and < 1", "(got 10)")
def _(c):
    return c.train(c.recipe(), "--set", "learning_rate=10")  # blamed on --set, not on the recipe file


@case("wrong-type-int", "max_length", "valid integer", "(got 'many')")
def _(c):
    return c.train(c.recipe(max_length="many"))


@case("wrong-type-list", "datasets", "valid list", "(got 5)")
def _(c):
    return c.train(c.recipe(datasets=5))


@case("wrong-type-section", "peft", "(got 'lora')")
def _(c):
    return c.train(c.recipe(peft="lora"))


@case("wrong-type-nested", "peft.r", "valid integer", "(got 'sixteen')")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "r": "sixteen"}))


@case("missing-required-key", "missing required key 'datasets'")
def _(c):
    return c.train(c.text_recipe(f"model_name: {c.base}\n"))


@case("absurd-lr-10", "learning_rate: must be > 0 and < 1", "(got 10)")
def _(c):
    return c.train(c.recipe(learning_rate=10))


@case("absurd-r-0", "peft.r: must be > 0", "(got 0)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "r": 0}))


@case("absurd-max-length-3", "max_length: must be >= 16", "(got 3)")
def _(c):
    return c.train(c.recipe(max_length=3))


@case("absurd-batch-0", "per_device_train_batch_size: must be >= 1", "(got 0)")
def _(c):
    return c.train(c.recipe(per_device_train_batch_size=0))


@case("absurd-dropout", "peft.dropout: must be in [0, 1)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "dropout": 1.5}))


@case(
    "lora-target-typo",
    "peft.target_modules: 'dense_h_to_4x' matches no module",
    "(did you mean 'dense_h_to_4h'?)",
)
def _(c):  # one good name does not hide a mistyped one
    return c.train(c.recipe(peft={"mode": "lora", "target_modules": ["query_key_value", "dense_h_to_4x"]}))


@case("lora-target-string", "the string 'query_key_value' is a regular expression", "[query_key_value]")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "target_modules": "query_key_value"}))


@case("lora-target-not-linear", "a GPTNeoXMLP, which LoRA cannot adapt", "dense_4h_to_h, dense_h_to_4h")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "target_modules": ["mlp"]}))


@case("missing-recipe", "nope.yaml: recipe file not found", "oasst-peft recipes")
def _(c):
    return c.train(c.tmp / "nope.yaml")


@case("non-utf8-recipe", "not UTF-8 text", "save the recipe as UTF-8")
def _(c):
    path = c.tmp / "recipe.yaml"
    path.write_bytes(b"model_name: caf\xe9\ndatasets: [a]\n")
    return c.train(path)


@case("extends-loop", "'extends' loops back on itself")
def _(c):
    (c.tmp / "a.yaml").write_text("extends: b.yaml\n")
    (c.tmp / "b.yaml").write_text("extends: a.yaml\n")
    return c.train(c.tmp / "a.yaml")


@pytest.mark.parametrize("name", list(CASES))
def test_case(name, shared, tmp_path, monkeypatch, capsys):
    run_case(CASES[name], Corpus(tmp_path, shared), monkeypatch, capsys)


def test_debug_shows_the_traceback(tmp_path, shared):
    c = Corpus(tmp_path, shared)
    from oasst_peft.errors import OasstError

    with pytest.raises(OasstError, match="unknown key 'learning_rat'"):
        main([str(a) for a in c.train(c.recipe(learning_rat=1e-5))] + ["--debug"])


def test_an_error_message_with_a_line_break_is_printed_on_one_line(monkeypatch, capsys):
    """The last guard: whatever a message quotes, stderr gets exactly one line."""
    import oasst_peft.cli as cli
    from oasst_peft.errors import OasstError

    def broken(*_a, **_k):
        raise OasstError("datasets: bad value 'a\nb'\r\nfix it")

    monkeypatch.setattr(cli, "recipe_from", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "whatever.yaml"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err == "error: datasets: bad value 'a b' fix it\n"
