"""Streaming safetensors reads/writes, staged output folders, stale temp cleanup and the free-disk check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.errors import MergeError
from merge_tools.io import (
    SafetensorsFile,
    check_free_disk,
    check_out,
    parse_size,
    remove_stale_partials,
    staged_dir,
)
from merge_tools.writer import SafetensorsWriter


def test_reader_reads_tensors_and_row_ranges(tmp_path):
    tensors = {
        "a": torch.randn(7, 3),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(4, 2, 2).to(torch.bfloat16),
        "d": torch.tensor(3.5),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v), k
    assert torch.equal(f.read_rows("a", 2, 5), tensors["a"][2:5])
    assert torch.equal(f.read_rows("c", 1, 4), tensors["c"][1:4])


def test_writer_output_loads_with_safetensors_in_chunks(tmp_path):
    a, b, c = torch.randn(6, 4), torch.randn(3).to(torch.float16), torch.zeros(0, 4)
    plan = [
        ("a", a.dtype, tuple(a.shape)),
        ("empty", c.dtype, tuple(c.shape)),
        ("b", b.dtype, tuple(b.shape)),
    ]
    w = SafetensorsWriter(tmp_path / "o.safetensors", plan)
    w.write(a[:2])
    w.write(a[2:])
    w.write(b)
    w.close()
    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and got["empty"].shape == (0, 4)


def test_writer_refuses_short_and_long_tensors(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2, 2))])
    with pytest.raises(RuntimeError, match="more bytes"):
        w.write(torch.zeros(3, 2))
    w.write(torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="not written completely"):
        w.close()


def test_truncated_file_is_one_clear_error(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-40])
    with pytest.raises(MergeError, match="truncated"):
        SafetensorsFile(tmp_path / "x.safetensors").read("a")
    (tmp_path / "y.safetensors").write_bytes(b"PK\x03\x04 not a safetensors file")
    with pytest.raises(MergeError, match="not a readable safetensors file"):
        SafetensorsFile(tmp_path / "y.safetensors")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(MergeError, match="not a size"):
        parse_size("lots")


def test_staged_dir_is_renamed_only_when_published(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as staged:
        (staged.path / "f").write_text("x")
        assert not out.exists()
        staged.publish()
    assert (out / "f").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_dir_leaves_nothing_after_an_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError), staged_dir(out) as staged:
        (staged.path / "f").write_text("x")
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_old_folder_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        check_out(out, overwrite=False, protected=[])
    check_out(out, overwrite=True, protected=[])
    with staged_dir(out) as staged:
        (staged.path / "new").write_text("new")
        assert (out / "old").exists()  # untouched until publish
        staged.publish()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_may_not_be_or_contain_an_input(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MergeError, match="an input of this merge"):
        check_out(run, overwrite=True, protected=[run])
    with pytest.raises(MergeError, match="an input of this merge"):
        check_out(tmp_path, overwrite=True, protected=[run])


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".out.partial-{pid}-abcd1234"
    live = tmp_path / f".out.partial-{os.getpid()}-abcd1234"
    stale.mkdir()
    live.mkdir()
    removed = remove_stale_partials(tmp_path / "out")
    assert removed == [stale] and not stale.exists() and live.exists()


def test_free_disk_check_names_the_sizes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**9))
    check_free_disk(tmp_path / "out", 10**8)
    with pytest.raises(MergeError, match=r"needs 5\.1\d GB free .* only 1\.00 GB is free"):
        check_free_disk(tmp_path / "out", 5 * 10**9)
