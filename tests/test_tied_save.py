"""A tied lm_head is saved once, also from the cloned weights DeepSpeed's ZeRO-2 hands to the trainer."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from oasst_peft.trainer import reshare_tied
from tests.tiny import make_model, make_tokenizer


def _saved_keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_cloned_weights_of_a_tied_model_save_the_embedding_once_and_reload_equal(tmp_path):
    tok = make_tokenizer("neox")
    model = make_model("bloom", tok)
    assert (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )  # the premise: bloom ties them
    cloned = {k: v.clone() for k, v in model.state_dict().items()}

    # The control: saved as accelerate hands them over under ZeRO-2, the head is written a second time.
    model.save_pretrained(tmp_path / "cloned", state_dict=dict(cloned))
    assert "lm_head.weight" in _saved_keys(tmp_path / "cloned")

    model.save_pretrained(tmp_path / "reshared", state_dict=reshare_tied(dict(cloned), model))
    keys = _saved_keys(tmp_path / "reshared")
    assert "lm_head.weight" not in keys and "transformer.word_embeddings.weight" in keys
    model.save_pretrained(tmp_path / "plain")
    assert keys == _saved_keys(tmp_path / "plain")

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "reshared")
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_untied_weights_are_left_as_they_are():
    tok = make_tokenizer("neox")
    model = make_model("gpt_neox", tok)
    cloned = {k: v.clone() for k, v in model.state_dict().items()}
    out = reshare_tied(dict(cloned), model)
    assert out.keys() == cloned.keys()
    assert all(out[k] is cloned[k] for k in cloned)
