"""Training end to end on tiny random models: full, LoRA, QLoRA; saved layout; dry runs of shipped recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oasst_peft.config import load_recipe, recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.train import train
from tests.tiny import make_tokenizer
from tests.tiny_run import recipe_dict, write_base, write_conversations

ROOT = Path(__file__).resolve().parent.parent


def tiny_base(tmp_path: Path, arch: str = "gpt_neox", hidden: int = 64) -> Path:
    return write_base(tmp_path / f"base-{arch}", arch, hidden=hidden)


def tiny_recipe(tmp_path: Path, arch: str = "gpt_neox", mode: str = "lora", **extra):
    """tests/tiny_run's recipe with a validation split, evaluation every 2 steps, and the given mode."""
    base = tiny_base(tmp_path, arch)
    data = write_conversations(tmp_path / "convs.jsonl")
    d = recipe_dict(
        base,
        data,
        tmp_path / "run",
        tmp_path / "cache",
        eval_steps=2,
        save_total_limit=4,
        datasets=[{"chat": {"data_files": str(data), "format": "messages", "val_split": 0.2}}],
    )
    if mode == "full":
        del d["peft"]
    else:
        d["peft"]["mode"] = mode
    d.update(extra)
    return recipe_from_dict(d), base


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "bloom"])
def test_lora_trains_new_token_rows_and_freezes_base(tmp_path, arch):
    recipe, base = tiny_recipe(tmp_path, arch, "lora")
    res = train(recipe, max_steps=3, say=lambda _: None)
    out = res.output_dir
    assert math.isfinite(res.metrics["train_loss"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    run = json.loads((out / "oasst_run.json").read_text())
    assert (
        run["mode"] == "lora" and run["vocab_rows"] % 16 == 0 and run["vocab_rows"] >= run["base_vocab_rows"]
    )
    adapter = load_file(str(out / "adapter_model.safetensors"))
    token_keys = [k for k in adapter if "trainable_tokens" in k]
    assert token_keys, "the added-token rows must be saved with the adapter"
    assert any("lora_A" in k for k in adapter)

    # Reload base + adapter: the added rows changed, the frozen base weights did not.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.resize_token_embeddings(run["vocab_rows"], mean_resizing=False)
    ids = run["trainable_token_ids"]
    emb_before = fresh.get_input_embeddings().weight[ids].clone()
    model = PeftModel.from_pretrained(fresh, out)
    merged = model.merge_and_unload()
    emb_after = merged.get_input_embeddings().weight[ids]
    assert not torch.allclose(emb_before, emb_after), "added token rows were not trained"
    # Frozen weights (a non-LoRA tensor, e.g. a layer norm) are untouched.
    norms = [k for k in before if "norm" in k and k.endswith("weight")]
    assert norms
    for k in norms:
        assert torch.equal(before[k], merged.state_dict()[k])


def test_lora_run_layout_and_template(tmp_path):
    recipe, _ = tiny_recipe(tmp_path, "gpt_neox", "lora")
    out = train(recipe, max_steps=2, say=lambda _: None).output_dir
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|prompter|>hi<|endoftext|><|assistant|>"
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    saved = load_recipe(out / "oasst_recipe.yaml")
    assert saved.peft.r == 4 and saved.model_name == recipe.model_name
    assert (out / "checkpoint-2").is_dir()
    assert not list(out.glob(".final-*")), "temp dirs must not be left behind"


def test_full_training_changes_all_weights(tmp_path):
    recipe, base = tiny_recipe(tmp_path, "llama", "full")
    res = train(recipe, max_steps=2, say=lambda _: None)
    assert math.isfinite(res.metrics["train_loss"])
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(res.output_dir)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert trained.get_input_embeddings().weight.shape[0] % 16 == 0
    w0 = original.model.layers[0].mlp.down_proj.weight
    w1 = trained.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w0, w1)


def test_qlora_uses_4bit_linear_layers(tmp_path):
    import bitsandbytes as bnb

    from oasst_peft.model import load_model, load_tokenizer

    recipe, _ = tiny_recipe(tmp_path, "llama", "qlora")
    tok, fmt = load_tokenizer(recipe)
    loaded = load_model(recipe, tok, fmt, say=lambda _: None)
    four_bit = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "qlora must quantize the linear layers to 4-bit"
    res = train(recipe, max_steps=2, say=lambda _: None)
    assert math.isfinite(res.metrics["train_loss"])
    run = json.loads((res.output_dir / "oasst_run.json").read_text())
    assert run["bnb_4bit"]["quant_type"] == "nf4"
    # Sampling samples what was trained: the adapter on the NF4 base (on the CPU too), never merged into it.
    from oasst_peft.sampler import load_sampler

    sampler = load_sampler(res.output_dir)
    assert sampler.info["qlora_base"] == "nf4" and not sampler.info["adapter_merged"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in sampler.model.modules())


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _eval_pass(model, batch) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])


