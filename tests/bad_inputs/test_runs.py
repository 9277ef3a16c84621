"""Bad models, templates, output dirs, resumes, launches and merges through the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from oasst_peft import fingerprint
from oasst_peft.config import load_recipe
from tests.bad_inputs.corpus import Corpus, registry, run_case, snapshot
from tests.tiny import make_model, make_tokenizer

CASES, case = registry()


@case("model-path-not-found", "model_name: local path not found", "no-such-model")
def _(c):
    return c.train(c.recipe(model_name=str(c.tmp / "no-such-model")))


@case("model-folder-without-config", "has no config.json", "Hugging Face model folder")
def _(c):
    (c.tmp / "not-a-model").mkdir()
    return c.train(c.recipe(model_name=str(c.tmp / "not-a-model")))


@case("pickle-weights", "pickle (.bin) weights are refused", "convert them to safetensors", loads_model=True)
def _(c):
    folder = c.tmp / "pickled"
    tok = make_tokenizer("neox")
    model = make_model("gpt_neox", tok)
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return c.train(c.recipe(model_name=str(folder)))


@case("gguf-package-missing", "model_name: reading base.gguf needs the gguf package", "oasst-peft[demo]")
def _(c):
    (c.tmp / "base.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    c.shared["hide_module"] = "gguf"
    return c.train(c.recipe(model_name=str(c.tmp / "base.gguf")))


@case("sample-mistyped-run-folder", "MODEL: local path not found: runs/demo-rn", "(did you mean 'demo-run'?)")
def _(c):
    (c.tmp / "runs" / "demo-run").mkdir(parents=True)
    c.shared["cwd"] = c.tmp  # a relative path, as typed: offline, not taken for a hub id
    return ["sample", "runs/demo-rn"]


@case("export-missing-source-beside-a-modelfile", "export:", "nope is not a folder")
def _(c):
    (c.tmp / "Modelfile").write_text("FROM ./other.gguf\n")  # left by an earlier export: not the problem
    return ["export", c.tmp / "nope", "--gguf", c.tmp / "x.gguf"]


@case("export-without-the-gguf-package", "export needs the gguf package", "oasst-peft[demo]")
def _(c):
    c.shared["hide_module"] = "gguf"
    return ["export", c.shared["adapter_run"], "--gguf", c.tmp / "x.gguf"]


@case(
    "merge-gguf-base-without-the-gguf-package", "reading base.gguf needs the gguf package", "oasst-peft[demo]"
)
def _(c):
    (c.tmp / "base.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    c.shared["hide_module"] = "gguf"
    return ["merge", c.shared["adapter_run"], "--base", c.tmp / "base.gguf", "--out", c.tmp / "merged"]


@case("sample-out-under-a-file", "--out:", "is a file, so", "choose another path")
def _(c):  # refused before the model loads, so no replies are generated and then lost
    (c.tmp / "taken").write_text("a file, not a folder")
    return ["sample", c.shared["adapter_run"], "--out", c.tmp / "taken" / "report.json"]


@case("chat-template-missing", "chat_template: file not found", "use 'oasst'")
def _(c):
    return c.train(c.recipe(chat_template="templates/mine.jinja"))


@case("deepspeed-config-missing", "deepspeed_config: file not found", "zero2, zero3")
def _(c):
    return c.train(c.recipe(deepspeed_config="ds/mine.json"))


@case("output-dir-exists", "output_dir:", "already holds a run", "--resume", "--overwrite", "--output-dir")
def _(c):
    c.run.mkdir()
    (c.run / "adapter_model.safetensors").write_bytes(b"a finished run")
    return c.train(c.recipe())


@case("resume-without-checkpoint", "--resume: no complete checkpoint-* folder", "train without --resume")
def _(c):
    c.run.mkdir()
    return c.train(c.recipe(), "--resume")


@case(
    "resume-named-checkpoint-missing",
    "checkpoint not found: checkpoint-9",
    "holds checkpoint-2, checkpoint-4",
)
def _(c):
    for step in (4, 2):
        (c.run / f"checkpoint-{step}").mkdir(parents=True)
    return c.train(c.recipe(), "--resume", "checkpoint-9")


@case("resume-incomplete-checkpoint", "checkpoint-4 is incomplete", "pick an earlier checkpoint")
def _(c):
    (c.run / "checkpoint-4").mkdir(parents=True)
    (c.run / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    return c.train(c.recipe(), "--resume", "checkpoint-4")


def _checkpoint_of_another_model(c: Corpus) -> Path:
    """A complete checkpoint whose fingerprint says it trained another base model on other data."""
    recipe = c.recipe()
    values = fingerprint.recipe_values(load_recipe(recipe), max_steps=1)
    values["model_name"] = "EleutherAI/pythia-70m-deduped"
    theirs = fingerprint.Fingerprint("sha256:0", "sha256:1", "sha256:2", 1, values)
    state = {
        "global_step": 2,
        "stateful_callbacks": {
            "FingerprintCallback": {"args": {"fingerprint": theirs.to_dict()}, "attributes": {}}
        },
    }
    ckpt = c.run / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (c.run / "latest").write_text("checkpoint-2\n")
    return recipe


@case(
    "resume-another-models-checkpoint",
    "--resume: checkpoint-2 cannot continue this run",
    'model_name: "EleutherAI/pythia-70m-deduped" ->',
    "the tokenizer changed",
    "add --force",
)
def _(c):
    return c.train(_checkpoint_of_another_model(c), "--resume")


@case("dry-run-missing-data-file", "datasets: chat: data_files: file not found")
def _(c):
    return ["train", c.with_data(c.tmp / "nope.jsonl"), "--dry-run"]


@case("dry-run-corrupt-gzip", "corrupt or truncated gzip file")
def _(c):
    path = c.tmp / "convs.jsonl.gz"
    path.write_bytes(b"this was never gzip\n")
    return ["train", c.with_data(path), "--dry-run"]


@case("dry-run-model-path-not-found", "model_name: local path not found")
def _(c):
    return ["train", c.recipe(model_name=str(c.tmp / "no-such-model")), "--dry-run"]


# -------------------------------------------------------------------------- before a launcher starts


@case("launcher-bad-data", "datasets: chat: data_files: file not found")
def _(c):
    return c.train(c.with_data(c.tmp / "nope.jsonl"), "--nproc", "2")


@case("launcher-resume-another-model", "cannot continue this run", "the tokenizer changed")
def _(c):
    return c.train(_checkpoint_of_another_model(c), "--resume", "--nproc", "2")


@case("launcher-output-dir-exists", "already holds a run")
def _(c):
    c.run.mkdir()
    (c.run / "adapter_model.safetensors").write_bytes(b"a finished run")
    return c.train(c.recipe(), "--nproc", "2")


# --------------------------------------------------------------------------------------------- merge


@case("merge-adapter-of-another-base", "the adapter was not trained on base", "pass --base")
def _(c):
    return ["merge", c.shared["adapter_run"], "--base", c.shared["other_base"], "--out", c.run, "--no-verify"]


@case("merge-out-exists", "--out:", "already exists; pass --overwrite")
def _(c):
    c.run.mkdir()
    (c.run / "config.json").write_text("{}")
    return ["merge", c.shared["adapter_run"], "--out", c.run]


@case("merge-disk-full", "--out: needs", "free on the disk", "only 1.00 KB is free", "choose another --out")
def _(c):
    c.shared["disk_free"] = 1000
    return ["merge", c.shared["adapter_run"], "--out", c.run, "--no-verify"]


@case("tokenized-cache-disk-full", "cache_dir: cannot write the tokenized cache", "No space left on device")
def _(c):
    c.shared["cache_enospc"] = True
    return c.train(c.recipe(cache_dir=str(c.tmp / "fresh-cache")))


@pytest.mark.parametrize("name", list(CASES))
def test_case(name, shared, tmp_path, monkeypatch, capsys):
    run_case(CASES[name], Corpus(tmp_path, shared), monkeypatch, capsys)


def test_a_real_process_prints_exactly_one_line_on_stderr(tmp_path, shared):
    """Outside pytest's capture: no library warning or progress bar joins the error line."""
    import subprocess
    import sys

    c = Corpus(tmp_path, shared)
    argv = [str(a) for a in c.train(_checkpoint_of_another_model(c), "--resume")]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OASST_PEFT_DEBUG", None)
    before = snapshot(c.run)
    res = subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(
        "error: --resume: checkpoint-2 cannot continue"
    )
    assert snapshot(c.run) == before
