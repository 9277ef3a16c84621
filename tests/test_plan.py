"""Tests for the memory planner: parameter counts, shipped configs, every term's scaling, and the plan JSON."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, GPTNeoXConfig, LlamaConfig

from oasst_peft import memory, model_info, plan, shipped
from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from tests.tiny import demo_gguf

GIB = 2**30
SEED_COUNTS = {  # base-models.md: biases and norms included, a tied matrix once
    "EleutherAI/pythia-12b-deduped": 11.846e9,
    "andreaskoepf/pythia-12b-pre-2000": 11.846e9,
    "stabilityai/stablelm-base-alpha-7b": 7.869e9,
    "ckip-joint/bloom-3b-zh": 3.003e9,
}


def tiny_configs():
    return {
        "gpt_neox": GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=300,
            rotary_pct=0.25,
            tie_word_embeddings=False,
        ),
        "llama": LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            tie_word_embeddings=False,
        ),
        "llama_tied": LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=300,
            tie_word_embeddings=True,
        ),
        "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
    }


def real_count(config) -> int:
    model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.fixture(scope="module")
def pythia():
    return model_info.model_shape(model_info.load_model_config("EleutherAI/pythia-12b-deduped"))


def recipe(**over):
    peft = over.pop("peft", None)
    base = dict(
        model_name="EleutherAI/pythia-12b-deduped",
        dtype="bf16",
        max_length=2048,
        per_device_train_batch_size=1,
        gradient_checkpointing=True,
        use_flash_attention=False,
        deepspeed_config=None,
        peft=peft,
        gradient_accumulation_steps=8,
    )
    return recipe_from_dict({**base, **over, "datasets": ["alpaca"]})


def lora(mode="lora", r=16, targets="all-linear", dropout=0.05):
    return dict(mode=mode, r=r, target_modules=targets, dropout=dropout)


# ---- parameter counts ----


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "llama_tied", "bloom"])
def test_param_count_equals_instantiated_model(arch):
    config = tiny_configs()[arch]
    assert model_info.model_shape(config).params == real_count(config)


@pytest.mark.parametrize("name", sorted(SEED_COUNTS))
def test_seed_model_param_counts_within_a_percent(name):
    shape = model_info.model_shape(model_info.load_model_config(name), name=name)
    assert shape.params == pytest.approx(SEED_COUNTS[name], rel=0.01)


def test_bloom_tie_comes_from_the_config_not_the_meta_model(monkeypatch):
    config = model_info.load_model_config("ckip-joint/bloom-3b-zh")
    shape = model_info.model_shape(config)
    assert shape.tied and shape.params == pytest.approx(3.003e9, rel=0.001)
    # An untied copy of the same config counts the output matrix once more.
    untied = model_info.model_shape(BloomConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert untied.params - shape.params == shape.vocab * shape.hidden


def test_lora_params_equal_peft_count():
    from peft import LoraConfig, get_peft_model

    for arch in ("gpt_neox", "llama", "bloom"):
        config = tiny_configs()[arch]
        shape = model_info.model_shape(config)
        model = get_peft_model(
            AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear")
        )
        trainable, _ = model.get_nb_trainable_parameters()
        assert memory.lora_params(list(shape.linears), 4) == trainable, arch
        named = (
            memory.lora_params(memory._targets(shape, ["q_proj", "v_proj"]), 4) if arch == "llama" else None
        )
        if named is not None:
            model = get_peft_model(
                AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
            )
            assert named == model.get_nb_trainable_parameters()[0]


def test_nf4_bytes_match_a_quantized_model(tmp_path):
    """The QLoRA weight term equals what bitsandbytes actually stores for a tiny model (CPU)."""
    from transformers import BitsAndBytesConfig

    config = tiny_configs()["llama"]
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    stored = 0
    for p in model.parameters():
        stored += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            stored += qs.absmax.numel() * qs.absmax.element_size()
            stored += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    shape = model_info.model_shape(config)
    predicted = memory.weight_bytes("qlora", shape.params, shape.quantizable_params, 4, 0, 1, False, True)
    assert predicted == pytest.approx(stored, rel=0.02)
    assert memory.nf4_bytes_per_param(True) == 0.5 + 1 / 64 + 4 / (64 * 256)


# ---- shipped configs and config loading ----


def test_shipped_model_config_paths():
    path = shipped.shipped_model_config("EleutherAI/pythia-12b-deduped")
    assert path == shipped.BASE_MODELS_DIR / "EleutherAI__pythia-12b-deduped" / "config.json"
    assert shipped.shipped_model_config("nobody/no-such-model") is None
    assert shipped.shipped_model_config("./EleutherAI/pythia-12b-deduped") is None
    sft4 = json.loads(shipped.shipped_model_config("andreaskoepf/pythia-12b-pre-2000").read_text())
    assert sft4 == json.loads(path.read_text())


def test_seed_configs_have_the_documented_architecture():
    neox = model_info.load_model_config("stabilityai/stablelm-base-alpha-7b")
    assert (neox.hidden_size, neox.num_hidden_layers, neox.num_attention_heads) == (6144, 16, 48)
    assert (neox.intermediate_size, neox.vocab_size, neox.max_position_embeddings) == (24576, 50432, 4096)
    assert neox.rope_parameters["partial_rotary_factor"] == 0.25 and neox.use_parallel_residual
    assert neox.tie_word_embeddings is False
    bloom = model_info.load_model_config("ckip-joint/bloom-3b-zh")
    assert (bloom.hidden_size, bloom.n_layer, bloom.n_head, bloom.vocab_size) == (2560, 30, 32, 250880)
    assert (bloom.eos_token_id, bloom.pad_token_id) == (2, 3)


def test_smollm2_config_matches_its_gguf():
    gguf = demo_gguf()
    shipped = model_info.load_model_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    from_gguf = model_info.load_model_config(str(gguf))
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    assert {k: getattr(shipped, k) for k in keys} == {k: getattr(from_gguf, k) for k in keys}
    assert shipped.rope_parameters["rope_theta"] == from_gguf.rope_parameters["rope_theta"]
    assert model_info.model_shape(shipped).params == model_info.model_shape(from_gguf).params


def test_load_model_config_local_dir_and_errors(tmp_path, monkeypatch):
    tiny_configs()["gpt_neox"].save_pretrained(tmp_path / "m")
    assert model_info.load_model_config(str(tmp_path / "m")).hidden_size == 64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OasstError) as err:
        model_info.load_model_config("nobody/no-such-model")
    assert "nobody/no-such-model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OasstError, match="not found"):
        model_info.load_model_config(str(tmp_path / "missing" / "dir"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(OasstError, match=r"model_name: cannot use .*bad/config.json: Expecting property"):
        model_info.load_model_config(str(tmp_path / "bad"))  # (checked before transformers reads it)


# ---- the terms ----


def test_activations_scale_with_batch_and_length(pythia):
    base = memory.Setup(mode="lora", micro_batch=1, seq_len=512, gradient_checkpointing=False)
    acts = [memory.memory_terms(pythia, replace(base, micro_batch=b))["activations"] for b in (1, 2, 3)]
    assert acts[0] < acts[1] < acts[2]
    assert acts[2] - acts[1] == pytest.approx(acts[1] - acts[0], rel=1e-6)  # linear in batch
    longer = memory.memory_terms(pythia, replace(base, seq_len=1024))["activations"]
    assert longer == pytest.approx(2 * acts[0], rel=0.05)
    for term in ("weights", "trainable", "gradients", "optimizer"):
        one = memory.memory_terms(pythia, base)[term]
        assert memory.memory_terms(pythia, replace(base, micro_batch=4, seq_len=2048))[term] == one


def test_eager_attention_is_quadratic_in_length():
    shape = model_info.model_shape(
        model_info.load_model_config("ckip-joint/bloom-3b-zh")
    )  # Bloom: eager attention only
    setup = memory.Setup(mode="full", micro_batch=1, dtype="bf16")
    one, two = (memory.layer_activation_bytes(shape, replace(setup, seq_len=s)) for s in (1024, 2048))
    # f(2s) - 2 f(s) leaves only the s^2 term: heads * (4 s^2 - 2 s^2) * (4 fp32 softmax + 2 bf16 copy)
    assert two - 2 * one == pytest.approx(shape.heads * 2 * 1024**2 * 6)
    sdpa_shape = model_info.model_shape(tiny_configs()["llama"])
    a, b = (memory.layer_activation_bytes(sdpa_shape, replace(setup, seq_len=s)) for s in (1024, 2048))
    assert b == pytest.approx(2 * a)  # sdpa: linear in length


def test_gradient_checkpointing_cuts_activations(pythia):
    setup = memory.Setup(mode="full", micro_batch=2, seq_len=2048)
    with_gc = memory.memory_terms(pythia, replace(setup, gradient_checkpointing=True))["activations"]
    without = memory.memory_terms(pythia, setup)["activations"]
    assert with_gc < without / 5


def test_modes_order_weights_and_trainable(pythia):
    setup = memory.Setup(micro_batch=1, seq_len=1024, gradient_checkpointing=True, grad_accum=4)
    full, lo, q = (memory.memory_terms(pythia, replace(setup, mode=m)) for m in ("full", "lora", "qlora"))
    assert q["weights"] < lo["weights"] == pythia.params * 2
    assert full["trainable"] == 0 and lo["trainable"] == q["trainable"] > 0
    # full bf16 without DeepSpeed: fp32 weights (the master copy) + autocast's bf16 copy of the matmul
    # weights, fp32 gradients, AdamW's two fp32 moments
    assert full["weights"] == pythia.params * 4 + pythia.quantizable_params * 2
    assert full["gradients"] == 4 * pythia.params and full["optimizer"] == 8 * pythia.params
    # under ZeRO (one GPU): bf16 weights, 2 (grad) + 4 (fp32 grad) + 12 (AdamW + fp32 master) bytes
    z = memory.memory_terms(pythia, replace(setup, mode="full", zero_stage=2, reduce_bucket=0))
    assert z["weights"] == pythia.params * 2
    assert z["gradients"] == 6 * pythia.params and z["optimizer"] == 12 * pythia.params
    # LoRA: fp32 adapters, fp32 gradients, AdamW states, no master copy
    assert lo["gradients"] == lo["trainable"] and lo["optimizer"] == 2 * lo["trainable"]
    fp32 = memory.memory_terms(pythia, replace(setup, mode="full", dtype="fp32"))
    assert (
        fp32["weights"] == fp32["gradients"] == 4 * pythia.params and fp32["optimizer"] == 8 * pythia.params
    )


def test_zero_stages_partition_and_offload(pythia):
    setup = memory.Setup(mode="full", gpus=8, grad_accum=4, gradient_checkpointing=True)
    z0, z2, z3 = (memory.memory_terms(pythia, replace(setup, zero_stage=s)) for s in (0, 2, 3))
    # ZeRO-0 (plain DDP) keeps fp32 weights and 8 bytes of AdamW per parameter on every GPU; ZeRO
    # keeps bf16 weights and partitions AdamW + the fp32 master copy (12 bytes) over the GPUs.
    assert z0["optimizer"] == 8 * pythia.params
    assert z2["optimizer"] == pytest.approx(12 * pythia.params / 8)
    assert z2["gradients"] < z0["gradients"] / 4
    assert z2["weights"] == pythia.params * 2 < z0["weights"]
    assert z3["weights"] < z2["weights"] / 4
    off = memory.memory_terms(
        pythia, replace(setup, zero_stage=3, offload_optimizer=True, offload_params=True)
    )
    assert off["optimizer"] == 0 and off["weights"] < z3["weights"]
    more = memory.memory_terms(pythia, replace(setup, zero_stage=3, gpus=16))
    assert more["weights"] < z3["weights"] and more["optimizer"] == pytest.approx(z3["optimizer"] / 2)


def test_gradients_and_activations_overlap_only_without_accumulation(pythia):
    setup = memory.Setup(mode="full", seq_len=1024, gradient_checkpointing=True, grad_accum=1)
    terms = memory.memory_terms(pythia, setup)
    assert terms["not_live_together"] < 0
    assert terms["not_live_together"] >= -min(terms["gradients"], terms["activations"])
    assert memory.memory_terms(pythia, replace(setup, grad_accum=2))["not_live_together"] == 0


def test_overhead_only_on_cuda(pythia):
    setup = memory.Setup(mode="lora", seq_len=256)
    assert memory.memory_terms(pythia, replace(setup, device="cpu"))["overhead"] == 0
    assert memory.memory_terms(pythia, setup)["overhead"] > memory.CUDA_CONTEXT_GIB * GIB


def test_max_micro_batch_is_the_largest_that_fits(pythia):
    setup = memory.Setup(mode="qlora", seq_len=2048, gradient_checkpointing=True, grad_accum=8)
    best = memory.max_micro_batch(pythia, setup, 24.0)
    assert best >= 1
    assert memory.total_bytes(pythia, replace(setup, micro_batch=best)) <= 24 * GIB
    assert memory.total_bytes(pythia, replace(setup, micro_batch=best + 1)) > 24 * GIB
    assert memory.max_micro_batch(pythia, replace(setup, mode="full"), 24.0) == 0


# ---- the recipe and the JSON ----


def test_plan_recipe_json_shape():
    result = plan.plan_recipe(recipe(peft=lora("qlora")), gpus=1, gpu_mem_gib=24)
    assert set(result) >= {"model", "gpus", "gpu_mem_gib", "recipe", "estimates"}
    assert result["model"] == {"name": "EleutherAI/pythia-12b-deduped", "params": 11846072320}
    assert result["gpus"] == 1 and result["gpu_mem_gib"] == 24.0
    keys = {
        "mode",
        "zero_stage",
        "offload",
        "micro_batch",
        "terms_gib",
        "total_gib",
        "fits",
        "max_micro_batch",
    }
    for est in [result["recipe"], *result["estimates"]]:
        assert set(est) == keys
        assert est["total_gib"] == pytest.approx(sum(est["terms_gib"].values()), abs=0.01)
        assert est["fits"] == (est["total_gib"] <= 24)
    assert result["recipe"]["mode"] == "qlora" and result["recipe"]["fits"]
    combos = {(e["mode"], e["zero_stage"], e["offload"]) for e in result["estimates"]}
    assert combos == {
        ("full", 0, False),
        ("full", 2, False),
        ("full", 2, True),
        ("full", 3, False),
        ("full", 3, True),
        ("lora", 0, False),
        ("qlora", 0, False),
    }
    same = next(e for e in result["estimates"] if e["mode"] == "qlora")
    assert same == result["recipe"]
    json.dumps(result)


def test_plan_recipe_reads_deepspeed_and_gpus():
    result = plan.plan_recipe(recipe(deepspeed_config="zero3-offload", dtype="fp16"), gpus=8, gpu_mem_gib=80)
    rec = result["recipe"]
    assert (rec["mode"], rec["zero_stage"], rec["offload"]) == ("full", 3, True)
    assert rec["terms_gib"]["optimizer"] == 0
    z2 = plan.plan_recipe(recipe(deepspeed_config="zero2"), gpus=8, gpu_mem_gib=80)["recipe"]
    assert (z2["zero_stage"], z2["offload"]) == (2, False)
    assert z2["terms_gib"]["optimizer"] == pytest.approx(11.846e9 * 12 / 8 / GIB, rel=0.01)


def test_deepspeed_settings_from_files(tmp_path):
    assert shipped.read_deepspeed(None).zero_stage == 0
    offload = shipped.read_deepspeed("zero2-offload")
    assert offload.zero_stage == 2 and offload.offload_optimizer and not offload.offload_params
    assert offload.reduce_bucket == 10**9
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    got = shipped.read_deepspeed("ds.json", tmp_path)
    assert got.zero_stage == 3 and got.offload_params and not got.offload_optimizer
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(OasstError, match="broken.json"):
        shipped.read_deepspeed(str(tmp_path / "broken.json"))
    with pytest.raises(OasstError, match="file not found"):
        shipped.read_deepspeed(str(tmp_path / "missing.json"))
    (tmp_path / "stage9.json").write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    with pytest.raises(OasstError, match="stage"):
        shipped.read_deepspeed(str(tmp_path / "stage9.json"))


def test_plan_recipe_bad_arguments():
    with pytest.raises(OasstError, match="--gpus"):
        plan.plan_recipe(recipe(), gpus=0)
    with pytest.raises(OasstError, match="--gpu-mem"):
        plan.plan_recipe(recipe(), gpu_mem_gib=0)
    with pytest.raises(OasstError, match="peft.mode"):
        plan.plan_recipe(recipe(peft=lora("adapters")))


def test_shipped_recipes_plan_offline(monkeypatch):
    from oasst_peft.config import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in sorted((shipped.RECIPES_DIR).glob("*.yaml")):
        result = plan.plan_recipe(load_recipe(path), gpus=1, gpu_mem_gib=24)
        assert result["model"]["params"] > 1e8, path.name
    qlora = plan.plan_recipe(load_recipe(shipped.RECIPES_DIR / "pythia12b-sft1-qlora.yaml"), gpu_mem_gib=24)
    assert qlora["recipe"]["fits"]  # the recipes' comment promises a 24 GB card


def test_format_plan_prints_a_table():
    from rich.console import Console

    result = plan.plan_recipe(recipe(peft=lora()), gpus=2, gpu_mem_gib=40)
    buf = io.StringIO()
    plan.format_plan(result, console=Console(file=buf, width=100))
    text = buf.getvalue()
    for word in ("11.846 B", "weights", "activations", "total", "max micro-batch", "qlora", "full"):
        assert word in text
