"""DeepSpeed ZeRO checkpoints (``checkpoint-N/global_stepN/``) to plain safetensors, with DeepSpeed's own reader.

``consolidate_zero_checkpoint(checkpoint_dir, out_dir)`` gathers the fp32 master weights of every
rank (deepspeed.utils.zero_to_fp32, imported here) and writes HF safetensors shards plus the
checkpoint's config, generation config and tokenizer. ``zero_store`` gives the same weights to
``merge`` without writing them twice, and ``extract_adapter`` rebuilds a peft adapter folder from
the checkpoint of a LoRA/QLoRA run whose own adapter file is empty (a ZeRO-3 save without gathering).
The ``.pt`` files are read with ``torch.load(weights_only=True)`` (plain containers and tensors only).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import torch

from merge_tools.base import BaseSource, MemoryStore
from merge_tools.errors import MergeError
from merge_tools.files import TOKENIZER_FILES, copy_tokenizer
from merge_tools.io import NAMED_DTYPES, SafetensorsFile, parse_size, write_index
from merge_tools.run import is_zero_checkpoint


class _WeightsOnlyTorch:
    """``torch`` as zero_to_fp32 sees it, except that ``load`` never unpickles arbitrary objects."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, **kwargs):
        return torch.load(f, map_location=map_location, weights_only=True, **kwargs)


def _safe_globals() -> list:
    """Plain-data classes DeepSpeed pickles into its model/optimizer state files."""
    allowed: list = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    import argparse
    import collections

    allowed += [argparse.Namespace, collections.OrderedDict, collections.defaultdict, set, frozenset]
    return allowed


def zero_state_dict(checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Name -> lazy fp32 tensor (``.contiguous()`` materializes it) of a ZeRO-2/3 checkpoint; shared tensors once."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_zero_checkpoint(checkpoint_dir):
        raise MergeError(
            f"{checkpoint_dir}: not a DeepSpeed ZeRO checkpoint (no global_step*/ with model states)"
        )
    try:
        import deepspeed.utils.zero_to_fp32 as z
    except ImportError:
        raise MergeError(
            f"{checkpoint_dir}: reading a ZeRO checkpoint needs deepspeed (pip install deepspeed)"
        ) from None
    if tag is None and not (checkpoint_dir / "latest").is_file():
        steps = sorted(
            (p.name for p in checkpoint_dir.glob("global_step*") if p.is_dir()),
            key=lambda s: int(re.sub(r"\D", "", s) or -1),
        )
        tag = steps[-1]
    real_torch = z.torch
    z.torch = _WeightsOnlyTorch()
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = z.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
    except Exception as e:  # noqa: BLE001 - deepspeed and unpickling raise many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergeError(
            f"{checkpoint_dir}: cannot consolidate the ZeRO checkpoint ({type(e).__name__}: {msg})"
        ) from None
    finally:
        z.torch = real_torch
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():  # tied weights come back as one object under two names: keep the first
        if id(t) in seen:
            continue
        seen.add(id(t))
        unique[name] = t
    return unique


class ZeroStore(MemoryStore):
    """A consolidated ZeRO checkpoint, materialized tensor by tensor."""

    def read(self, name):
        t = self.state[name]
        return t.contiguous() if not isinstance(t, torch.Tensor) else t

    def read_rows(self, name, a, b):
        return self.read(name)[a:b]

    def info(self, name):
        t = self.state[name]
        return getattr(t, "dtype", torch.float32), tuple(t.shape)


def zero_store(checkpoint_dir: str | Path, tag: str | None = None) -> ZeroStore:
    """The checkpoint's weights as a store for ``merge`` (config from the checkpoint's ``config.json``)."""
    from merge_tools.base import read_config

    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    state = zero_state_dict(checkpoint_dir, tag)
    if any(k.startswith("base_model.model.") for k in state):
        raise MergeError(
            f"{checkpoint_dir}: a LoRA/QLoRA ZeRO checkpoint without adapter_config.json; cannot merge it"
        )
    return ZeroStore(
        state, BaseSource("zero", str(checkpoint_dir), "the ZeRO checkpoint"), config, folder=checkpoint_dir
    )


def consolidate_zero_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tag: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the ZeRO checkpoint as a plain HF checkpoint (safetensors shards + index, config, tokenizer).

    ``dtype`` (fp32 | bf16 | fp16) defaults to fp32, the master weights as trained. The folder is
    written to a temp dir beside ``out_dir`` and renamed at the end; an existing ``out_dir`` is refused.
    """
    from merge_tools.files import write_small_files
    from merge_tools.io import check_out, staged_dir
    from merge_tools.plan import build_plan
    from merge_tools.produce import write_shards

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_out(out_dir, overwrite=False, protected=[checkpoint_dir])
    store = zero_store(checkpoint_dir, tag)
    out_dtype = NAMED_DTYPES[dtype] if dtype else torch.float32
    plan = build_plan(store, None, out_dtype)
    with staged_dir(out_dir) as staged:
        weight_map, total = write_shards(plan.jobs, staged.path, parse_size(max_shard_size), store)
        write_index(staged.path, weight_map, total)
        config = dict(store.config)
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        gen = {}
        if (checkpoint_dir / "generation_config.json").is_file():
            import json

            gen = json.loads((checkpoint_dir / "generation_config.json").read_text(encoding="utf-8"))
        write_small_files(staged.path, config, gen)
        copy_tokenizer(checkpoint_dir, staged.path)
        staged.publish()
    return out_dir


def extract_adapter(checkpoint_dir: str | Path, folder: str | Path) -> Path:
    """A peft adapter folder rebuilt from a LoRA/QLoRA ZeRO checkpoint: the LoRA weights and trained token rows."""
    from merge_tools.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from merge_tools.writer import SafetensorsWriter

    checkpoint_dir, folder = Path(checkpoint_dir), Path(folder)
    state = zero_state_dict(checkpoint_dir)
    keep = {}
    for name, t in state.items():
        if ".lora_" in name or "trainable_tokens_delta" in name:  # the new rows are all trained token rows
            keep[re.sub(r"\.default(?=\.|$)", "", name)] = (
                t.contiguous() if not isinstance(t, torch.Tensor) else t
            )
    if not any(".lora_A" in k for k in keep):
        raise MergeError(
            f"{checkpoint_dir}: the ZeRO checkpoint holds no LoRA weights; is it from a LoRA run?"
        )
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint_dir / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    w = SafetensorsWriter(folder / ADAPTER_WEIGHTS, [(k, v.dtype, tuple(v.shape)) for k, v in keep.items()])
    for v in keep.values():
        w.write(v)
    w.close()
    return folder


def adapter_is_incomplete(folder: Path) -> bool:
    """True when the folder's adapter weights are missing or hold empty tensors (ZeRO-3 partitions)."""
    from merge_tools.adapter import ADAPTER_WEIGHTS

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return True
    return any(0 in t.shape for t in SafetensorsFile(path).tensors.values())


__all__ = [
    "TOKENIZER_FILES",
    "adapter_is_incomplete",
    "consolidate_zero_checkpoint",
    "extract_adapter",
    "zero_state_dict",
    "zero_store",
]
