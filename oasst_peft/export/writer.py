"""``export_gguf``: a merged/full model folder or a LoRA/QLoRA run in, one GGUF file and an Ollama Modelfile out.

Top to bottom: classify SRC (``merge_tools``' reader), merge an adapter or ZeRO checkpoint into a temp
folder beside the output (``merge_tools.merge``, streaming shard by shard), read the config and
tokenizer, plan every tensor (name, layout, storage type, size), write header, metadata and tensor
infos with ``gguf.GGUFWriter``, then stream the weights one tensor at a time into a temp sibling of
OUT and ``os.replace`` it into place; the Modelfile goes beside it the same way.

    from oasst_peft.export import export_gguf
    export_gguf("runs/demo-smollm2", "runs/demo.gguf", qtype="q8_0")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oasst_peft import atomic
from oasst_peft.errors import GGUF_INSTALL, OasstError, require_module
from oasst_peft.export.gguf_model import (
    TYPES,
    add_hparams,
    encode,
    model_shape,
    storage_type,
    stored_bytes,
    tensor_names,
    to_gguf_layout,
)
from oasst_peft.export.gguf_vocab import add_vocab, vocab_plan
from oasst_peft.export.modelfile import modelfile_text, renders_like_oasst
from oasst_peft.model_files import check_folder, require_tokenizer

MODELFILE = "Modelfile"


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote."""

    out: Path
    modelfile: Path | None
    arch: str
    qtype: str
    tensors: int
    bytes: int
    tokens: int
    padding_rows: int
    eot: str
    merged: bool
    seconds: float


def _weight_files(folder: Path) -> dict[str, Path]:
    """Every weight name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            found.update({k: f for k in st.keys()})  # noqa: SIM118 - safe_open has no __iter__
    if not found:
        raise OasstError(f"export: {folder} has no .safetensors weights")
    return found


def _check_out(out: Path, overwrite: bool, modelfile: bool) -> None:
    if out.suffix != ".gguf":
        raise OasstError(f"--gguf: {out} must be a file name ending in .gguf")
    if out.is_dir():
        raise OasstError(f"--gguf: {out} is a folder; give a file name such as model.gguf")
    targets = [out] + ([out.parent / MODELFILE] if modelfile else [])
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        if existing[0].name == MODELFILE:  # most likely another GGUF's, exported into the same folder
            raise OasstError(
                f"--gguf: {existing[0]} already exists (another export's?); pass --overwrite to replace it, "
                "--no-modelfile to write the GGUF alone, or export into another folder"
            )
        raise OasstError(f"--gguf: {existing[0]} already exists; pass --overwrite to replace it")


def _check_base_early(run) -> None:
    """Refuse an unsupported architecture before spending a merge on it (when the base is a local folder)."""
    base = Path(str((run.record or {}).get("base_model") or ""))
    if base.name and (base / "config.json").is_file():
        from transformers import AutoConfig

        model_shape(AutoConfig.from_pretrained(str(base)), str(run.path))


def _source_folder(src: Path, scratch: Path, say) -> tuple[Path, bool]:
    """A folder with config.json + safetensors + tokenizer for ``src``, merging an adapter on the way."""
    from merge_tools import merge
    from merge_tools.run import resolve_input

    run = resolve_input(src)
    if run.kind == "full":
        return run.path, False
    _check_base_early(run)
    say(f"export: {src} is a {run.mode} {run.kind}; merging it first (streaming, into a temp folder)")
    merged = scratch / "merged"
    merge(
        src, merged, say=lambda line: say("  " + (line if line.startswith("merge: ") else f"merge: {line}"))
    )
    return merged, True


def export_gguf(
    src: str | Path,
    out: str | Path,
    qtype: str = "f16",
    modelfile: bool = True,
    overwrite: bool = False,
    say=print,
) -> ExportReport:
    """Write ``src`` as a GGUF at ``out`` (and an Ollama Modelfile beside it). Raises OasstError/MergeError."""
    t0 = time.perf_counter()
    if qtype not in TYPES:
        raise OasstError(f"--type: '{qtype}' is not one of {', '.join(TYPES)}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():  # named before anything about the outputs
        raise OasstError(
            f"export: {src} is not a folder; give a merged or full model folder, or a LoRA/QLoRA run"
        )
    require_module("gguf", "export", GGUF_INSTALL)
    check_folder(src, key="export")  # its JSON files and safetensors headers, before reading weights
    _check_out(out, overwrite, modelfile)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        folder, merged = _source_folder(src, scratch, say)
        report = _export(folder, out, qtype, modelfile, say, name=src.resolve().name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.merged = merged
    report.seconds = time.perf_counter() - t0
    say(
        f"done in {report.seconds:.1f} s: {out} ({report.bytes / 1e6:.1f} MB, {report.tensors} tensors, {qtype})"
    )
    return report


def _export(folder: Path, out: Path, qtype: str, modelfile: bool, say, name: str) -> ExportReport:
    require_tokenizer(folder, "export", "a GGUF carries the model's tokenizer")
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(folder))
    shape = model_shape(cfg, str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eot_id = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
    plan = vocab_plan(tokenizer, shape.vocab_rows, eot_id, str(folder))
    files = _weight_files(folder)
    pairs = tensor_names(shape, list(files))
    shapes: dict[str, tuple[int, ...]] = {}
    for hf, _ in pairs:
        with safe_open(str(files[hf]), framework="pt") as st:
            shapes[hf] = tuple(st.get_slice(hf).get_shape())

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    total = 0
    try:
        writer = gguf.GGUFWriter(str(tmp), shape.arch)
        add_hparams(writer, shape, qtype, name)
        add_vocab(writer, plan, folder)
        for hf, name in pairs:
            gtype = storage_type(qtype, shapes[hf])
            nbytes = stored_bytes(gtype, shapes[hf])
            total += nbytes
            placeholder = np.float16 if gtype == gguf.GGMLQuantizationType.F16 else np.float32
            raw = None if gtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else gtype
            writer.add_tensor_info(name, shapes[hf], placeholder, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf, name in pairs:  # one tensor in memory at a time
            with safe_open(str(files[hf]), framework="pt") as st:
                w = st.get_tensor(hf).float().numpy()
            w = to_gguf_layout(shape, name, w)
            writer.write_tensor_data(encode(w, storage_type(qtype, shapes[hf])))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    say(
        f"gguf: {shape.arch} ({shape.model_type}), {len(pairs)} tensors, {qtype}; vocab {len(plan.tokens)} entries "
        f"({plan.padding_rows} padding), eos = end-of-turn {plan.eot!r}, chat template included"
    )
    mf = None
    if modelfile:
        mf = out.parent / MODELFILE
        oasst = renders_like_oasst(tokenizer, plan.eot)
        atomic.write_text(mf, modelfile_text(out.name, plan.eot, oasst=oasst))
        say(f"modelfile: {mf} (ollama create NAME -f {mf}; ollama run NAME)")
        if not oasst:
            say(
                "modelfile: no TEMPLATE, since the model's chat template is not the oasst format; Ollama takes it "
                "from the GGUF (check with: ollama show NAME --template)"
            )
    return ExportReport(
        out=out,
        modelfile=mf,
        arch=shape.arch,
        qtype=qtype,
        tensors=len(pairs),
        bytes=total,
        tokens=len(plan.tokens),
        padding_rows=plan.padding_rows,
        eot=plan.eot,
        merged=False,
        seconds=0.0,
    )
