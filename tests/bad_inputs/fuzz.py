"""The bad-input fuzz harness: seeded corrupt variants of every kind of file the project reads.

``file_cases()`` crosses each *target* (a file the project reads, from ``fuzz_targets``) with each
*corruption* (truncated at several offsets, random bytes, valid JSON of the wrong shape or types,
empty, a directory where the file belongs, unreadable) and with each CLI command that reads it.
``recipe_key_cases()`` gives every recipe key (and every ``peft`` key) a wrong type, out-of-range
values and a nonsense string. Every case is a ``Case``: build it in a fresh folder, run its argv, and
expect exit 1 or 2, one line on stderr, no traceback, nothing written (see tests/bad_inputs/test_fuzz.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from oasst_peft.config import PEFT_KEYS, RECIPE_KEYS
from tests.bad_inputs.fuzz_targets import Ws, targets, train_argv

SEED = 16
WRONG_SHAPES = ["[]", "{}", '"text"', "42", "null", '[{"a": 1}]', '{"x": {"y": []}}']
# Optional files: an object with none of the known keys is a valid file.
OPTIONAL_JSON = {"tokenizer_config.json"}


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
    for target in targets(shared):
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
                return train_argv(r)

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
