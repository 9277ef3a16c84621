"""The merged checkpoint built, once ``merge()`` knows what it was given: base, plan, shards, small files, card, verify.

Top to bottom: find the base and open the adapter (or the ZeRO checkpoint, or the full model), choose the
output dtype, plan every output tensor, check free disk, stream shard by shard into a staged folder beside
``out`` (one weight matrix in memory at a time), add config, generation config, tokenizer, recipe and model
card, optionally verify the logits against base + adapter, and rename the folder into place.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_tools.adapter import load_adapter, read_adapter_config
from merge_tools.base import BaseSource, open_base, open_folder, resolve_base
from merge_tools.card import CardInfo, model_card
from merge_tools.errors import MergeError
from merge_tools.files import (
    copy_tokenizer,
    end_of_turn,
    generation_config,
    has_chat_template,
    merged_config,
    write_small_files,
)
from merge_tools.io import (
    DTYPE_NAMES,
    NAMED_DTYPES,
    check_free_disk,
    check_out,
    human,
    staged_dir,
    write_index,
    write_json,
    write_text,
)
from merge_tools.plan import build_plan
from merge_tools.produce import write_shards
from merge_tools.qlora import NF4Settings, quantized_modules
from merge_tools.report import MERGE_RECORD, MergeReport, merge_record
from merge_tools.run import RECIPE_RECORD, RunInput, is_zero_checkpoint
from merge_tools.verify import should_verify, verify_merge
from oasst_peft.model_files import has_tokenizer


@dataclass(frozen=True)
class MergeOptions:
    """What ``merge()`` was asked besides its input, checked: see ``merge_tools.merge.merge``."""

    out: Path
    base: str | Path | None
    dtype: str | None
    qlora_base: str
    verify: bool | None
    overwrite: bool
    max_bytes: int
    tolerance: float | None
    scratch: Path  # a temp folder beside out, removed by merge()
    argv: list[str]  # the equivalent command line, for the model card and oasst_merge.json


def build_merged(run: RunInput, opts: MergeOptions, note, lines: list[str], t0: float) -> MergeReport:
    """``merge()``'s work for the input ``run``; ``note`` prints a line and keeps it in ``lines``."""
    out, base, dtype, qlora_base, verify = opts.out, opts.base, opts.dtype, opts.qlora_base, opts.verify
    adapter = None
    adapter_dir = None
    record = run.record
    protected = [p for p in (run.path, run.run_dir) if p is not None]
    if run.kind == "adapter":
        adapter_dir = run.path
        if is_zero_checkpoint(run.path):
            from merge_tools.zero import adapter_is_incomplete, extract_adapter

            if adapter_is_incomplete(run.path):
                adapter_dir = extract_adapter(run.path, opts.scratch / "adapter")
                note(f"adapter: rebuilt from the ZeRO checkpoint in {run.path}")
        source = resolve_base(base, record, read_adapter_config(adapter_dir))
        if source.kind != "hub":
            protected.append(Path(source.location))
        check_out(out, opts.overwrite, protected)
        adapter = load_adapter(adapter_dir)
        store = open_base(source, say=note)
        note(f"base: {source.location} ({source.kind}, from {source.why})")
        peft_bits = [f"r={adapter.r}", f"alpha={adapter.alpha:g}"]
        peft_bits += ["rsLoRA"] if adapter.rslora else []
        peft_bits += ["DoRA"] if adapter.dora else []
        note(
            f"adapter: {adapter_dir} ({run.mode}, {', '.join(peft_bits)}; {human(adapter.nbytes())}, read layer by layer)"
        )
    elif run.kind == "zero":
        from merge_tools.zero import zero_store

        check_out(out, opts.overwrite, protected)
        if base:
            note("--base ignored: a ZeRO checkpoint of a full run holds every weight")
        store = zero_store(run.path)
        source = store.source
        note(f"model: ZeRO checkpoint {run.path} (fp32 master weights, consolidated with DeepSpeed's reader)")
    else:
        check_out(out, opts.overwrite, protected)
        if base:
            note("--base ignored: the input is a full model")
        source = BaseSource("dir", str(run.path), "the run")
        store = open_folder(run.path, source)
        note(f"model: {run.path} (full weights)")

    if dtype:
        out_dtype, why = NAMED_DTYPES[dtype], "--dtype"
    else:
        out_dtype, why = _default_dtype(store, run.kind)
    dtype_name = DTYPE_NAMES.get(out_dtype, str(out_dtype))
    note(f"dtype: {dtype_name} ({why})")

    nf4 = None
    nf4_modules = None
    is_qlora = adapter is not None and run.mode == "qlora"
    if is_qlora:
        if qlora_base == "dequantized-nf4":
            nf4 = NF4Settings.from_record(record or {})
            nf4_modules = quantized_modules(store.config)
            note(
                f"qlora base: dequantized-nf4: the base weights go through the NF4 round trip training saw "
                f"({nf4.describe()}, on {'cuda' if torch.cuda.is_available() else 'cpu'}) before the deltas are "
                "added; --qlora-base exact keeps the original weights"
            )
        else:
            note("qlora base: exact: the deltas are added to the original (unquantized) base weights")

    plan = build_plan(
        store,
        adapter,
        out_dtype,
        record=record,
        nf4_modules=nf4_modules,
        base_label=f"base {source.location}",
    )
    if adapter is not None:
        vocab = (
            f"; vocab {plan.base_rows} -> {plan.vocab_rows} rows" if plan.vocab_rows != plan.base_rows else ""
        )
        note(
            f"merge: {plan.merged_modules} LoRA layers, {plan.token_rows} trained token rows{vocab}"
            + (f", {plan.nf4_weights} weights through NF4" if plan.nf4_weights else "")
        )
    free = check_free_disk(out.parent if out.parent.exists() else Path.cwd(), plan.out_bytes)
    note(f"writing {human(plan.out_bytes)} to {out} ({human(free)} free on its disk)")

    tok_dir = _tokenizer_dir(run, store.folder)
    eot, eot_id, pad_id = end_of_turn(record, tok_dir)
    config = merged_config(store.config, plan.vocab_rows, out_dtype, eot_id, pad_id)
    gen = generation_config([run.path, run.run_dir, store.folder], eot_id, pad_id)

    if adapter is None:
        if verify:
            note("verify: not applicable (no adapter: the weights are copied, only cast to the output dtype)")
        verify = False
    elif verify is None:
        verify, reason = should_verify(store.param_count())
        if not verify:
            note(f"verify: skipped: {reason}")

    result = None
    with staged_dir(out) as staged:
        weight_map, total = write_shards(
            plan.jobs,
            staged.path,
            opts.max_bytes,
            store,
            say=note,
            nf4=nf4,
            fan_in_fan_out=bool(adapter and adapter.fan_in_fan_out),
        )
        write_index(staged.path, weight_map, total)
        write_small_files(staged.path, config, gen)
        if tok_dir is not None:
            copy_tokenizer(tok_dir, staged.path)
            if not has_chat_template(tok_dir):
                note(f"tokenizer: copied from {tok_dir}, which has no chat template")
        else:
            note("tokenizer: none found in the run, adapter or base folder; add one before serving the model")
        if eot_id is None:
            note("generation config: no end-of-turn token known (no run record, no tokenizer eos)")
        if run.recipe_text:
            write_text(staged.path / RECIPE_RECORD, run.recipe_text)
        if verify:
            result = verify_merge(
                staged.path,
                base_folder=store.folder,
                adapter_dir=adapter_dir,
                vocab_rows=plan.vocab_rows,
                out_dtype=out_dtype,
                nf4=nf4,
                tolerance=opts.tolerance,
            )
            note(result.line())
            if not result.passed:
                raise MergeError(
                    f"verify: the merged logits differ from base + adapter by {result.max_abs_diff:.3g} (tolerance "
                    f"{result.tolerance:.3g}); nothing was written to {out}"
                )
        report = MergeReport(
            out=out,
            source=run.path,
            kind=run.kind,
            mode=run.mode,
            base=source.location,
            dtype=dtype_name,
            qlora_base=qlora_base if is_qlora else None,
            shards=len(set(weight_map.values())),
            bytes=total,
            merged_modules=plan.merged_modules,
            token_rows=plan.token_rows,
            nf4_weights=plan.nf4_weights,
            vocab_rows=plan.vocab_rows or config.get("vocab_size"),
            seconds=0.0,
            verify=result,
            lines=lines,
        )
        card = CardInfo(
            title=out.name,
            base_model=str((record or {}).get("base_model") or source.location),
            base_is_hub=source.kind == "hub",
            architecture=config.get("model_type"),
            mode=run.mode,
            dtype=dtype_name,
            eot_token=eot,
            recipe=run.recipe,
            train_command=(record or {}).get("command"),
            merge_command=opts.argv,
            merge_lines=[ln for ln in lines if not ln.startswith("wrote ")],
            prompt_example=_prompt_example(staged.path),
            steps=_train_steps(run),
            deepspeed_config_path=(record or {}).get("deepspeed_config"),
        )
        write_text(staged.path / "README.md", model_card(card, recipe_dir=run.run_dir))
        write_json(staged.path / MERGE_RECORD, merge_record(report, opts.argv))
        staged.publish()
    report.seconds = time.perf_counter() - t0
    note(f"done in {report.seconds:.1f} s: {report.shards} shard(s), {human(report.bytes)} in {out}")
    return report


def _default_dtype(store, kind: str) -> tuple[torch.dtype, str]:
    if kind in ("zero", "full"):
        name = str(store.config.get("dtype") or store.config.get("torch_dtype") or "")
        if name in ("float32", "float16", "bfloat16"):
            return getattr(torch, name), "the model config's dtype"
    return store.float_dtype(), "the base's dtype"


def _tokenizer_dir(run: RunInput, base_folder: Path | None) -> Path | None:
    for folder in (run.path, run.run_dir, base_folder):
        if has_tokenizer(folder):
            return folder
    return None


def _train_steps(run: RunInput) -> int | None:
    state = run.path / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8")).get("global_step"))
        except (OSError, ValueError, TypeError):
            return None
    return None


def _prompt_example(tokenizer_dir: Path | None) -> str | None:
    if tokenizer_dir is None or not has_chat_template(tokenizer_dir):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return tok.apply_chat_template(
            [{"role": "user", "content": "What is a meme, and what's the history behind this word?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # noqa: BLE001 - the card falls back to the plain format
        return None
