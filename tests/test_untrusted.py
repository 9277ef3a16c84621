"""Untrusted files: a downloaded recipe, dataset or checkpoint must not run code.

A cheap guard scans the package source (AST, not text) for the ways code gets in: ``torch.load``
without ``weights_only=True``, pickle/marshal loads, ``yaml.load`` or an unsafe YAML loader, ``eval``/
``exec``, ``os.system``/``os.popen``, a subprocess run through a shell or a command given as a string,
and ``trust_remote_code=True`` written into the code. Behaviour tests: ``trust_remote_code`` is passed
as the recipe says and printed when on; a checkpoint whose pickle would run code is refused in one
line on ``--resume`` (and the code does not run); recipe paths cannot become command-line options.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from oasst_peft.cli import main
from oasst_peft.config import load_recipe
from oasst_peft.data import parse_datasets
from oasst_peft.launch import LaunchOptions, launch_command
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("oasst_peft", "merge_tools")
SUBPROCESS_CALLS = {"Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and _dotted(node) in (
            "yaml.Loader",
            "yaml.UnsafeLoader",
            "yaml.FullLoader",
        ):
            found.append(f"{where}: {_dotted(node)} can build Python objects; use yaml.safe_load")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if name in (
            "yaml.load",
            "yaml.load_all",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.unsafe_load_all",
        ):
            found.append(f"{where}: {name}; use yaml.safe_load")
        if name in (
            "pickle.load",
            "pickle.loads",
            "marshal.load",
            "marshal.loads",
            "dill.load",
            "dill.loads",
        ):
            found.append(f"{where}: {name} runs code from the file")
        if name in ("eval", "exec", "os.system", "os.popen", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: {name}")
        if name.startswith("subprocess.") and last in SUBPROCESS_CALLS:
            if _is_true(_keyword(node, "shell")) or last in ("getoutput", "getstatusoutput"):
                found.append(f"{where}: {name} through a shell")
            first = node.args[0] if node.args else _keyword(node, "args")
            if isinstance(first, ast.Constant | ast.JoinedStr | ast.BinOp):
                found.append(f"{where}: {name} given a command string; pass an argument list")
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True in code; it must come from the recipe")
    return found


def test_source_has_no_way_to_run_code_from_a_file():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    problems = [line for f in files for line in _problems(f)]
    assert problems == []


def test_the_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
    LOAD, SHELL = "torch." + "load", "sh" + "ell"  # noqa: N806
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch, yaml, subprocess, pickle, os\n"
        f"{LOAD}('x')\n"  # spelled indirectly so that text greps for these patterns see only real code
        f"{LOAD}('x', weights_only=False)\n"
        "yaml.load(open('r'), Loader=yaml.Loader)\n"
        f"subprocess.run('ls -l', {SHELL}=True)\n"
        "subprocess.Popen(f'ls {x}')\n"
        "pickle.loads(b'')\n"
        "os.system('ls')\n"
        "from_pretrained('m', trust_remote_code=True)\n"
        f"{LOAD}('x', weights_only=True)\n"
        "subprocess.run(['ls', '-l'])\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = _problems(bad)
    assert len(found) == 10, found  # 8 calls, the loader attribute, and Popen's string; not the last two


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("untrusted")
    return {
        "tmp": tmp,
        "base": write_base(tmp / "base"),
        "data": write_conversations(tmp / "convs.jsonl"),
        "cache": tmp / "cache",
    }


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_comes_from_the_recipe_and_is_printed(tiny, trust, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from oasst_peft.model import load_model, load_tokenizer

    seen: list[object] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    d = recipe_dict(tiny["base"], tiny["data"], tiny["tmp"] / "run", tiny["cache"], trust_remote_code=trust)
    recipe = load_recipe(write_recipe(tiny["tmp"] / f"trust-{trust}.yaml", d))
    tok, fmt = load_tokenizer(recipe)
    load_model(recipe, tok, fmt, say=lambda _: None)
    assert len(seen) >= 3 and all(v is trust for v in seen)  # config, tokenizer, weights (and nested loads)
    printed = "trust_remote_code: on (the recipe asked for it)" in capsys.readouterr().out
    assert printed is trust


class _RunsCode:
    """A pickle that, if ever unpickled without weights_only, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(tiny, capsys):
    out = tiny["tmp"] / "poisoned"
    recipe = write_recipe(
        tiny["tmp"] / "poisoned.yaml", recipe_dict(tiny["base"], tiny["data"], out, tiny["cache"])
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as e:
            main(["train", str(recipe), "--max-steps", "4"])
        assert e.value.code == 0
        shutil.rmtree(out / "checkpoint-4")  # as if the run had stopped after checkpoint-2
        marker = tiny["tmp"] / "code-ran"
        with open(out / "checkpoint-2" / "optimizer.pt", "wb") as f:
            pickle.dump({"state": _RunsCode(marker)}, f)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["train", str(recipe), "--max-steps", "4", "--resume"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert e.value.code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --resume: checkpoint-2 holds pickled objects other than plain tensors, which are refused so "
        "that no code in them runs; resume only from checkpoints you trust (or an earlier one)"
    ], err
    assert "Traceback" not in err
    assert not marker.exists(), "the checkpoint's code ran"


def test_recipe_paths_are_files_beside_the_recipe_never_options(tmp_path):
    (tmp_path / "sub").mkdir()
    recipe = write_recipe(
        tmp_path / "sub" / "r.yaml",
        {
            "model_name": "--trust-remote-code",
            "chat_template": "--overwrite",
            "deepspeed_config": "--nproc=64.json",
            "datasets": [{"mine": {"data_files": "--force", "format": "messages"}}],
        },
    )
    r = load_recipe(recipe)
    assert r.resolve_path(r.chat_template) == tmp_path / "sub" / "--overwrite"
    assert r.resolve_path(r.deepspeed_config) == tmp_path / "sub" / "--nproc=64.json"
    [spec] = parse_datasets(r.datasets, r.recipe_dir)
    assert spec.data_files == [str(tmp_path / "sub" / "--force")]
    # The launcher's command comes from the command line the user typed, never from the recipe's values.
    cmd = launch_command(LaunchOptions(nproc=2), ["train", str(recipe)])
    assert not {"--trust-remote-code", "--overwrite", "--force"} & set(cmd)
    assert cmd[-2:] == ["train", str(recipe)] and all(isinstance(a, str) for a in cmd)
