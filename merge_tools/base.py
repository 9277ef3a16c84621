"""Where the base weights come from: a local safetensors folder (streamed), a .gguf file (its cached copy), or a hub id.

``resolve_base`` picks the base (``--base`` > the run record > the adapter config) and ``open_base``
returns a ``TensorStore``: tensor names in checkpoint order, their dtype and shape, and reads of a
whole tensor or a range of rows. A folder of pickle ``.bin`` weights is refused with a hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.errors import MergeError
from merge_tools.io import DTYPE_NAMES, SafetensorsFile, element_size, numel
from oasst_peft.errors import OasstError
from oasst_peft.model_info import resolve_model_source
from oasst_peft.offline import hub_offline
from oasst_peft.run_record import RunRecord


@dataclass(frozen=True)
class BaseSource:
    """A base model: ``kind`` is dir | gguf | hub; ``location`` a path or hub id; ``why`` where it came from."""

    kind: str
    location: str
    why: str = ""


class TensorStore:
    """Read-only access to a checkpoint's tensors."""

    config: dict
    source: BaseSource
    folder: Path | None  # local folder with config/tokenizer files, when there is one

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        raise NotImplementedError

    def shard_of(self, name: str) -> str:
        return "model.safetensors"

    def __contains__(self, name: str) -> bool:
        return name in self._index()

    def _index(self) -> set[str]:
        if not hasattr(self, "_names"):
            self._names = set(self.names())
        return self._names

    def nbytes(self, name: str) -> int:
        dtype, shape = self.info(name)
        return numel(shape) * element_size(dtype)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names())

    def param_count(self) -> int:
        return sum(numel(self.info(n)[1]) for n in self.names())

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point bytes are stored in."""
        counts: dict[torch.dtype, int] = {}
        for n in self.names():
            dtype, _ = self.info(n)
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + self.nbytes(n)
        return max(counts, key=counts.get) if counts else torch.float32


class ShardedStore(TensorStore):
    """A folder of safetensors shards (with or without an index), read tensor by tensor."""

    def __init__(self, folder: Path, source: BaseSource, config: dict):
        self.folder, self.source, self.config = folder, source, config
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise MergeError(f"{index}: unreadable shard index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if not files:
            raise MergeError(f"{folder}: no safetensors weights")
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        for name in files:
            if not (folder / name).is_file():
                raise MergeError(f"{folder}: shard {name} named in the index is missing")
            f = SafetensorsFile(folder / name)
            self.files[name] = f
            for t in f.tensors:
                self._where[t] = name
        # checkpoint order: shard by shard, each in file offset order
        self._order = [
            t
            for name in files
            for t in sorted(self.files[name].tensors, key=lambda k: self.files[name].tensors[k].start)
        ]

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name):
        t = self.files[self._where[name]].tensors[name]
        return t.dtype, t.shape

    def read(self, name):
        return self.files[self._where[name]].read(name)

    def read_rows(self, name, a, b):
        return self.files[self._where[name]].read_rows(name, a, b)

    def shard_of(self, name):
        return self._where[name]

    def file_of(self, name) -> SafetensorsFile:
        return self.files[self._where[name]]


class MemoryStore(TensorStore):
    """Tensors already in memory (a GGUF base, a consolidated ZeRO state dict)."""

    def __init__(
        self, state: dict[str, torch.Tensor], source: BaseSource, config: dict, folder: Path | None = None
    ):
        self.state, self.source, self.config, self.folder = state, source, config, folder

    def names(self):
        return list(self.state)

    def info(self, name):
        t = self.state[name]
        return t.dtype, tuple(t.shape)

    def read(self, name):
        return self.state[name]

    def read_rows(self, name, a, b):
        return self.state[name][a:b]


def resolve_base(base: str | Path | None, record: dict | None, adapter_config: dict | None) -> BaseSource:
    """The base to merge into: ``--base`` > the run record's base_model > the adapter's base_model_name_or_path."""
    if base:
        name, why = str(base), "--base"
    elif record and record.get("base_model"):
        name, why = str(RunRecord.from_dict(record).base_location()), "the run record (oasst_run.json)"
    elif adapter_config and adapter_config.get("base_model_name_or_path"):
        name, why = str(adapter_config["base_model_name_or_path"]), "adapter_config.json"
    else:
        raise MergeError(
            "no base model recorded for this adapter; pass --base MODEL (a folder, .gguf file or hub id)"
        )
    if name.startswith("package:"):  # a file inside an installed Python package, as recipes name it
        try:
            name = resolve_model_source(name).location
        except OasstError as e:
            raise MergeError(f"{why}: {str(e).removeprefix('model_name: ')}") from None
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise MergeError(
                    f"--base: {p} is a file but not .gguf; give a model folder, a .gguf file or a hub id"
                )
            return BaseSource("gguf", str(p.resolve()), why)
        return BaseSource("dir", str(p.resolve()), why)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MergeError(
            f"base model not found: {name} (from {why}); pass --base with the base model's folder"
        )
    return BaseSource("hub", name, why)


def _refuse_pickles(folder: Path) -> None:
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise MergeError(
            f"base {folder} stores pickle (.bin) weights, which are refused; convert them to safetensors first "
            "(in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)) "
            "and pass --base new_dir"
        )
    raise MergeError(
        f"base {folder} has no *.safetensors weights; pass --base with a Hugging Face model folder"
    )


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{folder}: no config.json; point at a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: unreadable ({e})") from None


def open_folder(folder: Path, source: BaseSource) -> ShardedStore:
    """A local HF model folder with safetensors weights."""
    config = read_config(folder)
    if not any(folder.glob("*.safetensors")) or all(
        p.name.startswith("adapter_") for p in folder.glob("*.safetensors")
    ):
        _refuse_pickles(folder)
    return ShardedStore(folder, source, config)


def _hub_folder(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of peft
        raise MergeError(f"base '{repo}' is a hub id but huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=hub_offline()))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean the same here
        why = (
            "offline (HF_HUB_OFFLINE is set)"
            if hub_offline()
            else f"could not be downloaded ({type(e).__name__})"
        )
        raise MergeError(
            f"base '{repo}' is {why} and not in the local cache; download it once or pass --base with a local folder"
        ) from None


def gguf_folder(path: Path, say=None) -> Path:
    """The safetensors copy of a GGUF base that train, sample and chat read (``oasst_peft.gguf_cache``).

    Training from a GGUF has made it already; otherwise it is made here, once. The merge then streams it
    like any folder, and ``--verify`` loads it instead of dequantizing the GGUF a second time.
    """
    from oasst_peft.errors import OasstError
    from oasst_peft.gguf_cache import cached_if_present, cached_model_dir

    cached = cached_if_present(path)
    if cached is not None:
        return cached
    size, limit = path.stat().st_size, 4 * 10**9
    if size > limit:  # transformers dequantizes a GGUF in memory, in float32
        raise MergeError(
            f"base {path} is a {size / 1e9:.1f} GB GGUF; only small GGUF bases (< 4 GB) are dequantized here. "
            "Convert the base to a safetensors folder and pass --base"
        )
    try:
        return cached_model_dir(path, say=say)
    except OasstError as e:
        raise MergeError(f"base {path}: {e}") from None


def open_base(source: BaseSource, say=None) -> TensorStore:
    """The base's tensors, streamed from disk (a GGUF through its dequantized safetensors copy)."""
    if source.kind == "gguf":
        return open_folder(gguf_folder(Path(source.location), say=say), source)
    folder = _hub_folder(source.location) if source.kind == "hub" else Path(source.location)
    return open_folder(folder, source)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
