"""Lean adapters and stock loaders, on real tiny training runs of a tied Llama-style and an untied GPT-NeoX base.

A run's adapter holds the LoRA weights and the trained token rows only; stock peft
(``AutoPeftModelForCausalLM``, in a process that imports nothing of oasst-peft), ``merge`` and
``sample`` all rebuild the padded vocab and give the merged model's logits; ``plan`` predicts the
adapter file's size.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_tools import merge
from oasst_peft.config import recipe_from_dict
from oasst_peft.template import FILLER_TOKEN, fill_vocab, resize_embeddings, setup_tokenizer
from oasst_peft.train import train
from tests.merge.runs import merged_logits, reference_logits
from tests.tiny import make_model, make_tokenizer
from tests.tiny_run import recipe_dict, write_base, write_conversations

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llama_tied", "gpt_neox"]
PROMPT = [{"role": "user", "content": "what is a meme"}, {"role": "assistant", "content": "a joke"}]


def tied_llama_base(folder: Path) -> Path:
    """A random tiny Llama-style base whose lm_head is the input embedding (as SmolLM2's)."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer("llama")
    config = make_model("llama", tok, hidden=64).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """(base, run dir, recipe dict) per architecture: ``oasst-peft train`` for 2 steps."""
    root = tmp_path_factory.mktemp("adapters")
    data = write_conversations(root / "convs.jsonl")
    out = {}
    for arch in ARCHS:
        folder = root / f"base-{arch}"
        base = tied_llama_base(folder) if arch == "llama_tied" else write_base(folder, arch, hidden=64)
        d = recipe_dict(base, data, root / f"run-{arch}", root / "cache")
        train(recipe_from_dict(d), max_steps=2, say=lambda _m: None)
        out[arch] = (base, root / f"run-{arch}", d)
    return out


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merged")
    return {
        arch: merge(run, root / arch, verify=False, say=lambda _m: None).out
        for arch, (_, run, _) in runs.items()
    }


def _ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(folder).apply_chat_template(PROMPT, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _adapter_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter


def test_fill_vocab_names_every_padding_row_and_matches_no_text():
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    text = "what is a meme <|prompter|> hi"
    before = tok(text)["input_ids"]
    model = make_model("gpt_neox", make_tokenizer("neox"))
    rows = resize_embeddings(model, tok, 16)
    assert rows % 16 == 0 and len(tok) == rows == model.get_input_embeddings().weight.shape[0]
    fillers = [FILLER_TOKEN.format(i) for i in range(rows - 323)]
    assert tok.convert_tokens_to_ids(fillers) == list(range(323, rows))
    assert tok(text)["input_ids"] == before
    assert tok.decode(list(range(323, rows)), skip_special_tokens=True) == ""
    assert fill_vocab(tok, rows) == 0  # already full: nothing added


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_holds_the_lora_weights_and_token_rows_only(runs, arch):
    base, run, _ = runs[arch]
    record = json.loads((run / "oasst_run.json").read_text())
    rows, base_rows = record["vocab_rows"], record["base_vocab_rows"]
    assert rows > base_rows and rows % 16 == 0
    hidden = 64
    for folder in (run, run / "checkpoint-2"):
        tensors = _adapter_tensors(folder)
        other = [k for k in tensors if ".lora_" not in k and not k.endswith("trainable_tokens_delta")]
        assert other == [], f"{folder.name}: more than LoRA and token rows: {other}"
        assert not any(rows in shape for shape in tensors.values()), "a full embedding was stored"
        deltas = {k: s for k, s in tensors.items() if k.endswith("trainable_tokens_delta")}
        assert set(deltas.values()) == {(len(record["trainable_token_ids"]), hidden)}
        assert len(deltas) == (1 if arch == "llama_tied" else 2)  # a tied lm_head shares the input rows
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert size < rows * hidden * 4, "the adapter is bigger than one embedding table"
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(run)) == rows  # what stock loaders resize the base to


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_stock_auto_peft_model_loads_the_run_with_the_merged_logits(runs, merged, arch, tmp_path):
    """peft's documented loader, in a process with nothing of oasst-peft importable or imported."""
    _, run, _ = runs[arch]
    script = tmp_path / "load.py"
    script.write_text(
        """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

run, merged = sys.argv[1], sys.argv[2]
model = AutoPeftModelForCausalLM.from_pretrained(run).eval()
tok = AutoTokenizer.from_pretrained(run)
ids = tok.apply_chat_template(json.loads(sys.argv[3]), tokenize=True, return_dict=True)["input_ids"]
ref = AutoModelForCausalLM.from_pretrained(merged).eval()
with torch.no_grad():
    got = model(input_ids=torch.tensor([ids])).logits[0]
    want = ref(input_ids=torch.tensor([ids])).logits[0]
print(json.dumps({
    "shape": list(got.shape), "want_shape": list(want.shape),
    "max_abs_diff": (got - want).abs().max().item(),
    "same_argmax": bool(torch.equal(got.argmax(-1), want.argmax(-1))),
    "ours": sorted(m for m in sys.modules if m.split(".")[0] in ("oasst_peft", "merge_tools", "tests")),
}))
""",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run(
        [sys.executable, "-I", str(script), str(run), str(merged[arch]), json.dumps(PROMPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ours"] == []
    assert out["shape"] == out["want_shape"]
    assert out["max_abs_diff"] < 1e-4 and out["same_argmax"], out


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_of_a_lean_run_equals_base_plus_adapter(runs, merged, arch):
    base, run, _ = runs[arch]
    ids = _ids(run)
    ref = reference_logits(base, run, ids)  # the base grown to vocab_rows, the adapter applied by peft
    got = merged_logits(merged[arch], ids)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    record = json.loads((merged[arch] / "oasst_merge.json").read_text())
    assert record["token_rows"] > 0 and record["vocab_rows"] == ref.shape[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_rebuilds_the_resized_base(runs, merged, arch):
    from oasst_peft.sample import load_sampler

    _, run, _ = runs[arch]
    sampler = load_sampler(run)
    ids = _ids(run)
    with torch.no_grad():
        got = sampler.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = merged_logits(merged[arch], ids)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_planned_adapter_size_matches_the_saved_file(runs, arch):
    from oasst_peft import plan

    _, run, d = runs[arch]
    planned = plan.plan_recipe(recipe_from_dict(d))["adapter"]["bytes"]
    actual = (run / "adapter_model.safetensors").stat().st_size
    assert planned == pytest.approx(actual, rel=0.03)


def test_planned_7b_adapter_is_lora_plus_new_rows_only():
    from rich.console import Console

    from oasst_peft import model_info, plan
    from oasst_peft.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "stablelm7b-lora.yaml")
    assert recipe.peft.target_modules == "all-linear" and recipe.peft.r == 16
    result = plan.plan_recipe(recipe)
    shape = model_info.model_shape(model_info.load_model_config(recipe.model_name))
    lora = sum(16 * (lin.in_features + lin.out_features) * lin.count for lin in shape.linears) * 4
    rows = result["adapter"]["token_rows"] * shape.hidden * (1 if shape.tied else 2) * 4
    planned = result["adapter"]["bytes"]
    assert lora + rows < planned < (lora + rows) * 1.01
    embedding = shape.vocab * shape.hidden * 2  # one bf16 table, what peft's default saved besides
    assert planned < embedding / 4
    buf = io.StringIO()
    plan.format_plan(result, console=Console(file=buf, width=120))
    assert f"adapter on disk: {planned / 2**20:.1f} MiB" in buf.getvalue()


def test_merge_into_another_base_of_the_same_shape_is_refused(runs, tmp_path):
    """The lean adapter has no copy of the base to compare with: the run record's signature catches it."""
    from merge_tools import MergeError

    _, run, _ = runs["gpt_neox"]
    other = write_base(tmp_path / "other", "gpt_neox", hidden=64, seed=5)
    with pytest.raises(MergeError, match="differs from the base the adapter was trained on"):
        merge(run, tmp_path / "out", base=other, verify=False, say=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_an_adapter_saved_with_peft_all_linear_merges(runs, merged, tmp_path):
    """``target_modules: all-linear`` (peft's own value, kept when a LoraConfig is saved unexpanded) is valid."""
    import shutil

    _, run, _ = runs["llama_tied"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["target_modules"] = "all-linear"
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    out = merge(copy, tmp_path / "out", verify=False, say=lambda _m: None).out
    ids = _ids(run)
    assert torch.equal(merged_logits(out, ids), merged_logits(merged["llama_tied"], ids))
    from oasst_peft.errors import OasstError
    from oasst_peft.model_files import check_folder

    check_folder(copy, key="merge")  # what `oasst-peft merge` checks before loading: all-linear passes
    cfg["target_modules"] = ["no_such_proj"]  # names the adapter holds no weights for are still refused
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(OasstError, match="matches none of the modules"):
        check_folder(copy, key="merge")


def test_python_api_checks_the_input_files_as_the_cli_does(runs, tmp_path):
    """merge(), load_sampler() and export_gguf() refuse a broken adapter_config.json in one line, not deep in peft."""
    import shutil

    from merge_tools import MergeError
    from oasst_peft.errors import OasstError
    from oasst_peft.export import export_gguf
    from oasst_peft.sampler import load_sampler

    _, run, _ = runs["llama_tied"]
    broken = tmp_path / "run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    (broken / "adapter_config.json").write_text('{"r": 16, "lora_alpha": ')
    calls = [
        (MergeError, lambda: merge(broken, tmp_path / "m", verify=False, say=lambda _m: None)),
        (OasstError, lambda: load_sampler(broken)),
        (OasstError, lambda: export_gguf(broken, tmp_path / "x.gguf", say=lambda _m: None)),
    ]
    for kind, call in calls:
        with pytest.raises(kind) as e:
            call()
        msg = str(e.value)
        assert "adapter_config.json" in msg and "\n" not in msg, msg
    assert not (tmp_path / "m").exists() and not (tmp_path / "x.gguf").exists()
