"""The fast merge path: fused LoRA row blocks equal merge_linear's values; the writer thread writes exactly and fails loudly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools.io import SafetensorsFile
from merge_tools.lora import merge_linear
from merge_tools.stream import BufferPool, FileRange, ShardPipeline, lora_rows_into, write_jobs


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
    pool = BufferPool(count=2, nbytes=40 * 24 * 4)
    blocks = []
    for a, b in ((0, 16), (16, 40)):
        out = lora_rows_into(pool, f, job, A, B, a, b)
        blocks.append(out.clone())
        pool.give_back(out)
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

    def chunks(job, pool):
        info = f.tensors[job.name]
        if job.name == "b":
            yield FileRange(f.path, info.start, info.nbytes)
            return
        for a in range(0, 8, 2):  # pooled chunks of 2 rows: the pool must come back or this blocks
            buf = pool.take(32).view(torch.float32).view(2, 4)
            buf.copy_(src["a"][a : a + 2])
            yield buf

    weight_map, total = write_jobs(jobs, tmp_path, max_bytes=128, chunks=chunks, say=said.append)
    assert weight_map == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert total == 8 * 4 * 4 + 12 * 8 and len(said) == 2
    got = {**load_file(tmp_path / weight_map["a"]), **load_file(tmp_path / weight_map["b"])}
    assert torch.equal(got["a"], src["a"]) and torch.equal(got["b"], src["b"])


def test_a_writer_error_reaches_the_caller_and_stops_the_thread(tmp_path):
    pool = BufferPool(count=1, nbytes=16)
    pipe = ShardPipeline(pool)
    writer = pipe.open(tmp_path / "x.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="more bytes than its planned shape"):
        pipe.submit(writer, torch.zeros(3))  # 12 bytes for an 8-byte tensor: fails in the thread
        for _ in range(50):
            pipe.submit(writer, pool.take(4))  # the pool's only buffer never comes back: take raises
        pipe.finish()
    pipe.abort()
    assert not pipe._thread.is_alive()
