"""Loading what ``sample`` generates with: a merged model, a run or adapter on its recorded base, or a base.

``load_sampler(model, adapter=...)`` finds the base from the run record (``oasst_run.json``) or the
adapter config, loads the tokenizer with its saved chat template, the model (4-bit NF4 when the
run was QLoRA), grows the vocab as training did and applies the adapter. ``sample`` formats the replies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft.errors import OasstError, did_you_mean
from oasst_peft.model_files import require_tokenizer
from oasst_peft.run_record import RUN_RECORD, RunRecord, RunRecordError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Sampler:
    """A model ready to generate, its tokenizer, the ids that end a turn, and where it came from."""

    model: object
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    info: dict = field(default_factory=dict)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OasstError(
            f"{path}: cannot read the {what} ({type(e).__name__}); is the run complete?"
        ) from None
    if not isinstance(data, dict):
        raise OasstError(f"{path}: the {what} is not a JSON object")
    return data


def run_record(adapter_dir: Path) -> RunRecord | None:
    """``oasst_run.json`` of a run dir, or of the run a ``checkpoint-N`` dir belongs to."""
    for d in (adapter_dir, adapter_dir.parent):
        if (d / RUN_RECORD).is_file():
            try:
                return RunRecord.read(d)
            except RunRecordError as e:
                raise OasstError(f"{e}; is the run complete?") from None
    return None


def _torch_dtype(dtype: str | None):
    import torch

    from oasst_peft.model import TORCH_DTYPES

    if dtype is None:
        return torch.float32 if not torch.cuda.is_available() else "auto"
    if dtype not in TORCH_DTYPES:
        raise OasstError(
            f"--dtype: '{dtype}' is not one of fp16, bf16, fp32" + did_you_mean(dtype, TORCH_DTYPES)
        )
    return TORCH_DTYPES[dtype]


def _from_pretrained(loader, source, what: str, **kwargs):
    """``loader.from_pretrained`` on a ModelSource, with failures as one line."""
    first, extra = source.pretrained_args
    if source.kind == "dir" and loader.__name__.startswith("AutoModel"):
        extra["use_safetensors"] = True
    try:
        return loader.from_pretrained(first, **extra, **kwargs)
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            from oasst_peft.model_info import hub_error

            fix = "give a local model dir, a .gguf file or a run dir"
            raise hub_error(what, source.location, e, key="MODEL", fix=fix) from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "safetensors" in detail or ".bin" in detail:
            detail = "no safetensors weights (pickle .bin weights are refused)"
        raise OasstError(f"MODEL: cannot load the {what} from {source.location}: {detail}") from None


def _source_for(name: str | Path):
    """A ModelSource for a MODEL argument, or one clear line when it is neither a path nor a hub id."""
    from oasst_peft.model_info import resolve_model_source

    text = str(name)
    try:
        return resolve_model_source(text)
    except OasstError as e:
        raise OasstError(str(e).replace("model_name:", "MODEL:", 1)) from None


def _base_from_record(adapter_dir: Path, record: RunRecord | None):
    """The base an adapter was trained on: from the run record, else from adapter_config.json."""
    from oasst_peft.model_info import ModelSource

    if record and record.base_model:
        source = ModelSource(record.base_kind or "dir", str(record.base_location()))
        if source.kind != "hub" and not Path(source.location).exists():
            raise OasstError(
                f"{adapter_dir}: its base model {source.location} (from {RUN_RECORD}) is not there; "
                f"pass the base as MODEL and the run with --adapter {adapter_dir}"
            )
        return source
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG, "adapter config")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise OasstError(
            f"{adapter_dir}: neither {RUN_RECORD} nor {ADAPTER_CONFIG} names the base model; "
            f"pass the base as MODEL and the run with --adapter {adapter_dir}"
        )
    return _source_for(base)


def _load_tokenizer(path: Path | str, source=None):
    from transformers import AutoTokenizer

    from oasst_peft.model_info import ModelSource

    source = source or ModelSource("dir", str(path))
    return _from_pretrained(AutoTokenizer, source, "tokenizer")


def _eos_ids(model_dir: Path | None, model, tokenizer) -> list[int]:
    """End-of-turn ids: the saved generation config's eos, else the tokenizer's eos."""
    from transformers import GenerationConfig

    eos = None
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise OasstError(
            "MODEL: no end-of-turn token: neither generation_config.json nor the tokenizer has eos"
        )
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def _qlora_config(record: RunRecord | None, dtype):

    if not record or not record.bnb_4bit:  # bitsandbytes runs NF4 on the CPU too: sample what was trained
        return None
    from oasst_peft.model import TORCH_DTYPES, nf4_config

    q = record.bnb_4bit
    compute = q.get("compute_dtype", "bf16")
    return nf4_config(
        q.get("quant_type", "nf4"),
        q.get("double_quant", True),
        compute if compute in TORCH_DTYPES else "bf16",
    )


def load_sampler(
    model: str | Path,
    adapter: str | Path | None = None,
    dtype: str | None = None,
    chat_template: str | None = None,
    merge: bool = True,
) -> Sampler:
    """Load what ``sample`` generates with (see the module docstring for what ``model`` may be).

    ``chat_template="oasst"`` installs the oasst format on a tokenizer that lacks it (a base model
    before training; its new token rows are untrained); the default uses the saved template.
    ``merge`` folds a LoRA adapter (and its trained token rows) into the weights in memory, so each
    generated token costs what it costs the merged model (peft's unmerged trainable-token layers
    rebuild the whole embedding matrix on every forward pass); ``merge=False`` keeps the PeftModel.
    A 4-bit QLoRA base is never merged (re-quantizing would change the weights).
    """
    from oasst_peft.model_files import check_folder

    path = Path(str(model)).expanduser()
    adapter_dir = Path(adapter).expanduser() if adapter is not None else None
    check_folder(path, key="MODEL")  # a broken run, adapter or model folder: one line before any load
    if adapter_dir is not None:
        check_folder(adapter_dir, key="--adapter")
    if adapter_dir is not None and not (adapter_dir / ADAPTER_CONFIG).is_file():
        what = "does not exist" if not adapter_dir.exists() else f"has no {ADAPTER_CONFIG}"
        raise OasstError(f"--adapter: {adapter_dir} {what}; point at a LoRA/QLoRA run or adapter dir")
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        if adapter_dir is not None:
            raise OasstError(f"MODEL: {path} is itself an adapter; give its base as MODEL or drop --adapter")
        adapter_dir, base_source, kind = path, None, "adapter"
    elif path.is_dir() and not (path / "config.json").is_file():
        raise OasstError(
            f"MODEL: {path} has neither config.json nor {ADAPTER_CONFIG}; point at a finished run, a "
            "checkpoint-N dir, a merged model dir or a .gguf file"
        )
    else:
        base_source = _source_for(model)
        kind = (
            "base+adapter" if adapter_dir is not None else ("model" if base_source.kind == "dir" else "base")
        )

    record = run_record(adapter_dir) if adapter_dir is not None else None
    if adapter_dir is not None and base_source is None:
        base_source = _base_from_record(adapter_dir, record)
    tok_dir = adapter_dir if adapter_dir is not None else None
    if tok_dir is not None or base_source.kind == "dir":
        require_tokenizer(tok_dir or base_source.location, "MODEL", "sample and chat need one")
    # torch and transformers only now: a wrong path above costs a user a fraction of a second, not 5 s
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    tokenizer = _load_tokenizer(tok_dir) if tok_dir is not None else _load_tokenizer(None, base_source)

    quant = _qlora_config(record, torch_dtype)
    kwargs = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    net = _from_pretrained(AutoModelForCausalLM, base_source, "model", **kwargs)
    if quant is not None:
        from oasst_peft.model import exact_nf4_kernels

        exact_nf4_kernels(net)  # reply as the run computed, in its compute dtype
    gen_dir = adapter_dir if adapter_dir is not None else (path if base_source.kind == "dir" else None)

    template = "saved"
    if chat_template == "oasst" and not _has_oasst_template(tokenizer):
        from oasst_peft.template import resize_embeddings, setup_tokenizer

        fmt = setup_tokenizer(tokenizer)
        resize_embeddings(net, tokenizer)
        eos_ids, template, gen_dir = [fmt.eot_id], "oasst (installed)", None
    elif chat_template not in (None, "saved", "oasst"):
        raise OasstError(f"--chat-template: '{chat_template}' is not saved or oasst")
    if not tokenizer.chat_template:
        raise OasstError(
            f"MODEL: the tokenizer of {path} has no chat template; sample from a trained run or pass "
            "chat_template='oasst' (--chat-template oasst)"
        )

    if adapter_dir is not None:
        from peft import PeftModel

        from oasst_peft.template import padded_vocab_size

        rows = net.get_input_embeddings().weight.shape[0]
        want = (
            int(record.vocab_rows)
            if record and record.vocab_rows
            else padded_vocab_size(len(tokenizer), rows)
        )
        if want != rows:
            net.resize_token_embeddings(want, mean_resizing=False)
        try:
            net = PeftModel.from_pretrained(net, str(adapter_dir))
        except (OSError, ValueError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OasstError(
                f"--adapter: cannot apply {adapter_dir} to {base_source.location}: {detail}"
            ) from None
        if merge and quant is None:
            net = net.merge_and_unload()
    if template == "saved":
        eos_ids = _eos_ids(gen_dir, net, tokenizer)
    net.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quant is None:
        net.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    info = {
        "path": str(model),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "kind": kind,
        "base": base_source.location,
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "device": device,
        "chat_template": template,
        "adapter_merged": adapter_dir is not None and merge and quant is None,
        "eot_tokens": tokenizer.convert_ids_to_tokens(eos_ids),
        "eot_token_ids": eos_ids,
        "qlora_base": "nf4" if quant is not None else ("unquantized" if record and record.bnb_4bit else None),
    }
    return Sampler(net, tokenizer, eos_ids, int(pad_id), info)


def _has_oasst_template(tokenizer) -> bool:
    from oasst_peft.template import ASSISTANT, PROMPTER

    return (
        bool(tokenizer.chat_template)
        and PROMPTER in tokenizer.chat_template
        and ASSISTANT in (tokenizer.chat_template)
    )
