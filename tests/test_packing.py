"""Run fast without changing the loss: packing keeps conversations apart, length grouping keeps every example.

The packed-loss tests build the real trainer (``oasst_peft.train.sft_config`` + ``make_trainer``) on a tiny
random model, take a packed batch from its own dataloader and check that its loss equals the token-weighted
loss of the same conversations run one by one. Also: the decisions of ``oasst_peft.speed`` (packing, length
grouping, gradient checkpointing, kernels) and the recipe keys that switch them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from oasst_peft import settings, speed
from oasst_peft.config import load_recipe, recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.model import load_model, load_tokenizer
from oasst_peft.train import make_trainer, prepare_data, sft_config, train
from tests.tiny import CORPUS, make_model, make_tokenizer

STYLE = {"gpt_neox": "neox", "llama": "llama", "bloom": "bloom"}
ROOT = Path(__file__).resolve().parent.parent


def quiet(_line: str) -> None:
    pass


def varied_conversations(path: Path, n: int = 24) -> Path:
    """Conversations of 1 to 3 exchanges and very different lengths, every one distinct."""
    words = " ".join(CORPUS).split()
    rows = []
    for i in range(n):
        messages = []
        for turn in range(1 + i % 3):
            k = 2 + (i * 7 + turn * 5) % 23
            ask = " ".join(words[(i + j) % len(words)] for j in range(k))
            messages += [
                {"role": "user", "content": f"{i}: {ask}"},
                {"role": "assistant", "content": " ".join(reversed(ask.split()))},
            ]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_recipe(tmp_path: Path, arch: str = "llama", **extra):
    tok = make_tokenizer(STYLE[arch])
    base = tmp_path / f"base-{arch}"
    model = make_model(arch, tok, hidden=64)
    with torch.no_grad():  # larger weights than the default init, so attention to context moves the loss
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(6)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    d = {
        "model_name": str(base),
        "dtype": "fp32",
        "max_length": 128,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "output_dir": str(tmp_path / "run"),
        "datasets": [
            {"chat": {"data_files": str(varied_conversations(tmp_path / "c.jsonl")), "format": "messages"}}
        ],
        "cache_dir": str(tmp_path / "cache"),
    }
    d.update(extra)
    return recipe_from_dict(d)


def build_trainer(recipe, attn: str | None = None):
    """The trainer ``train()`` builds (same calls, same order), without training; ``attn`` overrides the attention."""
    recipe = settings.settle(recipe, say=quiet)
    tokenizer, fmt = load_tokenizer(recipe)
    tokenized, _ = prepare_data(recipe, tokenizer, say=quiet)
    set_seed(recipe.seed % (2**32))
    model = load_model(recipe, tokenizer, fmt, say=quiet).model
    if attn:
        model.set_attn_implementation(attn)
    batching = speed.choose_batching(recipe, model.config._attn_implementation, model.config)
    args = sft_config(recipe, Path(recipe.output_dir), "fp32", None, False, None, batching=batching)
    trainer = make_trainer(
        fused_loss=recipe.fused_loss,
        model=model,
        args=args,
        train_dataset=tokenized.train,
        processing_class=tokenizer,
    )
    return trainer, batching, tokenized


def loss_one_by_one(model, batch) -> float:
    """Token-weighted loss of the packed row's conversations, each run alone (no packing, no padding)."""
    pos = batch["position_ids"][0]
    starts = [*(pos == 0).nonzero().flatten().tolist(), pos.numel()]
    total, count = 0.0, 0
    for a, b in zip(starts, starts[1:], strict=False):
        ids = batch["input_ids"][:, a:b]
        labels = batch["labels"][:, a:b]
        logits = model(input_ids=ids, use_cache=False).logits
        shifted = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((shifted != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------------------
# Packing: the loss of a packed batch is the loss of its conversations run one by one
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,attn,fused",
    [
        ("llama", "sdpa", True),
        ("llama", "eager", False),
        ("gpt_neox", "sdpa", False),
        ("gpt_neox", "eager", True),
    ],
)
def test_packed_batch_loss_equals_conversations_run_one_by_one(tmp_path, arch, attn, fused):
    recipe = tiny_recipe(tmp_path, arch, packing=True, fused_loss=fused)
    trainer, batching, _ = build_trainer(recipe, attn)
    assert batching.packing
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one row
    assert int((batch["position_ids"] == 0).sum()) >= 3, "the batch should hold several conversations"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        alone = loss_one_by_one(model, batch)
        # Control: the same row and positions with a plain causal mask, so conversations see each other.
        mixed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            labels=batch["labels"],
            use_cache=False,
        ).loss.item()
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert abs(mixed - alone) > 1e-2, "the control must differ, or the test could not see cross-attention"


