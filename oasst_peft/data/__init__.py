"""The data pipeline: recipe ``datasets:`` -> checked conversations -> tokenized, cached train/validation sets.

From Python::

    from oasst_peft.data import parse_datasets, load_mix, tokenize_mix, data_stats
    specs = parse_datasets([{"dolly15k": {"data_files": "dolly.jsonl"}}], base_dir=".")
    mix = load_mix(specs, seed=0)                  # per dataset: train/validation conversations
    tok = tokenize_mix(mix, tokenizer, max_length=2048)   # tokenizer prepared by setup_tokenizer
    tok.train, tok.validation["dolly15k"], data_stats(tok)

Modules: ``spec`` (the recipe entries), ``registry`` (names -> converters), ``readers`` (files and
hub rows with their locations), ``oasst_trees`` (an export read into message trees),
``oasst_export`` (message trees -> threads), ``sources`` (the other datasets and the generic
formats), ``conversation`` (the shape every conversation must have), ``mix`` (split and sample),
``prepare`` (a recipe's mix, tokenized), ``tokenize`` (masks, length policy, cache), ``stats``
(stats, preview).
"""

from oasst_peft.data import oasst_export, sources  # noqa: F401  (register the built-in datasets)
from oasst_peft.data.conversation import check_conversation
from oasst_peft.data.mix import DatasetPart, Mix, load_dataset, load_mix
from oasst_peft.data.prepare import prepare_data
from oasst_peft.data.registry import Context, DatasetInfo, dataset_names, get_dataset_info, register_dataset
from oasst_peft.data.spec import DatasetSpec, parse_datasets
from oasst_peft.data.stats import data_preview, data_stats, format_preview, format_stats, summary_lines
from oasst_peft.data.tokenize import TokenizedMix, tokenize_mix

__all__ = [
    "Context",
    "DatasetInfo",
    "DatasetPart",
    "DatasetSpec",
    "Mix",
    "TokenizedMix",
    "check_conversation",
    "data_preview",
    "data_stats",
    "dataset_names",
    "format_preview",
    "format_stats",
    "get_dataset_info",
    "load_dataset",
    "load_mix",
    "parse_datasets",
    "prepare_data",
    "register_dataset",
    "summary_lines",
    "tokenize_mix",
]
