"""Sampling on tiny models: prompt bytes, memorisation end to end, merged == adapter, report, callback, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from oasst_peft.eval_samples import SampleOnEvalCallback
from oasst_peft.sample import (
    SAMPLING_CONFIGS,
    format_report,
    generate_replies,
    load_prompts,
    load_sampler,
    prompt_ids,
    render_prompt,
    sample,
    widget_prompts,
    write_report,
)
from oasst_peft.template import WIDGET_PROMPTS, setup_tokenizer, tokenize_with_mask
from oasst_peft.train import train
from tests.tiny import make_model, make_tokenizer

CONVERSATION = [
    {"role": "user", "content": "what is a meme"},
    {"role": "assistant", "content": "a joke that spreads from person to person"},
    {"role": "user", "content": "convert five kilometres to metres"},
    {"role": "assistant", "content": "five thousand metres"},
]
# The prompts that lead to each assistant turn of CONVERSATION, and the turns themselves.
PROMPTS = [CONVERSATION[:1], CONVERSATION[:3]]
EXPECTED = [CONVERSATION[1]["content"], CONVERSATION[3]["content"]]


def _tiny_base(root: Path, style: str = "neox", arch: str = "gpt_neox") -> Path:
    tok = make_tokenizer(style)
    model = make_model(arch, tok, hidden=64)
    out = root / f"base-{arch}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _memorise(root: Path, mode: str, steps: int, lr: float) -> Path:
    """Train a tiny model on CONVERSATION alone for ``steps`` steps; returns the run dir."""
    base = _tiny_base(root)
    data = root / "one.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    recipe = {
        "model_name": str(base),
        "dtype": "fp32",
        "max_length": 128,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "num_train_epochs": 1000,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_strategy": "no",
        "logging_steps": 50,
        "output_dir": str(root / "run"),
        "datasets": [{"one": {"data_files": str(data), "format": "messages", "val_split": 0.0}}],
        "cache_dir": str(root / "cache"),
    }
    if mode != "full":
        recipe["peft"] = {"mode": mode, "r": 8, "alpha": 16, "dropout": 0.0}
    train(recipe_from_dict(recipe), max_steps=steps, say=lambda _m: None)
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _memorise(tmp_path_factory.mktemp("lora"), "lora", steps=80, lr=1e-2)


@pytest.fixture(scope="module")
def merged_dir(lora_run, tmp_path_factory) -> Path:
    """What ``oasst-peft merge`` writes, made here with peft so this file does not depend on merge_tools."""
    s = load_sampler(lora_run, merge=False)
    out = tmp_path_factory.mktemp("merged") / "merged"
    model = s.model.merge_and_unload()
    model.save_pretrained(out)
    s.tokenizer.save_pretrained(out)
    model.generation_config.eos_token_id = s.eos_ids[0]
    model.generation_config.save_pretrained(out)
    return out


# ---------------------------------------------------------------- prompt building


@pytest.mark.parametrize("style", ["neox", "bloom", "llama"])
def test_prompt_is_the_saved_template_byte_for_byte(tmp_path, style):
    tok = make_tokenizer(style)
    fmt = setup_tokenizer(tok)
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # what a run dir holds
    for messages in widget_prompts():
        expected = f"<|prompter|>{messages[0]['content']}{fmt.eot}<|assistant|>"
        assert render_prompt(saved, messages) == expected
        # The prompt's ids are exactly the ids training saw before the reply.
        ids, mask = tokenize_with_mask(saved, [*messages, {"role": "assistant", "content": "ok"}])
        got = prompt_ids(saved, messages)
        assert got == ids[: len(got)]
        assert not any(mask[: len(got)]) and mask[len(got)] == 1


def test_widget_prompts_match_the_cards():
    assert [m[0]["content"] for m in widget_prompts()] == list(WIDGET_PROMPTS)
    assert WIDGET_PROMPTS[0] == "What is a meme, and what's the history behind this word?"


# ---------------------------------------------------------------- end to end


def test_memorised_conversation_is_reproduced_by_greedy_sampling(lora_run):
    report = sample(lora_run, prompts=PROMPTS, max_new_tokens=48)
    got = report["replies"]["greedy"]
    assert [r["reply"] for r in got] == EXPECTED
    assert all(r["ended_with_eot"] for r in got)
    assert report["model"]["kind"] == "adapter"
    assert report["model"]["eot_tokens"] == ["<|endoftext|>"]


def test_untrained_base_does_not_reproduce_it(lora_run):
    """The memorisation check can fail: the same prompts on the base (oasst template installed) do not."""
    base = json.loads((lora_run / "oasst_run.json").read_text())["base_model"]
    report = sample(base, prompts=PROMPTS, max_new_tokens=48, chat_template="oasst")
    assert [r["reply"] for r in report["replies"]["greedy"]] != EXPECTED


def test_full_weight_run_memorises_too(tmp_path):
    run = _memorise(tmp_path, "full", steps=60, lr=5e-3)
    report = sample(run, prompts=PROMPTS, max_new_tokens=48)
    assert [r["reply"] for r in report["replies"]["greedy"]] == EXPECTED
    assert report["model"]["kind"] == "model"


def test_batched_left_padding_equals_one_by_one(lora_run):
    s = load_sampler(lora_run)
    prompts = [*PROMPTS, *widget_prompts()]
    batched = generate_replies(s.model, s.tokenizer, prompts, "greedy", 24, s.eos_ids, s.pad_id, batch_size=5)
    single = generate_replies(s.model, s.tokenizer, prompts, "greedy", 24, s.eos_ids, s.pad_id, batch_size=1)
    assert batched == single
    assert len({len(prompt_ids(s.tokenizer, m)) for m in prompts}) > 1  # the batch really was padded


def test_merged_model_and_base_plus_adapter_agree_with_the_adapter(lora_run, merged_dir):
    prompts = [*PROMPTS, *widget_prompts()]
    adapter = sample(lora_run, prompts=prompts, max_new_tokens=32)
    merged = sample(merged_dir, prompts=prompts, max_new_tokens=32)
    base = json.loads((lora_run / "oasst_run.json").read_text())["base_model"]
    pair = sample(base, adapter=lora_run, prompts=prompts, max_new_tokens=32)
    assert merged["replies"] == adapter["replies"] == pair["replies"]
    assert merged["model"]["kind"] == "model" and pair["model"]["kind"] == "base+adapter"


def test_checkpoint_dir_finds_its_base_through_the_run(lora_run, tmp_path):
    import shutil

    ckpt = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(lora_run, ckpt)
    (ckpt / "oasst_run.json").rename(tmp_path / "run" / "oasst_run.json")
    report = sample(ckpt, prompts=PROMPTS[:1], max_new_tokens=48)
    assert report["replies"]["greedy"][0]["reply"] == EXPECTED[0]


# ---------------------------------------------------------------- report


def test_report_is_valid_and_complete(lora_run, tmp_path, capsys):
    report = sample(lora_run, configs=list(SAMPLING_CONFIGS), max_new_tokens=12, seed=3, batch_size=2)
    path = write_report(report, tmp_path / "report.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) >= {"model", "settings", "configs", "prompts", "replies", "timings", "versions"}
    assert data["settings"] == {"max_new_tokens": 12, "seed": 3, "batch_size": 2}
    assert set(data["configs"]) == set(data["replies"]) == set(SAMPLING_CONFIGS)
    assert data["configs"]["typical"]["typical_p"] == 0.2
    assert [p["messages"][0]["content"] for p in data["prompts"]] == list(WIDGET_PROMPTS)
    assert all(p["text"].endswith("<|assistant|>") and p["tokens"] > 0 for p in data["prompts"])
    for name, rows in data["replies"].items():
        assert [r["prompt"] for r in rows] == [0, 1, 2]
        for r in rows:
            assert isinstance(r["reply"], str) and isinstance(r["ended_with_eot"], bool)
            assert r["stop_token"] == ("<|endoftext|>" if r["ended_with_eot"] else None)
            assert 1 <= r["new_tokens"] <= 12
        t = data["timings"][name]
        assert t["seconds"] > 0 and t["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert data["timings"]["load_s"] > 0 and data["timings"]["total_s"] >= data["timings"]["load_s"]
    assert data["model"]["path"] == str(lora_run) and data["model"]["base"]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file
    format_report(data)
    out = capsys.readouterr().out
    assert "What is a meme" in out and "beam" in out and "tok/s" in out


def test_seed_makes_sampling_repeatable(lora_run):
    a = sample(lora_run, configs=["typical", "nucleus"], max_new_tokens=10, seed=7)
    b = sample(lora_run, configs=["typical", "nucleus"], max_new_tokens=10, seed=7)
    assert a["replies"] == b["replies"]


# ---------------------------------------------------------------- during training


def test_sample_on_eval_callback_prints_and_logs_to_tensorboard(lora_run, tmp_path):
    s = load_sampler(lora_run, merge=False)  # the PeftModel, as during training
    lines: list[str] = []
    cb = SampleOnEvalCallback(
        s.tokenizer, prompts=PROMPTS, max_new_tokens=48, say=lines.append, log_dir=tmp_path
    )
    args = SimpleNamespace(report_to=["tensorboard"], output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=5, is_world_process_zero=True)
    s.model.train()
    cb.on_evaluate(args, state, None, model=s.model)
    cb.on_evaluate(args, state, None, model=s.model)  # a second validation set at the same step
    assert s.model.training  # put back in training mode
    assert cb.history == [{"step": 5, "replies": EXPECTED}]
    assert len(lines) == 2 and "step 5" in lines[0] and EXPECTED[0] in lines[0]
    cb.on_train_end(args, state, None)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_callback_runs_inside_a_trainer_evaluating_two_validation_sets(lora_run, tmp_path):
    """The Trainer passes the model to callbacks and evaluates each validation set: one sample per eval."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    s = load_sampler(lora_run, merge=False)
    ids, mask = tokenize_with_mask(s.tokenizer, CONVERSATION)
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    data = Dataset.from_dict({"input_ids": [ids], "labels": [labels]})
    lines: list[str] = []
    cb = SampleOnEvalCallback(s.tokenizer, prompts=PROMPTS, max_new_tokens=48, say=lines.append)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=s.model, args=args, eval_dataset={"a": data, "b": data}, callbacks=[cb])
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss"} <= set(metrics)
    assert cb.history == [{"step": 0, "replies": EXPECTED}]
    assert len(lines) == len(PROMPTS)