def test_packed_epoch_keeps_every_conversation_whole_once(tmp_path):
    recipe = tiny_recipe(tmp_path, "llama", packing=True)
    trainer, _, tokenized = build_trainer(recipe)
    seen = Counter()
    for batch in trainer.get_train_dataloader():
        pos = batch["position_ids"][0]
        starts = [*(pos == 0).nonzero().flatten().tolist(), pos.numel()]
        for a, b in zip(starts, starts[1:], strict=False):
            seen[tuple(batch["input_ids"][0, a:b].tolist())] += 1
    assert seen == Counter(tuple(ids) for ids in tokenized.train["input_ids"])


def test_packing_true_with_attention_that_mixes_conversations_is_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path, "bloom", packing=True)
    with pytest.raises(OasstError, match="packing: true") as err:
        train(recipe, say=quiet)
    assert "\n" not in str(err.value) and "flash" in str(err.value)
    assert not (Path(recipe.output_dir) / "oasst_run.json").exists()


@pytest.mark.parametrize("arch,expected", [("llama", True), ("gpt_neox", True), ("bloom", False)])
def test_probe_proves_isolation_per_architecture(arch, expected):
    config = make_model(arch, make_tokenizer(STYLE[arch])).config
    for attn in ("sdpa", "eager"):
        assert speed.keeps_packed_apart(config, attn) is expected
    assert speed.keeps_packed_apart(config, "flash_attention_2") is True  # varlen kernels, by construction


def test_choose_batching():
    def r(**kw):
        return recipe_from_dict({"model_name": "x", "datasets": ["alpaca"], **kw})

    auto_sdpa = speed.choose_batching(r(), "sdpa")
    assert (auto_sdpa.packing, auto_sdpa.group_by_length) == (False, True)
    assert auto_sdpa.sft_kwargs()["train_sampling_strategy"] == "group_by_length"
    flash = speed.choose_batching(r(), "flash_attention_2")
    assert flash.packing and flash.sft_kwargs() == {
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "train_sampling_strategy": "random",
    }
    assert not speed.choose_batching(r(packing=False), "flash_attention_2").packing
    assert speed.choose_batching(r(sort_by_length=False), "sdpa").name == "random"
    assert speed.choose_batching(r(packing=False, sort_by_length=True), "sdpa").name == "length-grouped"
    with pytest.raises(OasstError, match="packing: true"):
        speed.choose_batching(r(packing=True), "sdpa")  # no config to prove isolation with
    assert "length-grouped" in auto_sdpa.line() and "sdpa" in auto_sdpa.line()


# ---------------------------------------------------------------------------------------------------------
# Length grouping: every example exactly once per epoch, less padding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,size", [(1, 4), (7, 4), (64, 8), (333, 8), (1500, 3)])
def test_length_grouped_sampler_yields_every_index_once(n, size):
    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 500, (n,), generator=g).tolist()
    sampler = speed.LengthGroupedSampler(lengths, size, seed=n)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) == size for b in batches[:-1]) and 1 <= len(batches[-1]) <= size
    assert max(lengths) in [lengths[i] for i in batches[0]]
    first = list(sampler)
    assert first == list(speed.LengthGroupedSampler(lengths, size, seed=n)), "the same seed and epoch replay"
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(n)) and len(sampler) == n
    if n > size * 2:
        assert first != second, "each epoch draws a new order"


def padding(batches, lengths) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouping_pads_less_than_random_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.distributions.LogNormal(5.0, 0.8).sample((512,)).clamp(24, 512).int().tolist()
    grouped = speed.LengthGroupedSampler(lengths, 8).batches()
    order = torch.randperm(512, generator=g).tolist()
    random_batches = [order[i : i + 8] for i in range(0, 512, 8)]
    assert padding(grouped, lengths) < 0.05 < 0.3 < padding(random_batches, lengths)


def test_trainer_epoch_sees_every_example_once_in_length_groups(tmp_path):
    recipe = tiny_recipe(tmp_path, "gpt_neox")  # packing: auto on CPU -> length-grouped batches
    trainer, batching, tokenized = build_trainer(recipe)
    assert batching.name == "length-grouped"
    assert isinstance(trainer._get_train_sampler(), speed.LengthGroupedSampler)
    seen, real, total = Counter(), 0, 0
    for batch in trainer.get_train_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            seen[tuple(ids[mask.bool()].tolist())] += 1
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    assert seen == Counter(tuple(ids) for ids in tokenized.train["input_ids"])
    lengths = [len(ids) for ids in tokenized.train["input_ids"]]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_padding = padding([order[i : i + 4] for i in range(0, len(order), 4)], lengths)
    assert 1 - real / total < random_padding