def test_qlora_gradients_survive_an_evaluation(tmp_path):
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel during eval; training must not use it."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from oasst_peft.model import load_model, load_tokenizer

    recipe, _ = tiny_recipe(tmp_path, "llama", "qlora")
    tok, fmt = load_tokenizer(recipe)
    model = load_model(recipe, tok, fmt, say=lambda _: None).model
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    before = _lora_grads(model, batch)
    _eval_pass(model, batch)
    after = _lora_grads(model, batch)
    assert before.keys() == after.keys() and before
    for name, g in before.items():
        assert torch.allclose(g, after[name], atol=1e-6), f"{name}: gradient changed after an evaluation"
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' repacking path (the control) does not exist")
    # Control: bitsandbytes' default on this CPU loses the gradient through the 4-bit weights after eval.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    _eval_pass(model, batch)
    broken = _lora_grads(model, batch)
    assert any(not torch.allclose(g, broken[n], atol=1e-6) for n, g in before.items())


def test_half_precision_on_cpu_is_downgraded_with_one_line(tmp_path):
    recipe, _ = tiny_recipe(tmp_path, "gpt_neox", "lora", dtype="bf16")
    lines: list[str] = []
    if torch.cuda.is_available():
        pytest.skip("checks the CPU downgrade")
    train(recipe, dry_run=True, say=lines.append)
    assert sum("training in fp32" in line for line in lines) == 1


@pytest.mark.parametrize(
    ("over", "arg", "said"),
    [
        ({"max_steps": 40}, None, "max_steps 40 (num_train_epochs is not used)"),
        ({"max_steps": 40}, 7, "max_steps 7 (num_train_epochs is not used)"),
        ({"max_steps": -1, "num_train_epochs": 2}, None, "epochs 2.0"),
    ],
)
def test_dry_run_says_what_ends_the_run(tmp_path, over, arg, said):
    recipe, _ = tiny_recipe(tmp_path, "gpt_neox", "lora", **over)
    lines: list[str] = []
    train(recipe, dry_run=True, max_steps=arg, say=lines.append)
    batch = [line for line in lines if line.startswith("batch:")]
    assert len(batch) == 1 and batch[0].endswith(said), batch


def test_existing_output_dir_is_refused(tmp_path):
    recipe, _ = tiny_recipe(tmp_path, "gpt_neox", "lora")
    out = Path(recipe.output_dir)
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(OasstError, match="already holds a run"):
        train(recipe, max_steps=1, say=lambda _: None)


