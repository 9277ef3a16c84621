"""Direct I/O: shards written through aligned windows hold the same bytes as buffered writes, and fail loudly."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
import torch

import merge_tools.direct as direct
from merge_tools import MergeError, merge
from merge_tools.direct import DirectFile
from merge_tools.writer import SafetensorsWriter
from tests.merge.runs import make_base, make_run

quiet = {"say": lambda _m: None}


@pytest.fixture
def small_windows(tmp_path, monkeypatch):
    """Direct I/O for every file, in windows of two blocks, so tiny files span many; skip where it is refused."""
    monkeypatch.setattr(direct, "MIN_BYTES", 0)
    monkeypatch.setattr(direct, "WINDOW_BYTES", 2 * direct.ALIGN)
    probe = DirectFile.open(tmp_path / "probe", 1)
    if probe is None:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    probe.abort()


def _opened(monkeypatch) -> list[DirectFile]:
    opened = []
    real = DirectFile.open.__func__

    def spy(cls, path, size):
        f = real(cls, path, size)
        opened.append(f)
        return f

    monkeypatch.setattr(DirectFile, "open", classmethod(spy))
    return opened


def test_chunks_in_any_order_from_several_threads_land_exactly(tmp_path, small_windows):
    size = 5 * direct.WINDOW_BYTES + 1234  # not a multiple of the block size: the padding is cut
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cuts = sorted(random.Random(0).sample(range(1, size), 40))
    pieces = list(zip([0, *cuts], [*cuts, size], strict=True))
    random.Random(1).shuffle(pieces)
    src = tmp_path / "src.bin"
    src.write_bytes(data.numpy().tobytes())
    f = DirectFile.open(tmp_path / "out.bin", size)

    def work(mine):
        fd = os.open(src, os.O_RDONLY)
        for i, (a, b) in enumerate(mine):
            if i % 2:
                assert f.read_into(fd, a, b - a, a) == b - a  # file to file, like an unchanged tensor
            else:
                f.write(data[a:b].clone(), a)
        os.close(fd)

    threads = [threading.Thread(target=work, args=(pieces[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    assert f.direct
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_direct_io_can_be_turned_off(tmp_path, small_windows, monkeypatch):
    monkeypatch.setenv(direct.OFF_ENV, "0")
    assert DirectFile.open(tmp_path / "off.bin", 10 * direct.WINDOW_BYTES) is None
    monkeypatch.setenv(direct.OFF_ENV, "1")
    f = DirectFile.open(tmp_path / "on.bin", 10)
    assert f is not None and f.direct
    f.abort()


def test_close_names_bytes_never_written(tmp_path, small_windows):
    f = DirectFile.open(tmp_path / "out.bin", 3 * direct.WINDOW_BYTES)
    f.write(torch.zeros(direct.WINDOW_BYTES, dtype=torch.uint8), 0)
    f.write(torch.zeros(10, dtype=torch.uint8), 2 * direct.WINDOW_BYTES)
    with pytest.raises(RuntimeError, match=f"from offset {direct.WINDOW_BYTES} on were never written"):
        f.close()
    with pytest.raises(RuntimeError, match="outside the file"):
        DirectFile.open(tmp_path / "o2.bin", 10).write(torch.zeros(11, dtype=torch.uint8), 0)


def test_values_cast_on_the_way_in_equal_a_cast_then_a_copy(tmp_path, small_windows):
    values = torch.randn(3 * direct.WINDOW_BYTES // 4 + 7, generator=torch.Generator().manual_seed(0))
    want = values.to(torch.bfloat16).view(torch.uint8)
    n = want.numel()
    for offset in (6, 3):  # element-aligned: cast into the windows; an odd offset: the bytes of a cast
        f = DirectFile.open(tmp_path / f"at{offset}.bin", offset + n)
        f.write(torch.zeros(offset, dtype=torch.uint8), 0)
        f.write(values, offset, dtype=torch.bfloat16)
        f.close()
        assert (tmp_path / f"at{offset}.bin").read_bytes()[offset:] == want.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_merge_written_directly_has_the_bytes_of_a_buffered_one(
    tmp_path, small_windows, monkeypatch, dtype
):
    base = make_base(tmp_path, "llama", dtype=dtype)
    run = make_run(tmp_path, base, "llama-lora")
    opened = _opened(monkeypatch)
    got = merge(run, tmp_path / "direct", verify=True, max_shard_size="40KB", **quiet)
    assert got.shards > 1 and opened and all(f is not None and f.direct for f in opened)
    monkeypatch.setattr(direct, "MIN_BYTES", 1 << 62)
    want = merge(run, tmp_path / "buffered", verify=False, max_shard_size="40KB", **quiet)
    names = sorted(p.name for p in want.out.glob("*.safetensors"))
    assert names == sorted(p.name for p in got.out.glob("*.safetensors")) and len(names) == got.shards
    for name in names:
        assert (got.out / name).read_bytes() == (want.out / name).read_bytes(), name


def test_a_filesystem_that_refuses_the_direct_write_gets_buffered_ones(tmp_path, small_windows, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    plan = [("a", torch.float32, (3000,)), ("b", torch.bfloat16, (7, 5))]
    w = SafetensorsWriter(tmp_path / "o.safetensors", plan)
    a, b = torch.randn(3000), torch.randn(7, 5).to(torch.bfloat16)
    w.write(a)
    w.write(b)
    w.close()
    assert refused and not w.direct
    from safetensors.torch import load_file

    got = load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


def test_a_full_disk_during_a_direct_write_is_one_line_and_leaves_nothing(
    tmp_path, small_windows, monkeypatch
):
    base = make_base(tmp_path, "llama")
    run = make_run(tmp_path, base, "llama-lora")
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    out = tmp_path / "merged"
    with pytest.raises(
        MergeError, match=r"No space left on device while writing model-\d+-of-\d+\.safetensors"
    ) as e:
        merge(run, out, verify=False, max_shard_size="40KB", **quiet)
    assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".merged")]
