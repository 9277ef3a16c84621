"""CLI options are validated as they are parsed: one line, exit 2, and ``--help`` shows the valid range.

Also the filesystem edges of ``merge --out`` (a parent that is a file) and the library-error boundary
(a known library error becomes one line; anything else keeps its traceback).
"""

from __future__ import annotations

import json

import pytest

from oasst_peft.boundary import user_file
from oasst_peft.cli import main
from oasst_peft.errors import OasstError

BAD = [
    (["sample", "m", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sample", "m", "--batch-size", "-1"], "--batch-size"),
    (["sample", "m", "--seed", "-3"], "--seed"),
    (["sample", "m", "--config", "wild"], "'wild' is not one of greedy, typical, nucleus, beam"),
    (["sample", "m", "--dtype", "int8"], "--dtype"),
    (
        ["sample", "m", "--chat-template", "x.jinja"],
        "'x.jinja' is not saved (the model's own template) or oasst",
    ),
    (["merge", "r", "--out", "o", "--dtype", "f8"], "--dtype"),
    (["merge", "r", "--out", "o", "--qlora-base", "nf5"], "--qlora-base"),
    (["data", "preview", "r.yaml", "--n", "-1"], "--n"),
    (["data", "preview", "r.yaml", "--n", "0"], "--n"),
    (["plan", "r.yaml", "--gpus", "0"], "--gpus"),
    (["plan", "r.yaml", "--gpu-mem", "0"], "--gpu-mem"),
    (["plan", "r.yaml", "--gpu-mem", "nan"], "--gpu-mem"),
    (["train", "r.yaml", "--max-steps", "0"], "--max-steps"),
    (["train", "r.yaml", "--nproc", "0"], "--nproc"),
    (["train", "r.yaml", "--nnodes", "0"], "--nnodes"),
    (["train", "r.yaml", "--master-port", "70000"], "--master-port"),
    (["train", "r.yaml", "--no-such-option"], "No such option"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_option_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: oasst-peft") and needle in err, err
    assert "--help" in err and "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,shown",
    [
        (["sample", "--help"], ["x>=1", "fp16|bf16|fp32"]),
        (["data", "preview", "--help"], ["x>=1"]),
        (["plan", "--help"], ["x>=1", "(> 0)"]),
        (["merge", "--help"], ["fp16|bf16|fp32", "dequantized-nf4|exact"]),
        (["train", "--help"], ["x>=1", "1<=x<=65535"]),
    ],
)
def test_help_shows_the_valid_range(argv, shown, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in shown:
        assert text in out, (text, out)


def test_merge_out_under_a_file_is_one_line(tmp_path, capsys):
    from tests.merge.runs import make_base, make_run

    run = make_run(tmp_path, make_base(tmp_path, "gpt_neox"), "lora-run", steps=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    for out in (blocker / "merged", blocker / "deeper" / "merged"):
        with pytest.raises(SystemExit) as e:
            main(["merge", str(run), "--out", str(out), "--no-verify"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: --out: {blocker} is a file") and "choose another --out" in err
    assert blocker.read_text() == "not a folder"


def test_the_boundary_converts_known_library_errors_and_keeps_bugs(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": ')
    with pytest.raises(OasstError) as e, user_file("model_name", bad, "fix it"):
        json.loads(bad.read_text())
    assert str(e.value).startswith(f"model_name: cannot use {bad}: Expecting value") and "; fix it" in str(
        e.value
    )
    assert isinstance(e.value.__cause__, json.JSONDecodeError)  # --debug shows where it came from
    with pytest.raises(ZeroDivisionError), user_file("model_name", bad, "fix it"):  # a bug stays a bug
        _ = 1 / 0
    with pytest.raises(AttributeError), user_file("model_name", bad, "fix it"):
        _ = None.nothing  # type: ignore[attr-defined]


def test_a_truncated_gguf_and_unknown_model_type_are_one_line(tmp_path, capsys):
    from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

    base = write_base(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 300)
    data = write_conversations(tmp_path / "d.jsonl")
    for model, needle in ((base, "no_such_arch"), (gguf, "model.gguf")):
        recipe = write_recipe(
            tmp_path / "r.yaml", recipe_dict(model, data, tmp_path / "run", tmp_path / "cache")
        )
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["plan", str(recipe)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and "model_name" in err and needle in err, err