def _stand_in(tmp_path: Path, model_name: str) -> Path:
    """A tiny random model with the architecture of the shipped config for ``model_name``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from oasst_peft.shipped import shipped_model_config

    cfg_path = shipped_model_config(model_name)
    assert cfg_path is not None, f"no shipped config for {model_name}"
    cfg = AutoConfig.from_pretrained(Path(cfg_path).parent)
    style = "bloom" if cfg.model_type == "bloom" else "neox"
    tok = make_tokenizer(style)
    small = dict(hidden_size=32, num_attention_heads=4, vocab_size=len(tok))
    if cfg.model_type == "bloom":
        small.update(n_layer=2, n_head=4)
    else:
        small.update(num_hidden_layers=2, intermediate_size=64)
    for k, v in small.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / "stand-in"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


SEED_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.stem != "demo-smollm2")


@pytest.mark.parametrize("path", SEED_RECIPES, ids=lambda p: p.stem)
def test_dry_run_on_a_stand_in_of_each_shipped_recipe(tmp_path, path):
    seed = load_recipe(path)
    stand_in = _stand_in(tmp_path, seed.model_name)
    data = write_conversations(tmp_path / "convs.jsonl")
    recipe = load_recipe(
        path,
        [
            f"model_name={stand_in}",
            f"datasets=[{{chat: {{data_files: '{data}', format: messages}}}}]",
            f"cache_dir={tmp_path / 'cache'}",
        ],
    )
    lines: list[str] = []
    res = train(recipe, dry_run=True, say=lines.append)
    assert res.dry_run and res.plan["mode"] == seed.mode
    assert res.plan["datasets"], "\n".join(lines)
    assert not Path(recipe.output_dir).exists(), "a dry run writes nothing"


@pytest.mark.parametrize("path", SEED_RECIPES, ids=lambda p: p.stem)
def test_dry_run_of_shipped_recipe_offline_prints_plan(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    res = train(load_recipe(path), dry_run=True, say=lines.append)
    text = "\n".join(lines)
    assert res.dry_run and load_recipe(path).model_name in text
    assert "unavailable here" in text  # hub data and tokenizer cannot load offline; said, not crashed
    if "tokenizer: unavailable here" in text:  # and what that leaves unchecked is said too
        assert "data: not loaded or tokenized, since the tokenizer is unavailable here" in text


def test_truncation_and_drops_are_reported_when_training_starts(tmp_path):
    """Over-long conversations cut at a turn boundary are counted in the run's log, never silent."""
    recipe, _ = tiny_recipe(tmp_path, "gpt_neox", "lora", max_length=24)
    lines: list[str] = []
    train(recipe, dry_run=True, say=lines.append)
    data = [line for line in lines if line.startswith("data: chat:")]
    assert len(data) == 1 and "train /" in data[0] and "trained tokens" in data[0]
    assert "truncated" in data[0]
    lines.clear()
    recipe, _ = tiny_recipe(tmp_path / "long", "gpt_neox", "lora", max_length=256)
    train(recipe, dry_run=True, say=lines.append)
    assert not any("truncated" in line for line in lines if line.startswith("data: chat:"))


def test_dry_run_without_a_tokenizer_still_checks_the_dataset_names(monkeypatch):
    """Offline with a hub base, the tokenizer is unavailable; a typo in datasets: must still fail in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = recipe_from_dict({"model_name": "EleutherAI/pythia-12b-deduped", "datasets": ["dolly15"]})
    with pytest.raises(OasstError, match="unknown dataset 'dolly15' \\(did you mean 'dolly15k'\\?\\)"):
        train(recipe, dry_run=True, say=lambda _line: None)


def test_the_saved_recipe_trains_again_from_anywhere(tmp_path, monkeypatch):
    """A recipe with relative data paths is saved with them made absolute, so the run's copy works."""
    from oasst_peft.data import parse_datasets
    from tests.tiny_run import write_recipe

    base = write_base(tmp_path / "project" / "base")
    (tmp_path / "project" / "data").mkdir()
    write_conversations(tmp_path / "project" / "data" / "convs.jsonl", n=4)
    d = recipe_dict(
        base, Path("data/convs.jsonl"), tmp_path / "run", tmp_path / "cache", max_steps=1, save_steps=0
    )
    d["model_name"] = "base"  # relative to the recipe's folder too
    recipe = load_recipe(write_recipe(tmp_path / "project" / "r.yaml", d))
    train(recipe, say=lambda _: None)
    monkeypatch.chdir(tmp_path)
    saved = load_recipe(tmp_path / "run" / "oasst_recipe.yaml")
    assert Path(saved.model_name) == (tmp_path / "project" / "base")
    spec = parse_datasets(saved.datasets, saved.recipe_dir)[0]
    assert [Path(f) for f in spec.data_files] == [tmp_path / "project" / "data" / "convs.jsonl"]


def test_a_tilde_output_dir_is_one_folder(tmp_path, monkeypatch):
    """transformers expands ~ for checkpoints; the final save and the run record go to the same folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    recipe, _ = tiny_recipe(tmp_path, output_dir="~/runs/t", save_steps=1)
    res = train(recipe, max_steps=1, say=lambda _: None)
    run = tmp_path / "home" / "runs" / "t"
    assert res.output_dir == run
    assert (run / "oasst_run.json").is_file() and (run / "checkpoint-1").is_dir()
    assert not (tmp_path / "~").exists()
