"""The tokenizer half of a GGUF: byte-level BPE tokens, token types, merges, special ids and the chat template.

``vocab_plan(tokenizer, rows)`` reads a Hugging Face fast tokenizer and lays it out the way llama.cpp's
``gpt2`` tokenizer model expects it: one entry per embedding row (rows past the tokenizer become
unused entries, named ``[PAD<id>]`` unless the
tokenizer already names them ``<|oasst_unused_N|>``), every special added token (the oasst role tokens and the end-of-turn
token among them) marked CONTROL, other added tokens USER_DEFINED. ``add_vocab`` writes the plan
with the ``gguf`` package's writer and its ``SpecialVocab`` helper (which reads the merges from
``tokenizer.json``). eos is the end-of-turn token, so a runtime stops where training ended a reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.errors import OasstError
from oasst_peft.template import FILLER_TOKEN, ROLE_TOKENS

# llama.cpp names the way a vocabulary splits text before BPE; these are the shapes we can recognise.
_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_FILLER = re.compile(re.escape(FILLER_TOKEN).replace(r"\{\}", r"\d+"))


@dataclass(frozen=True)
class VocabPlan:
    """What goes into the ``tokenizer.ggml.*`` keys."""

    tokens: list[str]
    types: list[int]
    pre: str
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str
    padding_rows: int
    eot: str


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OasstError("export: the model's tokenizer is not a fast (tokenizer.json) tokenizer; re-save it")
    return json.loads(backend.to_str())


def check_byte_level_bpe(tok_json: dict, where: str) -> None:
    """Refuse anything but a GPT-2 style byte-level BPE (the only tokenizer model export writes)."""
    model = tok_json.get("model") or {}
    decoder = (tok_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else str(model.get("type"))
        raise OasstError(
            f"export: {where} has a {kind} tokenizer; export writes byte-level BPE vocabularies only "
            "(SmolLM2, Llama 3, Bloom, GPT-2 style)"
        )


def pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the splitting this tokenizer does (``default`` if unknown)."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith(_LLAMA3_SPLIT_START):
            return "llama-bpe"
        if pattern.startswith(" ?[^(\\s|[.,!?"):
            return "bloom"
    return "default"


def plain_template(template: str) -> str:
    """The chat template without ``{% generation %}`` markers (training-only; llama.cpp's Jinja lacks them)."""
    return _GENERATION_TAG.sub("", template)


def vocab_plan(tokenizer, rows: int, eot_id: int | None, where: str) -> VocabPlan:
    """Lay ``tokenizer`` out over ``rows`` embedding rows; ``eot_id`` (the end-of-turn token) becomes eos."""
    tok_json = _backend_json(tokenizer)
    check_byte_level_bpe(tok_json, where)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if by_id and max(by_id) >= rows:
        raise OasstError(
            f"export: {where}: the tokenizer has token id {max(by_id)} but the model has only {rows} "
            "embedding rows; export the model the tokenizer was trained with"
        )
    missing = [t for t in ROLE_TOKENS if t not in vocab]
    if missing:
        raise OasstError(
            f"export: {where}: the tokenizer lacks {', '.join(missing)}; export a model trained or merged by "
            "oasst-peft (its run or merged folder)"
        )
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    padding = 0
    for i in range(rows):
        if i not in by_id or _FILLER.fullmatch(by_id[i]):  # a padding row (named by the trainer or not)
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(5)  # UNUSED
            padding += 1
        else:
            tokens.append(by_id[i])
            types.append(3 if i in special else 4 if i in added else 1)  # CONTROL, USER_DEFINED, NORMAL
    eos_id = eot_id if eot_id is not None else tokenizer.eos_token_id
    if eos_id is None:
        raise OasstError(f"export: {where}: no end-of-turn token known (no eos in the config or tokenizer)")
    eot = by_id[eos_id]
    types[eos_id] = 3
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise OasstError(
            f"export: {where}: the tokenizer has no chat template; export an oasst-peft run or merge"
        )
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return VocabPlan(
        tokens=tokens,
        types=types,
        pre=pre_tokenizer_name(tok_json),
        bos_id=bos,
        eos_id=eos_id,
        pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id,
        add_bos=bool(probe) and bos is not None and probe[0] == bos,
        chat_template=plain_template(template),
        padding_rows=padding,
        eot=eot,
    )


def add_vocab(writer, plan: VocabPlan, tokenizer_dir: Path) -> None:
    """Write ``plan`` and the merges of ``tokenizer_dir/tokenizer.json`` into ``writer``'s key-value data."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(plan.tokens)
    writer.add_token_types(plan.types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, special_token_types=())
    if not special.merges:
        raise OasstError(f"export: {tokenizer_dir}/tokenizer.json has no BPE merges; re-save the tokenizer")
    ids = {"bos": plan.bos_id, "eos": plan.eos_id, "eot": plan.eos_id, "pad": plan.pad_id, "unk": plan.unk_id}
    special.special_token_ids = {k: v for k, v in ids.items() if v is not None}
    special.add_special_token = {"bos": plan.add_bos, "eos": False}
    special.chat_template = plan.chat_template
    special.add_to_gguf(writer, quiet=True)
