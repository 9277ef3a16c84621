"""Tokenizing the mix: masks, excess_length policies, no-loss rows, the cache, workers, stats, preview."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from oasst_peft.data import Mix, data_preview, data_stats, format_preview, format_stats, tokenize_mix
from oasst_peft.errors import OasstError
from oasst_peft.template import render, setup_tokenizer, tokenize_with_mask
from tests.tiny import make_tokenizer


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer("neox")
    setup_tokenizer(t)
    return t


SHORT = [u("hello there"), a("how are you today")]
LONG = [
    u("what is two plus two"),
    a("four"),
    u("the quick brown fox jumps over the lazy dog " * 3),
    a("the answer is seven " * 6),
]


def simple_mix(train, validation=None):
    return Mix.from_conversations({"set": train}, {"set": validation or []})


def test_rows_are_the_template_tokens_and_masks(tok, tmp_path):
    convs = [SHORT, LONG, [u("two plus two"), a("four"), u("and ten minus three"), a("seven")]]
    t = tokenize_mix(simple_mix(convs), tok, max_length=4096, cache_dir=tmp_path)
    assert t.train.column_names == ["input_ids", "assistant_masks"]
    for row, conv in zip(t.train, convs, strict=True):
        ids, mask = tokenize_with_mask(tok, conv)
        assert row["input_ids"] == ids and row["assistant_masks"] == mask
    assert t.train_sizes() == {"set": 3}


def _len(tok, conv):
    return len(tokenize_with_mask(tok, conv)[0])


def test_truncate_cuts_at_a_turn_boundary_after_an_assistant_turn(tok, tmp_path):
    first_exchange = _len(tok, LONG[:2])
    max_length = first_exchange + 3  # fits the first exchange, not the second prompt
    t = tokenize_mix(simple_mix([LONG, SHORT]), tok, max_length=max_length, cache_dir=tmp_path)
    row = t.parts["set"]["train"][0]
    assert row["input_ids"] == tokenize_with_mask(tok, LONG[:2])[0]
    assert row["n_messages"] == 2 and row["truncated"]
    assert row["assistant_masks"][-1] == 1  # ends on the assistant's end-of-turn token
    st = data_stats(t)["datasets"]["set"]["train"]
    assert st["truncated"] == 1 and st["conversations"] == 2 and st["dropped"] == {}
    assert st["turns"] == 2 + 2


def test_truncate_drops_when_even_the_first_exchange_is_too_long(tok, tmp_path):
    max_length = _len(tok, SHORT)
    t = tokenize_mix(
        simple_mix([SHORT, [u("x " * 40), a("y")]]), tok, max_length=max_length, cache_dir=tmp_path
    )
    st = data_stats(t)["datasets"]["set"]["train"]
    assert st["conversations"] == 1
    assert st["dropped"] == {"first_exchange_longer_than_max_length": 1}


def test_drop_policy(tok, tmp_path):
    max_length = _len(tok, LONG) - 1
    t = tokenize_mix(
        simple_mix([LONG, SHORT]), tok, max_length=max_length, excess_length="drop", cache_dir=tmp_path
    )
    st = data_stats(t)["datasets"]["set"]["train"]
    assert (st["conversations"], st["truncated"], st["dropped"]) == (1, 0, {"longer_than_max_length": 1})
    assert t.train[0]["input_ids"] == tokenize_with_mask(tok, SHORT)[0]


def test_error_policy_names_dataset_split_and_conversation(tok, tmp_path):
    mix = simple_mix([SHORT], [SHORT, LONG])
    with pytest.raises(OasstError, match=r"set: validation conversation 1 is \d+ tokens, over max_length 40"):
        tokenize_mix(mix, tok, max_length=40, excess_length="error", cache_dir=tmp_path)


def test_everything_dropped_says_which_policy_emptied_it(tok, tmp_path):
    with pytest.raises(
        OasstError, match=r"set: tokenizing left no training conversation \(longer_than_max_length: 1"
    ):
        tokenize_mix(simple_mix([LONG]), tok, max_length=16, excess_length="drop", cache_dir=tmp_path)


def test_conversations_without_trained_tokens_never_reach_training(tmp_path):
    template = (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' and m['content'] != 'SILENT' -%}"
        "{{ '<|assistant|>' }}{% generation %}{{ m['content'] + '<|endoftext|>' }}{% endgeneration %}"
        "{%- else -%}{{ '<|prompter|>' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
        "{%- endfor -%}"
    )
    path = tmp_path / "t.jinja"
    path.write_text(template)
    tok = make_tokenizer("neox")
    setup_tokenizer(tok, chat_template=str(path))
    t = tokenize_mix(
        simple_mix([SHORT, [u("q"), a("SILENT")]]), tok, max_length=512, cache_dir=tmp_path / "c"
    )
    assert len(t.train) == 1 and all(any(r["assistant_masks"]) for r in t.train)
    assert data_stats(t)["datasets"]["set"]["train"]["dropped"] == {"no_trained_tokens": 1}


def test_cache_is_reused_and_keyed_by_data_tokenizer_and_length(tok, tmp_path):
    mix = simple_mix([SHORT, LONG], [SHORT])
    cold = tokenize_mix(mix, tok, max_length=256, cache_dir=tmp_path)
    warm = tokenize_mix(mix, tok, max_length=256, cache_dir=tmp_path)
    assert not cold.from_cache and warm.from_cache and warm.cache_path == cold.cache_path
    assert warm.train.to_dict() == cold.train.to_dict()
    assert warm.validation["set"].to_dict() == cold.validation["set"].to_dict()
    assert data_stats(warm) == data_stats(cold)
    assert not tokenize_mix(mix, tok, max_length=255, cache_dir=tmp_path).from_cache
    other_tok = make_tokenizer("bloom")
    setup_tokenizer(other_tok)
    assert not tokenize_mix(mix, other_tok, max_length=256, cache_dir=tmp_path).from_cache
    changed = simple_mix([SHORT, [u("hello there"), a("how are you today!")]], [SHORT])
    assert not tokenize_mix(changed, tok, max_length=256, cache_dir=tmp_path).from_cache
    assert len(list((tmp_path / "tokenized").iterdir())) == 4


def test_damaged_cache_entry_is_rebuilt(tok, tmp_path):
    mix = simple_mix([SHORT, LONG])
    cold = tokenize_mix(mix, tok, max_length=256, cache_dir=tmp_path)
    (cold.cache_path / "manifest.json").write_text("{not json")
    again = tokenize_mix(mix, tok, max_length=256, cache_dir=tmp_path)
    assert not again.from_cache and again.train.to_dict() == cold.train.to_dict()


def test_worker_processes_give_the_same_rows(tok, tmp_path):
    convs = [[u(f"question {i} " * (i % 5 + 1)), a(f"answer {i} " * (i % 7 + 1))] for i in range(40)]
    one = tokenize_mix(simple_mix(convs), tok, max_length=64, num_proc=1, use_cache=False)
    two = tokenize_mix(simple_mix(convs), tok, max_length=64, num_proc=2, use_cache=False)
    assert one.train.to_dict() == two.train.to_dict()
    assert data_stats(one) == data_stats(two)


def test_needs_a_chat_template(tmp_path):
    with pytest.raises(OasstError, match="setup_tokenizer"):
        tokenize_mix(simple_mix([SHORT]), make_tokenizer("neox"), max_length=64, cache_dir=tmp_path)


def test_stats_shape_and_totals(tok, tmp_path):
    mix = Mix.from_conversations({"x": [SHORT, LONG], "y": [SHORT]}, {"x": [SHORT], "y": []})
    stats = data_stats(tokenize_mix(mix, tok, max_length=4096, cache_dir=tmp_path))
    split_keys = {"conversations", "turns", "tokens", "trained_tokens", "truncated", "dropped"}
    for by_split in [*stats["datasets"].values(), stats["total"]]:
        assert set(by_split) == {"train", "validation"}
        assert all(set(v) == split_keys for v in by_split.values())
    assert stats["total"]["train"]["conversations"] == 3
    assert stats["total"]["train"]["tokens"] == sum(_len(tok, c) for c in (SHORT, LONG, SHORT))
    assert stats["total"]["validation"]["turns"] == 2
    json.dumps(stats)


def test_preview_marks_loss_tokens_and_renders(tok, tmp_path):
    mix = Mix.from_conversations({"x": [LONG], "y": [SHORT]}, {"x": [SHORT]})
    t = tokenize_mix(mix, tok, max_length=_len(tok, LONG[:2]) + 2, cache_dir=tmp_path)
    preview = data_preview(t, tok, n=3)
    ex = preview["examples"]
    assert [(e["dataset"], e["split"]) for e in ex] == [("x", "train"), ("y", "train"), ("x", "validation")]
    assert ex[0]["messages"] == LONG[:2]  # the truncated conversation as trained
    assert ex[0]["text"] == render(tok, LONG[:2])
    ids, mask = tokenize_with_mask(tok, LONG[:2])
    assert [x["id"] for x in ex[0]["tokens"]] == ids
    assert [x["loss"] for x in ex[0]["tokens"]] == [bool(m) for m in mask]
    assert "".join(x["text"] for x in ex[0]["tokens"]) == ex[0]["text"]
    json.dumps(preview)
    out = io.StringIO()
    console = Console(file=out, width=100, color_system="truecolor", force_terminal=True)
    format_preview(preview, console=console)
    format_stats(data_stats(t), console=console)
    text = out.getvalue()
    assert "x / train" in text and "\x1b[" in text and "total" in text
    assert "\u27e6" not in text and "with loss (green)" in text
    piped = io.StringIO()  # no colour: the loss spans are bracketed, so the preview says the same in a file
    format_preview(preview, console=Console(file=piped, width=100, color_system=None))
    plain = piped.getvalue()
    assert "\x1b[" not in plain and "with loss (between \u27e6 and \u27e7)" in plain
    spans = re.findall("\u27e6(.*?)\u27e7", plain.replace("\n", ""), flags=re.S)
    trained = [x["text"] for x in ex[0]["tokens"] if x["loss"]]
    assert trained and "".join(trained).replace("\n", "") in "".join(spans), spans


def test_unwritable_cache_dir_is_one_line(tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OasstError, match=r"cache_dir: cannot write the tokenized cache"):
        tokenize_mix(simple_mix([SHORT]), tok, max_length=64, cache_dir=blocker)


def test_stats_table_never_cuts_a_number_in_80_columns():
    def split(n):
        return {"conversations": n, "turns": 2 * n, "tokens": 123456 * n, "trained_tokens": 65432 * n,
                "truncated": 3, "dropped": {"malformed_row": 2}}  # fmt: skip

    stats = {
        "datasets": {"grade_school_math_instructions": {"train": split(10), "validation": split(1)}},
        "total": {"train": split(10), "validation": split(1)},
    }
    out = io.StringIO()
    format_stats(stats, console=Console(file=out, width=80))
    text = out.getvalue()
    assert "…" not in text
    for number in ("1,234,560", "654,320", "123,456", "65,432", "validation"):
        assert number in text
