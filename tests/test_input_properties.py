"""Property tests: random recipes and random conversations fed to the validators, converters and tokenizer.

Whatever comes in, what comes out is a validated recipe, conversations, tokenized rows, or one
``OasstError`` whose message is one line; never another exception. (Random Open-Assistant message
trees have their own properties in tests/data/test_export_properties.py.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oasst_peft.config import PEFT_KEYS, RECIPE_KEYS, Recipe, load_recipe, recipe_from_dict
from oasst_peft.data import check_conversation, load_mix, parse_datasets
from oasst_peft.data.mix import Mix
from oasst_peft.data.tokenize import tokenize_mix
from oasst_peft.errors import OasstError
from oasst_peft.template import setup_tokenizer
from tests.tiny import make_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        ["lora", "qlora", "full", "fp16", "bf16", "zero2", "zero3", "oasst", "all-linear", "1e-4"]
    ),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)
KEYS = st.one_of(
    st.sampled_from(RECIPE_KEYS),
    st.sampled_from(RECIPE_KEYS),
    st.text(max_size=12),
    st.sampled_from(["learning_rat", "lr", "peft_r", "epochs", "extends"]),
    st.integers(),
)
PEFT = st.dictionaries(
    st.one_of(st.sampled_from(PEFT_KEYS), st.sampled_from(PEFT_KEYS), st.text(max_size=6)), JUNK, max_size=4
)
VALID = {"model_name": "some/model", "datasets": ["dolly15k"]}


def _check(fn):
    """Run ``fn``: a Recipe, or one OasstError of one line; anything else fails the property."""
    try:
        result = fn()
    except OasstError as e:
        assert "\n" not in str(e), str(e)
        return None
    assert isinstance(result, Recipe)
    return result


@SETTINGS
@given(
    start_valid=st.booleans(),
    updates=st.dictionaries(KEYS, JUNK, max_size=5),
    peft=st.one_of(st.none(), PEFT, JUNK),
    drop=st.lists(st.sampled_from(sorted(VALID)), max_size=2),
)
def test_random_recipe_dicts_validate_or_raise_one_line(start_valid, updates, peft, drop):
    data = dict(VALID) if start_valid else {}
    data.update(updates)
    if peft is not None:
        data["peft"] = peft
    for k in drop:
        data.pop(k, None)
    recipe = _check(lambda: recipe_from_dict(data))
    if recipe is not None:  # what validates also round-trips through its saved YAML
        assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


YAML_TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.tuples(
            st.sampled_from([*RECIPE_KEYS, "peft", "extends", "- ", "  r", "bad key"]), st.text(max_size=10)
        ),
        max_size=6,
    ).map(lambda kvs: "".join(f"{k}: {v}\n" for k, v in kvs)),
    st.sampled_from(
        [
            "model_name: x\ndatasets: [a\n",
            "model_name: !!python/object/apply:os.system ['true']\n",
            "? [a, b]\n: 1\n",
            'extends: "a\\0b"\nmodel_name: x\ndatasets: [a]\n',
            "extends: [1, 2]\n",
            "extends: /\n",
            "extends: recipe.yaml\n",
            "&a [*a]\n",
            "model_name: x\ndatasets: [a]\npeft: {mode: lora, r: 1e400}\n",
            "\ufeffmodel_name: x\ndatasets: [a]\n",
        ]
    ),
)


@SETTINGS
@given(text=YAML_TEXT, overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_yaml_text_and_overrides_load_or_raise_one_line(text, overrides):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check(lambda: load_recipe(path, overrides))


@SETTINGS
@given(data=st.dictionaries(KEYS, JUNK, max_size=5), peft=st.one_of(st.none(), PEFT))
def test_random_recipes_through_yaml_files(data, peft):
    data = {**VALID, **{k: v for k, v in data.items() if k != "extends"}}
    if peft is not None:
        data["peft"] = peft
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        _check(lambda: load_recipe(path))


DATASET_NAMES = st.sampled_from(["dolly15k", "vicuna", "oasst_export", "alpaca", "mine", "wmt2019_zh-en", ""])
DATASET_OPTIONS = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [
                "val_split",
                "max_val_set",
                "fraction",
                "data_files",
                "format",
                "lang",
                "top_k",
                "context",
                "on_error",
            ]
        ),
        st.text(max_size=6),
    ),
    JUNK,
    max_size=4,
)
ENTRIES = st.one_of(
    DATASET_NAMES,
    st.dictionaries(DATASET_NAMES, st.one_of(st.none(), DATASET_OPTIONS, JUNK), min_size=1, max_size=1),
    JUNK,
)


@SETTINGS
@given(entries=st.one_of(st.lists(ENTRIES, max_size=4), JUNK))
def test_random_dataset_entries_parse_or_raise_one_line(entries):
    try:
        specs = parse_datasets(entries, Path("/nonexistent"))
    except OasstError as e:
        assert "\n" not in str(e)
        return
    assert specs and len({s.key for s in specs}) == len(specs)


# ------------------------------------------------------------------ conversations to tokens

ROLES = st.sampled_from(["user", "assistant", "system", "prompter", "human", "gpt", "bot", "tool", ""])
CONTENT = st.one_of(
    st.text(max_size=30), st.text(max_size=30), st.none(), st.integers(), st.lists(st.text(max_size=3))
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": CONTENT}),
    st.fixed_dictionaries({"role": ROLES, "content": CONTENT}),
    st.fixed_dictionaries({"role": ROLES}),
    JUNK,
)
MESSAGES_ROWS = st.lists(
    st.one_of(
        st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=6)}),
        st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=6)}),
        st.dictionaries(st.text(max_size=8), JUNK, max_size=2),
        JUNK,
    ),
    min_size=1,
    max_size=8,
)
SHAREGPT_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "conversations": st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "from": st.sampled_from(["human", "gpt", "system", "bing", "alien", ""]),
                            "value": CONTENT,
                        }
                    ),
                    max_size=6,
                ),
                JUNK,
            )
        }
    ),
    min_size=1,
    max_size=8,
)
ALPACA_ROWS = st.lists(
    st.fixed_dictionaries({"instruction": CONTENT, "input": CONTENT, "output": CONTENT}),
    min_size=1,
    max_size=8,
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    return tok


def _load_rows(rows: list, fmt: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        specs = parse_datasets([{"mine": {"data_files": str(path), "format": fmt, "val_split": 0.25}}], d)
        return load_mix(specs, seed=0)


def _tokenize_checked(mix: Mix, tok, max_length: int, policy: str):
    try:
        tokenized = tokenize_mix(mix, tok, max_length=max_length, excess_length=policy, use_cache=False)
    except OasstError as e:
        assert "\n" not in str(e)
        return
    for row in tokenized.train:
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert 0 < len(ids) <= max_length and len(mask) == len(ids)
        assert any(mask), "a row without trained tokens reached training"
        # Loss falls on assistant replies and their end-of-turn token only, never on role or padding tokens.
        for special in ("<|prompter|>", "<|assistant|>", "<|system|>", "<|padding|>"):
            sid = tok.convert_tokens_to_ids(special)
            assert not any(m and i == sid for i, m in zip(ids, mask, strict=True)), special


@FEW
@given(
    rows=st.one_of(
        MESSAGES_ROWS.map(lambda r: ("messages", r)),
        SHAREGPT_ROWS.map(lambda r: ("sharegpt", r)),
        ALPACA_ROWS.map(lambda r: ("alpaca", r)),
    ),
    max_length=st.sampled_from([16, 24, 64]),
    policy=st.sampled_from(["truncate", "drop", "error"]),
)
def test_random_conversations_convert_and_tokenize_or_raise_one_line(tokenizer, rows, max_length, policy):
    fmt, data = rows
    try:
        mix = _load_rows(data, fmt)
    except OasstError as e:
        assert "\n" not in str(e)
        return
    for part in mix.parts.values():
        for conv in part.train + part.validation:
            assert check_conversation(conv) is None
    _tokenize_checked(mix, tokenizer, max_length, policy)


@FEW
@given(
    convs=st.lists(st.one_of(st.lists(MESSAGE, max_size=6), JUNK), min_size=1, max_size=6),
    max_length=st.sampled_from([16, 32]),
    policy=st.sampled_from(["truncate", "drop", "error"]),
)
def test_random_messages_from_python_are_checked_before_the_tokenizer(tokenizer, convs, max_length, policy):
    mix = Mix.from_conversations({"mine": convs})
    part = mix.parts["mine"]
    assert len(part.train) + sum(part.dropped["train"].values()) == len(convs)  # every drop is counted
    if part.train:
        _tokenize_checked(mix, tokenizer, max_length, policy)
