"""``oasst-peft export``: tiny llama and Bloom LoRA runs go to GGUF and come back through transformers alike.

Each GGUF is reloaded from a folder holding only the GGUF and its Modelfile (so nothing but the file
can feed the loaders) with ``from_pretrained(dir, gguf_file=...)``: f32 logits equal the merged
model's within 1e-4, f16 and q8_0 give the merged model's greedy replies, the GGUF tokenizer renders
and encodes the widget prompt exactly as the run's tokenizer. The metadata is read back with the
``gguf`` package's reader; the Modelfile's TEMPLATE is rendered by a small Go-template evaluator.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oasst_peft.cli import main
from oasst_peft.errors import OasstError
from oasst_peft.export import export_gguf
from oasst_peft.export.modelfile import TYPICAL
from oasst_peft.template import ASSISTANT, PROMPTER, ROLE_TOKENS, SYSTEM, WIDGET_PROMPTS
from tests.merge.runs import make_base, make_run

PROBES = [[{"role": "user", "content": p}] for p in WIDGET_PROMPTS] + [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"}],
    [
        {"role": "user", "content": "what is a meme"},
        {"role": "assistant", "content": "a joke that spreads"},
        {"role": "user", "content": "thank you"},
    ],
]


@pytest.fixture(scope="module", params=["llama", "bloom"])
def trained(request, tmp_path_factory):
    """(arch, run dir, merged dir) for a tiny LoRA run of ``arch``."""
    from merge_tools import merge

    root = tmp_path_factory.mktemp(f"export-{request.param}")
    base = make_base(root, request.param)
    run = make_run(root, base, "run", steps=6)
    merged = root / "merged"
    merge(run, merged, say=lambda _: None)
    return request.param, run, merged


def _load(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name)
    tok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    return model.eval(), tok


def _reference(merged: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(merged))


def _ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _greedy(model, tok, eos_id: int, n: int = 12) -> list[list[int]]:
    replies = []
    for messages in PROBES:
        x = torch.tensor([_ids(tok, messages)])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        replies.append(y[0, x.shape[1] :].tolist())
    return replies


def _export(src: Path, folder: Path, qtype: str) -> Path:
    out = folder / f"model-{qtype}.gguf"
    export_gguf(src, out, qtype=qtype, say=lambda _: None)
    return out


def test_f32_from_the_run_reloads_with_the_merged_logits_and_the_same_tokenizer(trained, tmp_path):
    arch, run, merged = trained
    out = _export(run, tmp_path, "f32")  # the run is merged on the way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", out.name]  # no temp files left
    model, tok = _load(out)
    ref, ref_tok = _reference(merged)
    assert model.config.model_type == arch
    assert model.get_input_embeddings().weight.shape == ref.get_input_embeddings().weight.shape
    for messages in PROBES:
        text = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        ids = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == ref_tok.decode(ids) == text  # byte-exact both ways
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (model(x).logits - ref(x).logits).abs().max().item()
        assert diff < 1e-4, (arch, diff)
    assert tok.eos_token == ref_tok.eos_token and tok.pad_token == ref_tok.pad_token


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_f16_and_q8_0_give_the_merged_models_greedy_replies(trained, tmp_path, qtype):
    arch, _, merged = trained
    out = _export(merged, tmp_path, qtype)
    model, tok = _load(out)
    ref, ref_tok = _reference(merged)
    eos = ref.generation_config.eos_token_id
    assert _greedy(model, tok, eos) == _greedy(ref, ref_tok, eos), (arch, qtype)
    if qtype == "q8_0":  # matrices really are Q8_0, vectors stay F32
        import gguf

        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_metadata_marks_oasst_tokens_as_control_pads_the_vocab_and_ends_turns_with_eos(trained, tmp_path):
    import gguf

    arch, run, merged = trained
    out = _export(merged, tmp_path, "f16")
    reader = gguf.GGUFReader(str(out))
    _, ref_tok = _reference(merged)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert len(tokens) == int(emb.shape[-1])  # one entry per embedding row
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "general.name") == merged.name
    for t in ROLE_TOKENS:
        assert types[tokens.index(t)] == gguf.TokenType.CONTROL
    eot_id = ref_tok.convert_tokens_to_ids(ref_tok.eos_token)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eot_id
    assert _field(reader, "tokenizer.ggml.eot_token_id") == eot_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == ref_tok.pad_token_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == ref_tok.bos_token_id
    assert types[eot_id] == gguf.TokenType.CONTROL
    padded = [i for i, t in enumerate(types) if t == gguf.TokenType.UNUSED]
    assert padded and padded == list(range(padded[0], len(tokens)))  # the vocab was padded to 16
    assert all(re.fullmatch(r"\[PAD\d+\]|<\|oasst_unused_\d+\|>", tokens[i]) for i in padded)
    assert len(tokens) % 16 == 0
    merges = _field(reader, "tokenizer.ggml.merges")
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    template = _field(reader, "tokenizer.chat_template")
    assert PROMPTER in template and "{% generation" not in template and "endgeneration" not in template


# A Go text/template evaluator for just what the Modelfile's TEMPLATE uses: range .Messages,
# if/else if eq .Role "x", .Content, end, and the {{- trim marker.
def _go_render(template: str, messages: list[dict]) -> str:
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    out: list[str] = []
    for i, p in enumerate(parts):
        if p.startswith("{{"):
            out.append(p)
        else:
            if i + 1 < len(parts) and parts[i + 1].startswith("{{-"):
                p = p.rstrip()
            if i > 0 and parts[i - 1].endswith("-}}"):
                p = p.lstrip()
            out.append(p)
    text_and_actions = [p for p in out if p]

    def run(items, msg):
        result, pos = [], 0
        while pos < len(items):
            item = items[pos]
            action = item.strip("{}- ").strip() if item.startswith("{{") else None
            if action is None:
                result.append(item)
            elif action == "range .Messages":
                body, pos = _block(items, pos + 1)
                for m in messages:
                    result.append(run(body, m))
            elif action.startswith("if "):
                branches, pos = _branches(items, pos)
                for cond, body in branches:
                    if cond is None or msg["role"] == re.search(r'"(.*)"', cond).group(1):
                        result.append(run(body, msg))
                        break
            elif action == ".Content":
                result.append(msg["content"])
            else:
                raise AssertionError(f"unexpected action {action}")
            pos += 1
        return "".join(result)

    return run(text_and_actions, None)


def _action(item):
    return item.strip("{}- ").strip() if item.startswith("{{") else None


def _block(items, pos):
    depth, body = 0, []
    while True:
        a = _action(items[pos])
        if a is not None and (a.startswith("if ") or a.startswith("range ")):
            depth += 1
        if a == "end":
            if depth == 0:
                return body, pos
            depth -= 1
        body.append(items[pos])
        pos += 1


def _branches(items, pos):
    branches, cond, body, depth = [], _action(items[pos]), [], 0
    pos += 1
    while True:
        a = _action(items[pos])
        if a is not None and (a.startswith("if ") or a.startswith("range ")):
            depth += 1
        elif a == "end" and depth:
            depth -= 1
        elif depth == 0 and a is not None and (a == "end" or a.startswith("else")):
            branches.append((cond, body))
            if a == "end":
                return branches, pos
            cond, body = (a.removeprefix("else ") if a != "else" else None), []
            pos += 1
            continue
        body.append(items[pos])
        pos += 1


def test_modelfile_renders_the_oasst_format_and_stops_at_end_of_turn(trained, tmp_path):
    from oasst_peft.sample import SAMPLING_CONFIGS

    _, _, merged = trained
    out = _export(merged, tmp_path, "f16")
    _, ref_tok = _reference(merged)
    text = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{out.name}\n" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for messages in PROBES:
        expected = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert _go_render(template, messages) == expected
        assert expected.endswith(ASSISTANT)
    assert _go_render(template, PROBES[3]).startswith(SYSTEM)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == [ref_tok.eos_token, PROMPTER]
    params = dict(re.findall(r"^PARAMETER (\w+) ([\d.]+)$", text, re.M))
    typical = SAMPLING_CONFIGS["typical"]
    for key in ("temperature", "typical_p", "top_k", "top_p"):
        assert float(params[key]) == float(typical[key]) == float(TYPICAL[key])


def test_a_model_with_its_own_chat_template_gets_no_oasst_template_in_its_modelfile(trained, tmp_path):
    import shutil

    import gguf
    from transformers import AutoTokenizer

    arch, _, merged = trained
    if arch != "llama":
        pytest.skip("one architecture is enough")
    own = tmp_path / "own"
    shutil.copytree(merged, own)
    tok = AutoTokenizer.from_pretrained(str(own))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(str(own))
    lines: list[str] = []
    out = tmp_path / "gguf" / "own.gguf"
    export_gguf(own, out, qtype="f32", say=lines.append)
    text = (out.parent / "Modelfile").read_text(encoding="utf-8")
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "ollama show NAME --template" in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == [tok.eos_token]  # not <|prompter|>
    assert any(line.startswith("modelfile: no TEMPLATE, since the model's chat template") for line in lines)
    reader = gguf.GGUFReader(str(out))
    assert (
        _field(reader, "tokenizer.chat_template") == tok.chat_template
    )  # Ollama and llama.cpp read this one


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (1, 2)  # 2: refused at parse time (e.g. an unknown --type)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_gpt_neox_is_refused_in_one_line_before_any_file_is_written(tmp_path, capsys):
    base = make_base(tmp_path, "gpt_neox")
    run = make_run(tmp_path, base, "run", steps=1)
    for src in (base, run):  # a full model, and a run refused before its merge
        err = _one_line_error(capsys, ["export", str(src), "--gguf", str(tmp_path / "out" / "m.gguf")])
        assert "GPT-NeoX" in err and "cannot load" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_options_and_existing_outputs_are_one_line(trained, tmp_path, capsys):
    _, _, merged = trained
    out = tmp_path / "m.gguf"
    err = _one_line_error(capsys, ["export", str(merged), "--gguf", str(out), "--type", "q4_k"])
    assert "--type" in err and "q8_0" in err
    err = _one_line_error(capsys, ["export", str(merged), "--gguf", str(tmp_path / "m.bin")])
    assert ".gguf" in err
    out.write_bytes(b"keep me")
    err = _one_line_error(capsys, ["export", str(merged), "--gguf", str(out)])
    assert "--overwrite" in err and out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit) as e:
        main(["export", str(merged), "--gguf", str(out), "--type", "q8_0", "--overwrite"])
    assert e.value.code in (0, None)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_a_failed_export_leaves_the_previous_file_in_place(trained, tmp_path, monkeypatch):
    import oasst_peft.export.writer as writer

    _, _, merged = trained
    out = _export(merged, tmp_path, "f16")
    before = out.read_bytes()

    def boom(*_a, **_k):
        raise OasstError("export: disk full (simulated)")

    monkeypatch.setattr(writer, "encode", boom)
    with pytest.raises(OasstError):
        export_gguf(merged, out, qtype="q8_0", overwrite=True, say=lambda _: None)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", out.name]


def test_cli_export_imports_no_torch():
    code = (
        "import sys, oasst_peft.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_q8_0_blocks_round_trip_within_quantization_error():
    import gguf

    from oasst_peft.export.gguf_model import encode, storage_type

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    t = storage_type("q8_0", w.shape)
    back = gguf.quants.dequantize(encode(w, t), t)
    assert t == gguf.GGMLQuantizationType.Q8_0 and np.abs(back - w).max() < np.abs(w).max() / 100
    assert storage_type("q8_0", (8, 48)) == gguf.GGMLQuantizationType.F16  # not whole 32-blocks
    assert storage_type("q8_0", (64,)) == gguf.GGMLQuantizationType.F32


@pytest.mark.slow
def test_a_qlora_run_exports_with_the_merged_models_logits(tmp_path):
    from merge_tools import merge

    base = make_base(tmp_path, "llama")
    run = make_run(tmp_path, base, "qrun", mode="qlora", steps=2)
    merged = tmp_path / "merged"
    merge(run, merged, say=lambda _: None)
    out = _export(run, tmp_path / "gguf", "f32")
    model, tok = _load(out)
    ref, ref_tok = _reference(merged)
    ids = _ids(ref_tok, PROBES[0])
    assert _ids(tok, PROBES[0]) == ids
    with torch.no_grad():
        diff = (model(torch.tensor([ids])).logits - ref(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4