def test_sort_by_length_false_keeps_random_batches(tmp_path):
    recipe = tiny_recipe(tmp_path, "gpt_neox", sort_by_length=False)
    trainer, batching, _ = build_trainer(recipe)
    assert batching.name == "random" and trainer.args.train_sampling_strategy == "random"
    assert not isinstance(trainer._get_train_sampler(), speed.LengthGroupedSampler)


# ---------------------------------------------------------------------------------------------------------
# Training end to end, and the recipe surface
# ---------------------------------------------------------------------------------------------------------


def test_packed_lora_run_trains_and_says_how_it_batched(tmp_path):
    recipe = tiny_recipe(
        tmp_path, "llama", packing=True, peft={"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    )
    lines: list[str] = []
    res = train(recipe, max_steps=2, say=lines.append)
    assert torch.isfinite(torch.tensor(res.metrics["train_loss"]))
    assert [ln for ln in lines if ln.startswith("batching:")] == [
        "batching: packing (packing: true; sdpa masks each packed conversation on this architecture)"
    ]
    assert sum(ln.startswith("gradient_checkpointing: off") for ln in lines) == 1


def test_gradient_checkpointing_unset_is_on_for_7b_class_models():
    assert settings.resolve_gradient_checkpointing(None, 7_000_000_000)[0] is True
    assert settings.resolve_gradient_checkpointing(None, 3_000_000_000)[0] is False
    assert settings.resolve_gradient_checkpointing(False, 12_000_000_000) == (False, None)
    assert settings.resolve_gradient_checkpointing(None, None)[0] is False

    def settled(model_name, **kw):
        lines: list[str] = []
        r = settings.settle(
            recipe_from_dict({"model_name": model_name, "datasets": ["alpaca"], **kw}), say=lines.append
        )
        return r.gradient_checkpointing, lines

    on, lines = settled("stabilityai/stablelm-base-alpha-7b")  # shipped config: works offline
    assert on is True and len(lines) == 1 and "7.9B parameters" in lines[0]
    assert settled("EleutherAI/pythia-12b-deduped")[0] is True
    assert settled("ckip-joint/bloom-3b-zh")[0] is False
    assert settled("stabilityai/stablelm-base-alpha-7b", gradient_checkpointing=False) == (False, [])


def test_planner_resolves_unset_gradient_checkpointing_like_train(tmp_path):
    from oasst_peft.plan import plan_recipe

    path = ROOT / "recipes" / "stablelm7b-qlora.yaml"
    unset = load_recipe(path).model_copy(update={"gradient_checkpointing": None})
    assert (
        plan_recipe(unset)["recipe"]
        == plan_recipe(load_recipe(path, ["gradient_checkpointing=true"]))["recipe"]
    )


def test_kernel_options_not_installed_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("liger_kernel", "kernels") else real(n, *a)
    )
    for key, needle in (
        ("use_liger_kernel", "pip install liger-kernel"),
        ("use_kernels", "pip install kernels"),
    ):
        recipe = tiny_recipe(tmp_path, "llama", **{key: True})
        with pytest.raises(OasstError, match=needle) as err:
            train(recipe, say=quiet)
        assert "\n" not in str(err.value) and str(err.value).startswith(key)
        lines: list[str] = []
        assert train(recipe, dry_run=True, say=lines.append).dry_run  # a dry run says it and goes on
        assert any(ln.startswith(f"kernels: unavailable here: {key}") for ln in lines)


def test_recipe_keys_and_their_trainer_arguments(tmp_path):
    base = {"model_name": "x", "datasets": ["alpaca"]}
    r = recipe_from_dict(base)
    assert (r.packing, r.sort_by_length, r.gradient_checkpointing, r.fused_loss) == ("auto", None, None, True)
    assert recipe_from_dict({**base, "packing": True}).packing is True
    with pytest.raises(OasstError, match="packing"):
        recipe_from_dict({**base, "packing": "sometimes"})
    with pytest.raises(OasstError, match="did you mean 'packing'"):
        recipe_from_dict({**base, "pakcing": True})
    args = sft_config(recipe_from_dict({**base, "use_liger_kernel": True}), tmp_path, "fp32", 1, False, None)
    assert args.use_liger_kernel and args.train_sampling_strategy == "group_by_length" and not args.packing
    assert not args.gradient_checkpointing
    args = sft_config(recipe_from_dict({**base, "sort_by_length": False}), tmp_path, "fp32", 1, False, None)
    assert args.train_sampling_strategy == "random"


def test_shipped_recipes_keep_their_explicit_settings():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        if path.stem != "demo-smollm2":
            assert r.gradient_checkpointing is True, path.stem
        # The seed recipes train the cards' conversations per optimizer step, so they never pack (issue 12).
        assert r.packing == ("auto" if path.stem == "demo-smollm2" else False), path.stem
