"""End to end on tiny models: train LoRA/QLoRA/DoRA a few steps, merge, reload, compare logits; files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from merge_tools import MergeError, format_report, merge
from tests.merge.runs import make_base, make_run, merged_logits, reference_logits

ROOT = Path(__file__).resolve().parents[2]
CONV = [{"role": "user", "content": "what is a meme"}, {"role": "assistant", "content": "a joke"}]
quiet = {"say": lambda _m: None}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def neox(root):
    base = make_base(root, "gpt_neox")
    return base, make_run(root, base, "neox-lora")


@pytest.fixture(scope="module")
def bloom(root):
    base = make_base(root, "bloom")
    return base, make_run(root, base, "bloom-lora")


@pytest.fixture(scope="module")
def llama_dora(root):
    base = make_base(root, "llama")
    return base, make_run(root, base, "llama-dora", dora=True, rslora=True, r=8, alpha=4)


@pytest.fixture(scope="module")
def llama_qlora(root):
    base = make_base(root, "llama")
    return base, make_run(root, base, "llama-qlora", mode="qlora")


def _ids(folder: Path) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    out = tok.apply_chat_template(CONV, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _adapter_moved(run: Path) -> None:
    state = load_file(run / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 1e-3 for k, v in state.items()), (
        "training did not move LoRA B"
    )


@pytest.mark.parametrize("which", ["neox", "bloom", "llama_dora"])
def test_merged_model_equals_base_plus_adapter(request, root, which):
    base, run = request.getfixturevalue(which)
    _adapter_moved(run)
    out = root / f"merged-{which}"
    report = merge(run, out, verify=True, **quiet)
    ids = _ids(out)
    ref = reference_logits(base, run, ids)
    got = merged_logits(out, ids)
    assert (got - ref).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert report.verify is not None and report.verify.passed and report.verify.max_abs_diff < 1e-4
    assert report.verify.top1_agreement == 1.0
    assert "verify: ok" in format_report(report)
    # the added token rows changed: the merged embedding is not the base's
    record = json.loads((run / "oasst_run.json").read_text())
    assert report.vocab_rows == record["vocab_rows"] > record["base_vocab_rows"]


def test_weights_split_in_many_row_blocks_merge_to_the_same_values(root, llama_dora, monkeypatch):
    """Real checkpoints span many row blocks per weight; tiny ones fit one, so blocks are shrunk here."""
    import merge_tools.stream

    _base, run = llama_dora
    whole = merge(run, root / "blocks-whole", verify=False, **quiet)
    monkeypatch.setattr(merge_tools.stream, "TILE_BYTES", 64)  # a few rows per block
    assert merge_tools.stream.tile_rows(32) < 4
    split = merge(run, root / "blocks-split", verify=False, **quiet)
    a, b = _tensors(whole.out), _tensors(split.out)
    assert a.keys() == b.keys() and whole.merged_modules == split.merged_modules > 0
    for name, t in a.items():  # the same float32 math; a sgemm on fewer rows may round the last bit apart
        torch.testing.assert_close(b[name], t, rtol=1e-6, atol=1e-7, msg=name)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def test_output_folder_has_everything_a_server_needs(root, neox):
    base, run = neox
    out = root / "merged-files"
    merge(run, out, verify=False, **quiet)
    record = json.loads((run / "oasst_run.json").read_text())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "oasst_recipe.yaml"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards
    )
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == record["vocab_rows"]
    assert config["eos_token_id"] == record["eot_token_id"]
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>") == record["eot_token_id"]
    assert gen["pad_token_id"] == record["pad_token_id"]
    text = tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|prompter|>what is a meme<|endoftext|><|assistant|>"
    card = (out / "README.md").read_text()
    for section in (
        "## Model Details",
        "## Prompting",
        "## Dev Details",
        "command: `oasst-peft train",
        "data:",
    ):
        assert section in card, section
    assert (
        "<|prompter|>What is a meme, and what's the history behind this word?<|endoftext|><|assistant|>"
        in card
    )
    assert "lang: en,de" in card and "merge: `oasst-peft merge" in card


def test_bloom_generation_eos_is_end_of_sentence(root, bloom):
    _, run = bloom
    out = root / "merged-bloom-eos"
    merge(run, out, verify=False, **quiet)
    tok = AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("</s>")
    assert tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True) == (
        "<|prompter|>what is a meme</s><|assistant|>"
    )
    # tied embeddings: the checkpoint keeps one copy, with the trained rows
    with safe_open(next(out.glob("model-*.safetensors")), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_qlora_merge_reproduces_the_4bit_model_as_trained(root, llama_qlora):
    base, run = llama_qlora
    out = root / "merged-qlora"
    lines: list[str] = []
    report = merge(run, out, verify=True, say=lines.append)
    assert any(line.startswith("qlora base: dequantized-nf4") for line in lines)
    assert report.qlora_base == "dequantized-nf4" and report.nf4_weights == 14
    ids = _ids(out)
    as_trained = reference_logits(base, run, ids, qlora=True)
    got = merged_logits(out, ids)
    assert (got - as_trained).abs().max() < 1e-4
    assert report.verify.passed and report.verify.reference.startswith("4-bit NF4")

    exact = root / "merged-qlora-exact"
    lines.clear()
    merge(run, exact, qlora_base="exact", verify=False, say=lines.append)
    assert any(line.startswith("qlora base: exact") for line in lines)
    got_exact = merged_logits(exact, ids)
    assert (got_exact - as_trained).abs().max() > 100 * (got - as_trained).abs().max()
    assert (got_exact - reference_logits(base, run, ids)).abs().max() < 1e-4  # full-precision base + adapter


def test_output_dtype_bf16_and_default_is_the_bases(root, llama_dora):
    _, run = llama_dora
    out = root / "merged-bf16"
    report = merge(run, out, dtype="bf16", verify=True, **quiet)
    assert report.dtype == "bf16" and report.verify.passed and report.verify.rounded_to == "bf16"
    shard = next(out.glob("model-*.safetensors"))
    with safe_open(shard, "pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = merge(run, root / "merged-default", verify=False, **quiet)
    assert fp32.dtype == "fp32"  # the tiny base is stored in fp32


def test_small_max_shard_size_gives_several_shards(root, neox):
    _, run = neox
    out = root / "merged-shards"
    report = merge(run, out, max_shard_size="40KB", verify=False, **quiet)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert report.shards == len(set(index["weight_map"].values())) > 3
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(load_file(out / shard))
    single = merge(run, root / "merged-one-shard", verify=False, **quiet)
    assert single.shards == 1
    other = load_file(next((root / "merged-one-shard").glob("model-*.safetensors")))
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


def test_adapter_with_saved_embedding_layers_merges_to_the_same_model(root, neox):
    """A run saved as peft does by default (the whole resized layers beside the adapter, as runs before lean
    adapters were) merges to exactly the model its lean twin merges to."""
    base, lean = neox
    legacy = make_run(root, base, "neox-legacy", lean=False)
    assert any(".base_layer." in k for k in load_file(legacy / "adapter_model.safetensors"))
    assert not any(".base_layer." in k for k in load_file(lean / "adapter_model.safetensors"))
    lean_size = (lean / "adapter_model.safetensors").stat().st_size
    assert lean_size < (legacy / "adapter_model.safetensors").stat().st_size
    merge(legacy, root / "merged-legacy", verify=False, **quiet)
    merge(lean, root / "merged-lean", verify=False, **quiet)
    got = load_file(next((root / "merged-legacy").glob("model*.safetensors")))
    want = load_file(next((root / "merged-lean").glob("model*.safetensors")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_existing_out_is_refused_unless_overwrite(root, neox):
    _, run = neox
    out = root / "merged-exists"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge(run, out, verify=False, **quiet)
    assert (out / "keep").exists()
    merge(run, out, verify=False, overwrite=True, **quiet)
    assert not (out / "keep").exists() and (out / "config.json").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".merged-exists")]


def test_mismatched_bases_are_one_clear_error(root, neox):
    base, run = neox
    other_arch = make_base(root, "llama")
    with pytest.raises(
        MergeError, match=r"adapter targets gpt_neox\.layers\.\d\.\w+\.\w+, which base .* does not have"
    ):
        merge(run, root / "m1", base=other_arch, **quiet)
    wider = make_base(root, "gpt_neox", hidden=32)
    with pytest.raises(
        MergeError,
        match=r"adapter does not fit base .*: gpt_neox\S+ is \(\d+, 32\) there but the adapter expects \(\d+, 64\)",
    ):
        merge(run, root / "m2", base=wider, **quiet)
    same_shape = make_base(root, "gpt_neox", seed=7)  # same architecture, other weights
    with pytest.raises(
        MergeError,
        match=r"embed_in\.weight of base .* differs from the base the adapter was trained on \(row 0\)",
    ):
        merge(run, root / "m3", base=same_shape, verify=False, **quiet)
    for name in ("m1", "m2", "m3"):
        assert not (root / name).exists()
    assert not [p for p in root.iterdir() if ".partial-" in p.name]


def test_vocab_mismatch_is_refused(root, neox):
    _, run = neox
    tampered = root / "neox-tampered"
    tampered.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (tampered / f.name).write_bytes(f.read_bytes())
    record = json.loads((run / "oasst_run.json").read_text())
    record["base_vocab_rows"] += 16
    (tampered / "oasst_run.json").write_text(json.dumps(record))
    with pytest.raises(
        MergeError, match="vocab mismatch: base .* has 320 embedding rows but training started from 336"
    ):
        merge(tampered, root / "m-vocab", **quiet)


def test_pickle_base_and_missing_inputs_are_refused(root, neox):
    _, run = neox
    pickled = root / "pickled-base"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        MergeError, match=r"pickle \(\.bin\) weights, which are refused; convert them to safetensors"
    ):
        merge(run, root / "m-bin", base=pickled, **quiet)
    with pytest.raises(MergeError, match="does not exist"):
        merge(root / "nope", root / "m-none", **quiet)
    with pytest.raises(MergeError, match="--dtype: 'fp8'"):
        merge(run, root / "m-dtype", dtype="fp8", **quiet)
    with pytest.raises(MergeError, match="--qlora-base: 'nf4'"):
        merge(run, root / "m-qb", qlora_base="nf4", **quiet)


def test_hub_base_offline_is_one_clear_line(root, neox, monkeypatch):
    _, run = neox
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        MergeError, match="base 'someone/missing-model' is offline .* not in the local cache"
    ) as e:
        merge(run, root / "m-hub", base="someone/missing-model", **quiet)
    assert "\n" not in str(e.value)


def test_free_disk_is_checked_before_writing(root, neox, monkeypatch):
    import shutil
    from collections import namedtuple

    _, run = neox
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 1000))
    with pytest.raises(MergeError, match="needs .* free on the disk of .* only 1.00 KB is free"):
        merge(run, root / "m-disk", **quiet)
    assert not (root / "m-disk").exists()


def test_run_without_final_adapter_points_at_its_checkpoint(root, neox):
    _, run = neox
    unfinished = root / "unfinished"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(MergeError, match="did not finish.*checkpoint-4"):
        merge(unfinished, root / "m-unfinished", **quiet)


def test_adapter_missing_the_new_token_rows_is_refused(root, neox):
    _, run = neox
    bare = root / "neox-bare"
    bare.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name != "adapter_model.safetensors":
            (bare / f.name).write_bytes(f.read_bytes())
    state = load_file(run / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if ".lora_" in k}, bare / "adapter_model.safetensors")
    with pytest.raises(
        MergeError, match="the vocab grew from 320 to 336 rows in training but the adapter stores"
    ):
        merge(bare, root / "m-bare", **quiet)


def test_full_run_becomes_a_plain_checkpoint_in_the_asked_dtype(root, tmp_path):
    from transformers import AutoModelForCausalLM

    from oasst_peft.template import resize_embeddings, setup_tokenizer
    from tests.tiny import make_model, make_tokenizer

    tok = make_tokenizer("neox")
    fmt = setup_tokenizer(tok)
    model = make_model("gpt_neox", tok, hidden=64)
    resize_embeddings(model, tok)
    run = tmp_path / "full-run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    (run / "oasst_run.json").write_text(
        json.dumps(
            {
                "base_model": "x",
                "mode": "full",
                "eot_token": fmt.eot,
                "eot_token_id": fmt.eot_id,
                "pad_token_id": fmt.pad_id,
                "command": ["oasst-peft", "train", "r.yaml"],
            }
        )
    )
    lines: list[str] = []
    report = merge(run, tmp_path / "plain", dtype="bf16", verify=True, say=lines.append)
    assert report.kind == "full" and report.mode == "full" and report.verify is None
    assert any(line.startswith("verify: not applicable") for line in lines)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v.to(torch.bfloat16)), k
    gen = json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == fmt.eot_id
    assert "full-weight fine-tuning" in (tmp_path / "plain" / "README.md").read_text()
