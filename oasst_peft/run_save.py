"""A run's final save: weights or adapter, tokenizer, generation config, resolved recipe and run record.

Everything is written into a temporary folder inside the output dir, then moved in, the run record last:
a folder that holds ``oasst_run.json`` holds a whole run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from oasst_peft import distributed
from oasst_peft.config import Recipe
from oasst_peft.recipe_yaml import anchor_paths
from oasst_peft.run_record import RECIPE_RECORD, RUN_RECORD, RunRecord


def _atomic_save(out: Path, write) -> None:
    """Call ``write(tmp_dir)``, then move every file it wrote into ``out``; the run record lands last."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        write(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == RUN_RECORD)
        for f in files:
            target = out / f.name
            if target.is_dir() and f.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_run(
    trainer,
    loaded,
    tokenizer,
    fmt,
    recipe: Recipe,
    out: Path,
    command: list[str],
    deepspeed_config: str | None = None,
) -> None:
    """Write the final model or adapter, tokenizer, generation config, resolved recipe and run record."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = base.generation_config
    gen.eos_token_id = fmt.eot_id
    gen.pad_token_id = fmt.pad_id
    full_state = distributed.zero3_peft_state_dict(trainer)  # ZeRO-3 LoRA/QLoRA: every rank joins the gather

    def write(tmp: Path) -> None:
        if full_state is not None:
            trainer.model.save_pretrained(str(tmp), state_dict=full_state)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        gen.save_pretrained(str(tmp))
        # Its paths made absolute, so that `oasst-peft train runs/x/oasst_recipe.yaml` finds the same files.
        saved = anchor_paths(recipe.to_dict(), recipe.recipe_dir)
        (tmp / RECIPE_RECORD).write_text(
            yaml.safe_dump(saved, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        record = RunRecord(
            base_model=loaded.source.location,
            base_kind=loaded.source.kind,
            base_package=recipe.model_name if str(recipe.model_name).startswith("package:") else None,
            mode=recipe.mode,
            dtype=loaded.dtype,
            eot_token=fmt.eot,
            eot_token_id=fmt.eot_id,
            pad_token_id=fmt.pad_id,
            base_vocab_rows=loaded.base_vocab_rows,
            vocab_rows=loaded.vocab_rows,
            trainable_token_ids=loaded.trainable_token_ids,
            base_signature=loaded.base_signature,
            command=command,
            deepspeed_config=deepspeed_config,
        )
        if recipe.mode == "qlora":
            p = recipe.peft
            record.bnb_4bit = {
                "quant_type": p.bnb_4bit_quant_type,
                "double_quant": p.bnb_4bit_use_double_quant,
                "compute_dtype": loaded.dtype,
                "blocksize": 64,
            }
        record.write(tmp)

    if trainer.args.should_save:
        _atomic_save(out, write)
    elif trainer.is_deepspeed_enabled and full_state is None:
        trainer.save_model(str(out))  # ZeRO-3 gathers weights collectively: other ranks join, write nothing
