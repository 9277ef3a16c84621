"""One corpus of bad inputs, each run through the real CLI (``oasst_peft.cli.main``).

Every case must end with exit code 1 and exactly one line on stderr, ``error: ...``, holding the words
that name the file, key or line and what to do; no traceback; nothing written to the run's output dir;
and, for ``train``, neither the model weights loaded nor a launcher started (both are patched to fail
the test if reached). Cases tested elsewhere with their message are listed again here so the corpus is
complete in one place. A full disk in the middle of a run has its own tests at the end.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from oasst_peft import fingerprint
from oasst_peft.checkpoints import is_complete
from oasst_peft.cli import main
from oasst_peft.config import load_recipe
from tests.data.builders import A, P, tree
from tests.tiny import make_model, make_tokenizer
from tests.tiny_run import (
    conversation,
    recipe_dict,
    write_conversations,
    write_jsonl,
    write_recipe,
)

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


class Corpus:
    """What a case needs: a fresh folder, the shared tiny base and data, and a recipe writer."""

    def __init__(self, tmp: Path, shared: dict):
        self.tmp = tmp
        self.base: Path = shared["base"]
        self.data: Path = shared["data"]
        self.cache: Path = shared["cache"]
        self.shared = shared
        self.run = tmp / "run"  # the output dir of every recipe here: a failed start must not create it

    def recipe(self, name: str = "recipe.yaml", **over) -> Path:
        return write_recipe(self.tmp / name, recipe_dict(self.base, self.data, self.run, self.cache, **over))

    def text_recipe(self, text: str) -> Path:
        path = self.tmp / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    def with_data(self, path: Path) -> Path:
        return self.recipe(
            datasets=[{"chat": {"data_files": str(path), "format": "messages", "val_split": 0.0}}]
        )

    def train(self, recipe: Path, *extra) -> list:
        return ["train", recipe, "--max-steps", "1", *extra]


Case = namedtuple("Case", "build needles loads_model", defaults=(False,))
CASES: dict[str, Case] = {}


def case(name: str, *needles: str, loads_model: bool = False):
    def register(build: Callable[[Corpus], list]):
        CASES[name] = Case(build, needles, loads_model)
        return build

    return register


# ------------------------------------------------------------------------------------------- recipes


@case("malformed-yaml", "recipe.yaml:3: invalid YAML")
def _(c):
    return c.train(c.text_recipe("model_name: x\ndatasets: [a, b\nlearning_rate: 1e-5\n"))


@case("yaml-python-tag", "invalid YAML", "could not determine a constructor")
def _(c):
    return c.train(
        c.text_recipe("model_name: !!python/object/apply:os.system ['touch pwned']\ndatasets: [a]\n")
    )


@case("empty-recipe", "recipe is empty", "model_name and datasets")
def _(c):
    return c.train(c.text_recipe("# nothing yet\n"))


@case("unknown-key", "recipe.yaml: unknown key 'shuffle_buffer'")
def _(c):
    return c.train(c.recipe(shuffle_buffer=1000))


@case("misspelled-key", "unknown key 'learning_rat'", "(did you mean 'learning_rate'?)")
def _(c):
    return c.train(c.recipe(learning_rat=1e-5))


@case("misspelled-peft-key", "unknown key 'peft.alpah'", "(did you mean 'alpha'?)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "alpah": 16}))


@case("misspelled-set", "--set peft.alhpa: unknown key 'alhpa' in peft", "(did you mean 'alpha'?)")
def _(c):
    return c.train(c.recipe(), "--set", "peft.alhpa=16")


@case("wrong-type-int", "max_length", "valid integer", "(got 'many')")
def _(c):
    return c.train(c.recipe(max_length="many"))


@case("wrong-type-list", "datasets", "valid list", "(got 5)")
def _(c):
    return c.train(c.recipe(datasets=5))


@case("wrong-type-section", "peft", "(got 'lora')")
def _(c):
    return c.train(c.recipe(peft="lora"))


@case("wrong-type-nested", "peft.r", "valid integer", "(got 'sixteen')")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "r": "sixteen"}))


@case("missing-required-key", "missing required key 'datasets'")
def _(c):
    return c.train(c.text_recipe(f"model_name: {c.base}\n"))


@case("absurd-lr-10", "learning_rate: must be > 0 and < 1", "(got 10)")
def _(c):
    return c.train(c.recipe(learning_rate=10))


@case("absurd-r-0", "peft.r: must be > 0", "(got 0)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "r": 0}))


@case("absurd-max-length-3", "max_length: must be >= 16", "(got 3)")
def _(c):
    return c.train(c.recipe(max_length=3))


@case("absurd-batch-0", "per_device_train_batch_size: must be >= 1", "(got 0)")
def _(c):
    return c.train(c.recipe(per_device_train_batch_size=0))


@case("absurd-dropout", "peft.dropout: must be in [0, 1)")
def _(c):
    return c.train(c.recipe(peft={"mode": "lora", "dropout": 1.5}))


@case("missing-recipe", "nope.yaml: recipe file not found", "oasst-peft recipes")
def _(c):
    return c.train(c.tmp / "nope.yaml")


@case("non-utf8-recipe", "not UTF-8 text", "save the recipe as UTF-8")
def _(c):
    path = c.tmp / "recipe.yaml"
    path.write_bytes(b"model_name: caf\xe9\ndatasets: [a]\n")
    return c.train(path)


@case("extends-loop", "'extends' loops back on itself")
def _(c):
    (c.tmp / "a.yaml").write_text("extends: b.yaml\n")
    (c.tmp / "b.yaml").write_text("extends: a.yaml\n")
    return c.train(c.tmp / "a.yaml")


# ------------------------------------------------------------------------------------------- files


@case("missing-data-file", "datasets: chat: data_files: file not found", "nope.jsonl")
def _(c):
    return c.train(c.with_data(c.tmp / "nope.jsonl"))


@case("unreadable-data-file", "convs.jsonl: cannot read (Permission denied)", "readable file")
def _(c):
    # As root, chmod 000 does not stop a read: the open itself is made to fail (see test_corpus).
    data = write_conversations(c.tmp / "convs.jsonl")
    data.chmod(0)
    c.shared["unreadable"] = data
    return c.train(c.with_data(data))


@case("corrupt-gzip", "convs.jsonl.gz: corrupt or truncated gzip file", "download it again")
def _(c):
    path = c.tmp / "convs.jsonl.gz"
    path.write_bytes(b"this was never gzip\n")
    return c.train(c.with_data(path))


@case("truncated-gzip", "convs.jsonl.gz: corrupt or truncated gzip file", "download it again")
def _(c):
    path = c.tmp / "convs.jsonl.gz"
    whole = gzip.compress(c.data.read_bytes() * 20)
    path.write_bytes(whole[: len(whole) // 2])
    return c.train(c.with_data(path))


@case("non-utf8-data", "no usable conversation", "latin1.jsonl:1: not UTF-8 text", "save the file as UTF-8")
def _(c):
    path = c.tmp / "latin1.jsonl"
    row = json.dumps({"messages": conversation(1)}, ensure_ascii=False).replace("plus", "más")
    path.write_bytes((row + "\n").encode("latin-1") * 3)
    return c.train(c.with_data(path))


@case("wrong-export-layout", "not an Open-Assistant export", "check input_file_path")
def _(c):
    path = c.tmp / "sharegpt.json"
    path.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]))
    return c.train(c.recipe(datasets=[{"oasst_export": {"input_file_path": str(path)}}]))


@case("empty-mix-after-filter", "oasst_export: the lang filter removed every", "fr: 2", "set lang")
def _(c):
    trees = [tree(P(f"q{i}", "Quelle heure?", A(f"q{i}-a", "Midi."), lang="fr")) for i in range(2)]
    path = write_jsonl(c.tmp / "export.jsonl", trees)
    return c.train(c.recipe(datasets=[{"oasst_export": {"input_file_path": str(path), "lang": "de"}}]))


@case("empty-mix-list", "datasets: the mix is empty")
def _(c):
    return c.train(c.recipe(datasets=[]))


@case("unknown-dataset", "unknown dataset 'dolly15'", "(did you mean 'dolly15k'?)")
def _(c):
    return c.train(c.recipe(datasets=["dolly15"]))


@case("no-assistant-turn", "datasets: chat: no usable conversation (no_assistant_turn: 3)")
def _(c):
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}]} for i in range(3)]
    return c.train(c.with_data(write_jsonl(c.tmp / "prompts.jsonl", rows)))


@case(
    "prompt-longer-than-max-length",
    "datasets: chat: tokenizing left no training conversation",
    "first_exchange_longer_than_max_length: 3",
    "raise max_length",
)
def _(c):
    long = {"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 12}
    rows = [{"messages": [long, {"role": "assistant", "content": "ok"}]} for _ in range(3)]
    return c.train(c.with_data(write_jsonl(c.tmp / "long.jsonl", rows)))


@case("too-long-with-excess-error", "train conversation 0 is", "over max_length 64", "excess_length")
def _(c):
    long = {"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 12}
    rows = [{"messages": [long, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(c.tmp / "long.jsonl", rows)
    datasets = [{"chat": {"data_files": str(path), "format": "messages"}}]
    return c.train(c.recipe(excess_length="error", datasets=datasets))


# ------------------------------------------------------------------------------ model, template, runs


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


# ------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    from tests.merge.runs import bad_input_world, make_base

    tmp = tmp_path_factory.mktemp("bad-inputs")
    return {
        **bad_input_world(tmp),
        "cache": tmp / "cache",
        "other_base": make_base(tmp, "gpt_neox", seed=7),  # same shapes, other weights
    }


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_corpus(name, shared, tmp_path, monkeypatch, capsys):
    build, needles, loads_model = CASES[name]
    shared = {**shared}
    c = Corpus(tmp_path, shared)

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    def no_launcher(*args, **kwargs):
        raise AssertionError("a launcher started before the bad input was found")

    if not loads_model:
        monkeypatch.setattr("oasst_peft.model.load_model", no_weights)
    monkeypatch.setattr("oasst_peft.launch.run_launcher", no_launcher)
    monkeypatch.delenv("OASST_PEFT_DEBUG", raising=False)

    argv = [str(a) for a in build(c)]
    if "unreadable" in shared:
        if not ROOT_USER:
            assert not os.access(shared["unreadable"], os.R_OK)
        else:  # root reads anything: make opening this one file fail as a chmod 000 would
            import builtins

            real_open = builtins.open
            target = str(shared["unreadable"])

            def guarded_open(file, *args, **kwargs):
                if str(file) == target:
                    raise PermissionError(errno.EACCES, "Permission denied", target)
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr("oasst_peft.data.readers.open", guarded_open, raising=False)
    if "disk_free" in shared:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**12, 10**12, shared["disk_free"]))
    if shared.get("cache_enospc"):
        import datasets

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)

    before = _snapshot(c.run)
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    assert _snapshot(c.run) == before, "a failed start wrote into the output dir"
    assert not list(tmp_path.glob(".run.partial-*")), "a failed merge left its temp folder"


def test_unreadable_file_with_chmod_000(tmp_path, shared, capsys):
    if ROOT_USER:
        pytest.skip("root reads a chmod 000 file; test_corpus[unreadable-data-file] simulates it")
    c = Corpus(tmp_path, shared)
    data = write_conversations(tmp_path / "convs.jsonl")
    data.chmod(0)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in c.train(c.with_data(data))])
    assert e.value.code == 1
    assert "cannot read (Permission denied)" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, shared):
    c = Corpus(tmp_path, shared)
    from oasst_peft.errors import OasstError

    with pytest.raises(OasstError, match="unknown key 'learning_rat'"):
        main([str(a) for a in c.train(c.recipe(learning_rat=1e-5))] + ["--debug"])


# --------------------------------------------------------------------------- a full disk in a run


def _train_until_disk_fills(c: Corpus, monkeypatch, capsys, fill) -> tuple[int, str]:
    """Train 4 steps; ``fill`` makes the save of checkpoint-4 fail the way a full disk does."""
    fill(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", str(c.recipe()), "--max-steps", "4"])
    finally:
        torch.set_num_threads(threads)
    return e.value.code, capsys.readouterr().err


def _full_json_write(monkeypatch):
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if Path(json_path).parent.name == "checkpoint-4":
            raise OSError(errno.ENOSPC, "No space left on device", json_path)
        save(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)


def _full_torch_save(monkeypatch):
    """torch.save on a full disk raises a bare RuntimeError from its zip writer; the disk then has ~0 free."""
    import shutil

    save = torch.save
    usage = shutil.disk_usage

    def torch_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)


@pytest.mark.parametrize("fill", [_full_json_write, _full_torch_save], ids=["json-write", "torch-save"])
def test_full_disk_in_a_run_is_one_line_and_keeps_the_last_checkpoint(
    fill, tmp_path, shared, monkeypatch, capsys
):
    c = Corpus(tmp_path, shared)
    code, err = _train_until_disk_fills(c, monkeypatch, capsys, fill)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the progress bars
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert errors[0].startswith(f"error: output_dir: the disk of {c.run} is full"), errors[0]
    assert (
        "checkpoint-2 is the latest complete checkpoint: free some space, then continue with --resume"
        in errors[0]
    )
    assert is_complete(c.run / "checkpoint-2") and not is_complete(c.run / "checkpoint-4")
    assert (c.run / "latest").read_text().strip() == "checkpoint-2"
    assert not (c.run / "adapter_model.safetensors").exists()


def test_a_real_process_prints_exactly_one_line_on_stderr(tmp_path, shared):
    """Outside pytest's capture: no library warning or progress bar joins the error line."""
    import subprocess
    import sys

    c = Corpus(tmp_path, shared)
    argv = [str(a) for a in c.train(_checkpoint_of_another_model(c), "--resume")]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OASST_PEFT_DEBUG", None)
    before = _snapshot(c.run)
    res = subprocess.run(
        [sys.executable, "-m", "oasst_peft.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(
        "error: --resume: checkpoint-2 cannot continue"
    )
    assert _snapshot(c.run) == before


def test_an_error_message_with_a_line_break_is_printed_on_one_line(monkeypatch, capsys):
    """The last guard: whatever a message quotes, stderr gets exactly one line."""
    import oasst_peft.cli as cli
    from oasst_peft.errors import OasstError

    def broken(*_a, **_k):
        raise OasstError("datasets: bad value 'a\nb'\r\nfix it")

    monkeypatch.setattr(cli, "recipe_from", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "whatever.yaml"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err == "error: datasets: bad value 'a b' fix it\n"
