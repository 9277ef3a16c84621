"""The oasst chat template: byte-exact rendering, fixed token ids, and loss masks."""

from __future__ import annotations

import pytest

from oasst_peft.errors import OasstError
from oasst_peft.template import (
    ASSISTANT,
    PROMPTER,
    SYSTEM,
    WIDGET_PROMPTS,
    check_turn_end,
    padded_vocab_size,
    render,
    setup_tokenizer,
    tokenize_with_mask,
)
from tests.tiny import make_tokenizer

MEME = "What is a meme, and what's the history behind this word?"

CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four"},
    ],
    "multi": [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "I am fine thank you"},
        {"role": "user", "content": "convert five kilometres"},
        {"role": "assistant", "content": "five thousand metres"},
    ],
    "system": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "what is a meme"},
        {"role": "assistant", "content": "the history behind this word"},
        {"role": "user", "content": "and today?"},
        {"role": "assistant", "content": "a story about the future"},
    ],
}


def _expected(tok, messages):
    """Ids and mask built turn by turn: role token, content, end-of-turn; loss on assistant content + eot."""
    role_tok = {"user": PROMPTER, "assistant": ASSISTANT, "system": SYSTEM}
    ids, mask = [], []
    for m in messages:
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        loss = 1 if m["role"] == "assistant" else 0
        ids += [tok.convert_tokens_to_ids(role_tok[m["role"]])] + content + [tok.eos_token_id]
        mask += [0] + [loss] * (len(content) + 1)
    return ids, mask


@pytest.mark.parametrize("style,eot", [("neox", "<|endoftext|>"), ("bloom", "</s>"), ("llama", "</s>")])
@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_mask_is_assistant_content_and_eot(style, eot, kind):
    tok = make_tokenizer(style)
    fmt = setup_tokenizer(tok)
    assert fmt.eot == eot
    ids, mask = tokenize_with_mask(tok, CONVERSATIONS[kind])
    exp_ids, exp_mask = _expected(tok, CONVERSATIONS[kind])
    assert ids == exp_ids
    assert mask == exp_mask
    trained = tok.decode([i for i, k in zip(ids, mask, strict=True) if k])
    assistants = [m["content"] + eot for m in CONVERSATIONS[kind] if m["role"] == "assistant"]
    assert trained == "".join(assistants)


def test_widget_prompt_renders_byte_exact(tmp_path):
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    msgs = [{"role": "user", "content": MEME}]
    expected = f"<|prompter|>{MEME}<|endoftext|><|assistant|>"
    assert render(tok, msgs, add_generation_prompt=True) == expected
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    assert again.eos_token == "<|endoftext|>"
    assert tokenize_with_mask(again, CONVERSATIONS["system"]) == tokenize_with_mask(
        tok, CONVERSATIONS["system"]
    )


def test_bloom_prompt_uses_its_eos():
    tok = make_tokenizer("bloom")
    setup_tokenizer(tok)
    out = render(tok, [{"role": "user", "content": WIDGET_PROMPTS[1]}], add_generation_prompt=True)
    assert out == f"<|prompter|>{WIDGET_PROMPTS[1]}</s><|assistant|>"


def test_special_tokens_have_fixed_ids_in_fixed_order():
    a, b = make_tokenizer("neox"), make_tokenizer("neox")
    fa, fb = setup_tokenizer(a), setup_tokenizer(b)
    ids = a.convert_tokens_to_ids([PROMPTER, ASSISTANT, SYSTEM])
    assert ids == b.convert_tokens_to_ids([PROMPTER, ASSISTANT, SYSTEM])
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert fa == fb
    assert set(ids) <= set(fa.trainable_token_ids)


def test_existing_tokens_are_reused():
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    n = len(tok)
    setup_tokenizer(tok)  # a tokenizer saved by a previous run already has the tokens
    assert len(tok) == n


def test_eos_override_and_pad():
    tok = make_tokenizer("llama")  # no pad token
    fmt = setup_tokenizer(tok, eos_token="<|end|>")
    assert fmt.eot == "<|end|>" and tok.eos_token == "<|end|>"
    assert fmt.eot_id in fmt.trainable_token_ids  # a new end-of-turn token must be learned
    assert tok.pad_token is not None and fmt.pad_id != fmt.eot_id
    assert render(tok, CONVERSATIONS["single"]).endswith("four<|end|>")


def test_custom_template_needs_generation_markers(tmp_path):
    bad = tmp_path / "t.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(OasstError, match="generation"):
        setup_tokenizer(make_tokenizer("neox"), chat_template=str(bad))
    with pytest.raises(OasstError, match="not found"):
        setup_tokenizer(make_tokenizer("neox"), chat_template=str(tmp_path / "missing.jinja"))


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}END\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("end", "said"),
    [
        ("<|im_end|>", "it ends them with '<|im_end|>': set eos_token: '<|im_end|>' in the recipe"),
        ("", "put {{ eos_token }} right after the assistant content, inside the generation block"),
    ],
)
def test_a_custom_template_must_end_assistant_turns_with_the_end_of_turn_token(tmp_path, end, said):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML.replace("END", end))
    tok = make_tokenizer("neox")
    fmt = setup_tokenizer(tok, chat_template=str(path))
    with pytest.raises(OasstError) as e:
        check_turn_end(tok, fmt, str(path))
    assert str(e.value) == (
        f"chat_template: {path} does not end assistant turns with the end-of-turn token '<|endoftext|>' inside "
        "{% generation %}, so the model would never learn to stop; " + said
    )


def test_a_custom_template_passes_with_its_end_token_chosen_or_with_eos_token(tmp_path):
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(CHATML.replace("END", "<|im_end|>"))
    tok = make_tokenizer("neox")
    fmt = setup_tokenizer(tok, eos_token="<|im_end|>", chat_template=str(chatml))
    check_turn_end(tok, fmt, str(chatml))
    ids, mask = tokenize_with_mask(tok, CONVERSATIONS["single"])
    assert (
        fmt.eot_id
        == tok.convert_tokens_to_ids("<|im_end|>")
        in [i for i, m in zip(ids, mask, strict=True) if m]
    )
    generic = tmp_path / "generic.jinja"
    generic.write_text(CHATML.replace("END", "{{ eos_token }}"))
    tok = make_tokenizer("neox")
    check_turn_end(tok, setup_tokenizer(tok, chat_template=str(generic)), str(generic))


def test_unknown_role_is_refused():
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    with pytest.raises(Exception, match="unknown role"):
        render(tok, [{"role": "tool", "content": "x"}])


def test_padded_vocab_size_grows_to_multiple_never_shrinks():
    assert padded_vocab_size(323, 320) == 336
    assert padded_vocab_size(50280, 50688) == 50688
    assert padded_vocab_size(49155, 49152) == 49168


def test_trl_assistant_only_loss_matches_our_masks():
    """TRL's own assistant_only_loss path on raw messages gives the labels our tokenized data carries."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.tiny import make_model

    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    model = make_model("gpt_neox", tok)
    model.resize_token_embeddings(len(tok))
    convs = list(CONVERSATIONS.values())
    ds = Dataset.from_list([{"messages": c} for c in convs])
    args = SFTConfig(
        output_dir="/tmp/unused-trl-check",
        assistant_only_loss=True,
        report_to="none",
        max_length=None,
        bf16=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    for row, conv in zip(trainer.train_dataset, convs, strict=True):
        ids, mask = tokenize_with_mask(tok, conv)
        assert row["input_ids"] == ids
        assert row["labels"] == [i if k else -100 for i, k in zip(ids, mask, strict=True)]
