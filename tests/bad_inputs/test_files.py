"""Bad data files through the real CLI: missing, unreadable, corrupt, wrong layout, emptied by filters, too long."""

from __future__ import annotations

import gzip
import json

import pytest

from oasst_peft.cli import main
from tests.bad_inputs.corpus import ROOT_USER, Corpus, registry, run_case
from tests.data.builders import A, P, tree
from tests.tiny_run import conversation, write_conversations, write_jsonl

CASES, case = registry()


@case("missing-data-file", "datasets: chat: data_files: file not found", "nope.jsonl")
def _(c):
    return c.train(c.with_data(c.tmp / "nope.jsonl"))


@case("unreadable-data-file", "convs.jsonl: cannot read (Permission denied)", "readable file")
def _(c):
    # As root, chmod 000 does not stop a read: the open itself is made to fail (see corpus.run_case).
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


@pytest.mark.parametrize("name", list(CASES))
def test_case(name, shared, tmp_path, monkeypatch, capsys):
    run_case(CASES[name], Corpus(tmp_path, shared), monkeypatch, capsys)


def test_unreadable_file_with_chmod_000(tmp_path, shared, capsys):
    if ROOT_USER:
        pytest.skip("root reads a chmod 000 file; test_case[unreadable-data-file] simulates it")
    c = Corpus(tmp_path, shared)
    data = write_conversations(tmp_path / "convs.jsonl")
    data.chmod(0)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in c.train(c.with_data(data))])
    assert e.value.code == 1
    assert "cannot read (Permission denied)" in capsys.readouterr().err
