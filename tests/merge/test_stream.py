"""The fast merge path: LoRA row blocks equal merge_linear's values; the workers write exactly, in parallel, and fail loudly."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.io import SafetensorsFile
from merge_tools.lora import merge_linear
from merge_tools.stream import FileRange, RowBlock, Scratch, ShardPipeline, write_jobs


class _Lora:
    def __init__(self, scale, magnitude=None):
        self.scale, self.magnitude = scale, magnitude


class _Job:
    def __init__(self, name, dtype, shape, lora=None, out_dtype=None):
        self.name, self.src_dtype, self.src_shape, self.lora = name, dtype, shape, lora
        self.out_dtype, self.out_shape = out_dtype or dtype, shape

    @property
    def out_bytes(self):
        return self.out_dtype.itemsize * self.out_shape[0] * self.out_shape[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fused_row_blocks_equal_merge_linear(tmp_path, dtype, dora):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(40, 24, generator=g) * 0.02).to(dtype)
    A, B = torch.randn(4, 24, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    m = torch.rand(40, generator=g) + 0.5 if dora else None
    save_file({"w": W}, tmp_path / "w.safetensors")
    f = SafetensorsFile(tmp_path / "w.safetensors")
    job = _Job("w", dtype, (40, 24), _Lora(0.75, m))
    scratch = Scratch()
    blocks = [RowBlock(f, job, A, B, a, b).compute(scratch).clone() for a, b in ((0, 16), (16, 40))]
    want = merge_linear(W, A, B, 0.75, magnitude=m).to(dtype)
    got = torch.cat(blocks)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_pipeline_writes_chunks_and_file_ranges_in_order(tmp_path):
    src = {"a": torch.randn(8, 4), "b": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    save_file(src, tmp_path / "src.safetensors")
    f = SafetensorsFile(tmp_path / "src.safetensors")
    jobs = [_Job("a", torch.float32, (8, 4)), _Job("b", torch.int64, (3, 4))]
    said = []

    def chunks(job):
        info = f.tensors[job.name]
        if job.name == "b":
            yield FileRange(f.path, info.start, info.nbytes)
            return
        for a in range(0, 8, 2):  # chunks of 2 rows, written by the workers in any order at their offsets
            yield src["a"][a : a + 2].clone()

    weight_map, total = write_jobs(jobs, tmp_path, max_bytes=128, chunks=chunks, say=said.append)
    assert weight_map == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert total == 8 * 4 * 4 + 12 * 8 and len(said) == 2
    got = {**load_file(tmp_path / weight_map["a"]), **load_file(tmp_path / weight_map["b"])}
    assert torch.equal(got["a"], src["a"]) and torch.equal(got["b"], src["b"])


def test_a_worker_error_reaches_the_caller_and_stops_the_threads(tmp_path):
    pipe = ShardPipeline(n_workers=2)
    writer = pipe.open(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (64,))])
    pipe.submit(writer, torch.zeros(2))
    pipe.submit(writer, FileRange(tmp_path / "missing.safetensors", 0, 256))  # fails in a worker
    with pytest.raises(FileNotFoundError):
        for _ in range(200):
            pipe._raise()
            time.sleep(0.01)
        pipe.finish()
    pipe.abort()
    assert not any(t.is_alive() for t in pipe._workers) and not pipe._closer.is_alive()


def test_reservations_refuse_more_bytes_than_planned(tmp_path):
    pipe = ShardPipeline(n_workers=1)
    writer = pipe.open(tmp_path / "x.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="more bytes than its planned shape"):
        pipe.submit(writer, torch.zeros(3))  # 12 bytes for an 8-byte tensor: refused before any write
    pipe.abort()


def test_close_refuses_a_shard_with_unwritten_bytes(tmp_path):
    pipe = ShardPipeline(n_workers=1)
    writer = pipe.open(tmp_path / "x.safetensors", [("a", torch.float32, (4,))])
    pipe.submit(writer, torch.zeros(2))  # half of the tensor
    pipe.close(writer)
    with pytest.raises(RuntimeError, match="tensor a was not written completely"):
        pipe.finish()
    pipe.abort()


def test_many_blocks_from_several_workers_land_at_their_offsets(tmp_path):
    """Hundreds of row blocks of a LoRA linear over 4 workers: byte-identical to merge_linear, in plan order."""
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16)
    A, B = torch.randn(8, 64, generator=g) * 0.1, torch.randn(300, 8, generator=g) * 0.1
    save_file({"w": W, "z": torch.arange(10.0)}, tmp_path / "src.safetensors")
    f = SafetensorsFile(tmp_path / "src.safetensors")
    jobs = [_Job("w", torch.bfloat16, (300, 64), _Lora(0.5)), _Job("z", torch.float32, (10, 1))]
    z = f.tensors["z"]

    def chunks(job):
        if job.name == "w":
            yield from (RowBlock(f, job, A, B, a, min(300, a + 1)) for a in range(300))
        else:
            yield FileRange(f.path, z.start, z.nbytes)

    out = tmp_path / "out"
    out.mkdir()
    import merge_tools.stream as stream

    real = stream.workers
    stream.workers = lambda: 4
    try:
        weight_map, _ = write_jobs(jobs, out, max_bytes=10**9, chunks=chunks)
    finally:
        stream.workers = real
    got = load_file(out / weight_map["w"])
    scratch = Scratch()
    one_by_one = torch.cat(
        [RowBlock(f, jobs[0], A, B, a, a + 1).compute(scratch).clone() for a in range(300)]
    )
    assert torch.equal(got["w"], one_by_one)  # every block at its own offset
    want = merge_linear(W, A, B, 0.5)  # a 1-row matmul may round its last float32 bit another way
    torch.testing.assert_close(got["w"].float(), want.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    assert torch.equal(got["z"].reshape(-1), torch.arange(10.0))