# ---------------------------------------------------------------- errors


def test_prompt_file_plain_lines_and_messages(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        "How tall is a giraffe?\n\n"
        + json.dumps(
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
        )
        + "\n",
        encoding="utf-8",
    )
    assert load_prompts(f) == [
        [{"role": "user", "content": "How tall is a giraffe?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"messages": [}\n', "p.jsonl:1: invalid JSON"),
        ('hello\n{"prompt": "x"}\n', "p.jsonl:2: a JSON line needs a 'messages' key"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            "last message",
        ),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', "messages[0] must be"),
        ("\n  \n", "holds no prompts"),
    ],
)
def test_bad_prompt_file_is_one_line(tmp_path, text, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(OasstError) as e:
        load_prompts(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_prompt_file_is_one_line(tmp_path):
    with pytest.raises(OasstError, match="--prompts: file not found"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing", "MODEL: local path not found"),
        (lambda p: p.mkdir(exist_ok=True) or p, "has neither config.json nor adapter_config.json"),
        (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "is a file but not .gguf"),
        (lambda p: "nobody/no-such-model", "HF_HUB_OFFLINE"),
    ],
)
def test_bad_model_path_is_one_line(tmp_path, monkeypatch, make, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OasstError) as e:
        sample(make(tmp_path), max_new_tokens=4)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_adapter_and_config_are_one_line(lora_run, tmp_path):
    base = json.loads((lora_run / "oasst_run.json").read_text())["base_model"]
    with pytest.raises(OasstError, match="--adapter: .* does not exist"):
        sample(base, adapter=tmp_path / "nope")
    with pytest.raises(OasstError, match="is itself an adapter"):
        sample(lora_run, adapter=lora_run)
    with pytest.raises(OasstError, match="did you mean 'greedy'"):
        sample(lora_run, configs=["gredy"])
    with pytest.raises(OasstError, match="no chat template"):
        sample(base)


def test_moved_base_model_is_one_line(lora_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    record = json.loads((run / "oasst_run.json").read_text())
    record["base_model"] = str(tmp_path / "gone")
    (run / "oasst_run.json").write_text(json.dumps(record))
    with pytest.raises(OasstError, match="is not there; pass the base as MODEL"):
        sample(run)


def test_report_goes_into_a_folder_made_for_it_and_not_under_a_file(tmp_path):
    path = write_report({"rows": []}, tmp_path / "new" / "deeper" / "report.json")
    assert json.loads(path.read_text()) == {"rows": []}
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OasstError, match="is a file, so"):
        write_report({}, tmp_path / "taken" / "r.json")


# ---------------------------------------------------------------- command line and recipe key


def test_cli_sample_prints_a_table_and_writes_the_report(lora_run, tmp_path, capsys):
    from oasst_peft.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as e:
        main(
            ["sample", str(lora_run), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "48"]
        )
    printed = capsys.readouterr().out
    assert e.value.code == 0
    assert EXPECTED[1] in printed and "report:" in printed
    report = json.loads(out.read_text())
    assert [r["reply"] for r in report["replies"]["greedy"]] == EXPECTED


def test_cli_sample_bad_input_is_one_line_exit_1(lora_run, tmp_path, capsys):
    from oasst_peft.cli import main

    for args, needle, code in (
        ([str(tmp_path / "nope")], "nope", 1),
        ([str(lora_run), "--config", "wild"], "wild", 2),  # refused at parse time: a usage error
        ([str(lora_run), "--out", str(tmp_path)], "is a folder", 1),
    ):
        with pytest.raises(SystemExit) as e:
            main(["sample", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code and len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_sample_on_eval_recipe_key_logs_replies_during_training(tmp_path):
    base = _tiny_base(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(10)), encoding="utf-8"
    )
    lines: list[str] = []
    recipe = recipe_from_dict(
        {
            "model_name": str(base),
            "dtype": "fp32",
            "max_length": 128,
            "warmup_steps": 0,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "eval_steps": 2,
            "save_strategy": "no",
            "sample_on_eval": True,
            "output_dir": str(tmp_path / "run"),
            "log_dir": str(tmp_path / "tb"),
            "datasets": [{"one": {"data_files": str(data), "format": "messages", "val_split": 0.2}}],
            "cache_dir": str(tmp_path / "cache"),
            "peft": {"mode": "lora", "r": 4, "alpha": 8},
        }
    )
    train(recipe, max_steps=4, say=lines.append)
    samples = [line for line in lines if line.startswith("sample @ step")]
    # Three widget prompts at steps 2 and 4.
    assert len(samples) == 6 and sum("step 4" in s for s in samples) == 3
    assert WIDGET_PROMPTS[0] in samples[0]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").rglob("*"))
