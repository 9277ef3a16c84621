"""Run fingerprints: recipe, data and tokenizer digests, and the --resume refusal they drive."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from datasets import Dataset

from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.fingerprint import (
    Fingerprint,
    FingerprintCallback,
    check_resume,
    compute,
    dataset_fingerprint,
    read_fingerprint,
    recipe_fingerprint,
    tokenizer_fingerprint,
    with_batching,
)
from oasst_peft.template import setup_tokenizer
from tests.tiny import make_tokenizer


def _recipe(**extra):
    d = {"model_name": "some/model", "datasets": ["alpaca"], "learning_rate": 1e-4, "output_dir": "runs/a"}
    d.update(extra)
    return recipe_from_dict(d)


def _data(rows=((1, 2, 3), (4, 5)), masks=None):
    masks = masks or [[1] * len(r) for r in rows]
    return Dataset.from_dict({"input_ids": [list(r) for r in rows], "assistant_masks": masks})


def test_recipe_fingerprint_ignores_bookkeeping_but_not_training_keys():
    base = recipe_fingerprint(_recipe())
    assert recipe_fingerprint(_recipe(output_dir="elsewhere", save_steps=7, logging_steps=3)) == base
    assert recipe_fingerprint(_recipe(learning_rate=2e-4)) != base
    assert recipe_fingerprint(_recipe(peft={"mode": "lora", "r": 8})) != base
    assert recipe_fingerprint(_recipe(), max_steps=10) != base


def test_dataset_fingerprint_sees_ids_masks_order_and_boundaries():
    base = dataset_fingerprint(_data())
    assert dataset_fingerprint(_data()) == base
    assert dataset_fingerprint(_data(rows=((1, 2, 3), (4, 6)))) != base
    assert dataset_fingerprint(_data(masks=[[0, 1, 1], [1, 1]])) != base
    assert dataset_fingerprint(_data(rows=((4, 5), (1, 2, 3)))) != base
    assert dataset_fingerprint(_data(rows=((1, 2), (3, 4, 5)))) != base  # same tokens, other rows
    # The logical order after select/shuffle is what counts, not the storage order.
    shuffled = _data(rows=((4, 5), (1, 2, 3))).select([1, 0])
    assert dataset_fingerprint(shuffled) == base


def test_tokenizer_fingerprint_sees_added_tokens_and_template():
    a, b = make_tokenizer("neox"), make_tokenizer("neox")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    setup_tokenizer(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    c = make_tokenizer("neox")
    setup_tokenizer(c)
    assert tokenizer_fingerprint(b) == tokenizer_fingerprint(c)
    c.chat_template = c.chat_template + " "
    assert tokenizer_fingerprint(b) != tokenizer_fingerprint(c)


def _checkpoint(tmp_path, fp: Fingerprint | None):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    state = {"global_step": 2, "stateful_callbacks": {}}
    if fp is not None:
        state["stateful_callbacks"]["FingerprintCallback"] = FingerprintCallback(fp.to_dict()).state()
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_check_resume_accepts_the_same_run_and_names_what_changed(tmp_path):
    tok = make_tokenizer("neox")
    saved = compute(_recipe(), tok, _data(), world_size=2)
    ckpt = _checkpoint(tmp_path, saved)
    assert read_fingerprint(ckpt) == saved
    check_resume(ckpt, compute(_recipe(save_steps=5), tok, _data(), world_size=2))

    changed = compute(_recipe(learning_rate=3e-4), tok, _data(), world_size=2)
    with pytest.raises(OasstError) as e:
        check_resume(ckpt, changed)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint-2" in msg and "--force" in msg
    assert "learning_rate: 0.0001 -> 0.0003" in msg

    with pytest.raises(OasstError, match="tokenized training data changed"):
        check_resume(ckpt, compute(_recipe(), tok, _data(rows=((9, 9, 9), (4, 5))), world_size=2))
    other_tok = make_tokenizer("bloom")
    with pytest.raises(OasstError, match="tokenizer changed"):
        check_resume(ckpt, compute(_recipe(), other_tok, _data(), world_size=2))
    # Plain multi-process LoRA: nothing saved depends on the process count.
    check_resume(ckpt, compute(_recipe(), tok, _data(), world_size=4))


def test_world_size_is_checked_only_for_zero_partitioned_states(tmp_path):
    tok = make_tokenizer("neox")
    ckpt = _checkpoint(tmp_path, compute(_recipe(), tok, _data(), world_size=2, zero=True))
    with pytest.raises(OasstError, match="written by 2 process"):
        check_resume(ckpt, compute(_recipe(), tok, _data(), world_size=4, zero=True))
    check_resume(ckpt, compute(_recipe(), tok, _data(), world_size=2, zero=True))


def test_keys_that_do_not_change_training_never_refuse():
    base = recipe_fingerprint(_recipe())
    quiet = _recipe(
        sample_on_eval=True, use_custom_sampler=True, logging_steps=1, log_dir="logs", eval_steps=7
    )
    assert recipe_fingerprint(quiet) == base


def test_batching_attention_and_trl_version_refuse_a_resume(tmp_path):
    tok = make_tokenizer("neox")
    saved = with_batching(compute(_recipe(), tok, _data()), "packing", "flash_attention_2")
    ckpt = _checkpoint(tmp_path, saved)
    check_resume(ckpt, saved, runtime_only=True)
    here = with_batching(compute(_recipe(), tok, _data()), "length-grouped", "sdpa")
    with pytest.raises(OasstError) as e:
        check_resume(ckpt, here, runtime_only=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "the batching changed (packing -> length-grouped)" in msg
    assert "the attention changed (flash_attention_2 -> sdpa)" in msg
    other_trl = replace(saved, runtime={**saved.runtime, "trl": "0.0.1"})
    with pytest.raises(OasstError, match="the TRL version changed"):
        check_resume(ckpt, other_trl)  # checked before weights load, too
    # Before the model is loaded only the TRL version is known: the first check passes.
    check_resume(ckpt, compute(_recipe(), tok, _data()))


def test_a_fingerprint_from_before_the_runtime_keys_still_resumes(tmp_path):
    tok = make_tokenizer("neox")
    old = compute(_recipe(), tok, _data())
    old = replace(old, runtime={})
    ckpt = _checkpoint(tmp_path, old)
    current = with_batching(compute(_recipe(), tok, _data()), "random", "sdpa")
    check_resume(ckpt, current)
    check_resume(ckpt, current, runtime_only=True)


def test_force_resumes_anyway_and_says_so(tmp_path):
    tok = make_tokenizer("neox")
    ckpt = _checkpoint(tmp_path, compute(_recipe(), tok, _data()))
    lines: list[str] = []
    check_resume(ckpt, compute(_recipe(learning_rate=3e-4), tok, _data()), force=True, say=lines.append)
    assert len(lines) == 1 and "--force" in lines[0] and "learning_rate" in lines[0]


def test_checkpoint_without_fingerprint_is_refused_unless_forced(tmp_path):
    tok = make_tokenizer("neox")
    ckpt = _checkpoint(tmp_path, None)
    assert read_fingerprint(ckpt) is None
    current = compute(_recipe(), tok, _data())
    with pytest.raises(OasstError, match="holds no oasst-peft fingerprint"):
        check_resume(ckpt, current)
    check_resume(ckpt, current, force=True, say=lambda _: None)


def test_a_packed_flash_attention_checkpoint_is_refused_on_a_host_without_flash(tmp_path):
    """A run resumed where its attention and batching cannot be had is refused in one line, after load."""
    from oasst_peft.config import load_recipe
    from oasst_peft.train import train
    from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "convs.jsonl")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, data, tmp_path / "run", tmp_path / "cache"))
    recipe = load_recipe(path)
    train(recipe, max_steps=4, say=lambda _: None)
    ckpt = tmp_path / "run" / "checkpoint-2"
    saved = read_fingerprint(ckpt)
    assert saved.runtime["batching"] == "length-grouped" and saved.runtime["attention"] == "sdpa"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    entry = state["stateful_callbacks"]["FingerprintCallback"]["args"]["fingerprint"]
    entry["runtime"].update(batching="packing", attention="flash_attention_2")  # as a GPU host wrote it
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(OasstError) as e:
        train(recipe, max_steps=4, resume=str(ckpt), output_dir=tmp_path / "again", say=lambda _: None)
    assert "attention changed (flash_attention_2 -> sdpa)" in str(e.value)
    assert "batching changed (packing -> length-grouped)" in str(e.value)
