"""What a LoRA/QLoRA run saves as its adapter: the LoRA weights and the trained token rows, nothing more.

peft's ``save_embedding_layers="auto"`` stores the whole resized embedding (and an untied lm_head)
beside an adapter whose vocab grew: 1-2 GB for a 7B/12B base. In our runs every row beyond the base
vocab is a trained token (peft ``trainable_token_indices``, saved as ``trainable_tokens_delta``), so
a loader only has to grow the base to the trained row count: the saved rows then replace the new
rows, whatever they were initialised to. ``oasst-peft merge`` and ``sample`` grow it to the run
record's ``vocab_rows``; peft's ``AutoPeftModelForCausalLM`` to ``len(tokenizer)``, which names every
row (``template.fill_vocab``). ``save_lean`` makes a peft model save so, for the final adapter and
every checkpoint; ``base_signature`` goes in the run record, so that a merge into another base of the
same shape is still refused; ``planned_bytes`` is the adapter file's size, as ``oasst-peft plan`` reports.
"""

from __future__ import annotations

import types

ADAPTER_WEIGHT_BYTES = 4  # peft keeps LoRA A/B and the trained token rows in fp32, and saves them so
# safetensors header: one JSON entry per tensor (its name, dtype, shape and offsets), about this long
HEADER_BYTES_PER_TENSOR = 128


def covers_new_rows(model, base_rows: int, rows: int) -> bool:
    """True when peft trains every row beyond ``base_rows`` (the input embedding's and an untied lm_head's)."""
    config = getattr(model, "peft_config", {}).get("default")
    spec = getattr(config, "trainable_token_indices", None)
    if rows <= base_rows:
        return True
    if not spec:
        return False
    lists = spec.values() if isinstance(spec, dict) else [spec]
    new = set(range(base_rows, rows))
    return all(new <= {int(i) for i in ids} for ids in lists)


def _lean_save_pretrained(self, *args, save_embedding_layers=False, **kwargs):
    return type(self).save_pretrained(self, *args, save_embedding_layers=save_embedding_layers, **kwargs)


def save_lean(model, base_rows: int, rows: int) -> bool:
    """Make ``model`` (a peft model) save without the embedding layers when its token rows cover the new rows.

    Bound to the instance, so the Trainer's checkpoints and the final save both use it; a caller that
    passes ``save_embedding_layers`` still decides. Returns whether the saves are lean.
    """
    if not covers_new_rows(model, base_rows, rows):
        return False  # the new rows are not trained (train_new_tokens: false): peft must store them
    model.save_pretrained = types.MethodType(_lean_save_pretrained, model)
    return True


def base_signature(model) -> dict | None:
    """The base's input-embedding signature (``merge_tools.signature``), before it is resized; None when
    the weights are partitioned (ZeRO-3 loads each rank's shard only)."""
    from merge_tools.signature import embedding_signature

    weight = model.get_input_embeddings().weight
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    return embedding_signature(lambda a, b: weight[a:b], weight.shape[0])


def planned_bytes(lora_params: int, lora_layers: int, token_rows: int, hidden: int, tied: bool) -> int:
    """The adapter file's size: LoRA A and B, the trained token rows of the input embedding (and of the
    untied lm_head), all fp32, plus the safetensors header (one entry per tensor)."""
    tables = 1 if tied else 2
    tensors = 2 * lora_layers + (tables if token_rows else 0)
    weights = (lora_params + token_rows * hidden * tables) * ADAPTER_WEIGHT_BYTES
    return weights + 8 + tensors * HEADER_BYTES_PER_TENSOR
