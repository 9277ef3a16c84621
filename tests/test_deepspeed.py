"""DeepSpeed ZeRO-2/3 on 2 CPU ranks through ``oasst-peft train --nproc 2``: train, save, resume, consolidate.

Each launch is a real ``torchrun`` of the CLI with the gloo backend (about 15 s on 2 cores; the first
run on a fresh machine also compiles two small DeepSpeed CPU ops). Step-1 losses are compared with a
single-process run on the same global batch (2 ranks x 4 = 1 process x 8).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from oasst_peft.config import load_recipe
from oasst_peft.errors import OasstError
from oasst_peft.train import train
from tests.tiny import make_model, make_tokenizer
from tests.tiny_run import run_cli

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _conversations(path: Path) -> Path:
    rows = []
    for i in range(24):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what is {i} plus two"},
                    {"role": "assistant", "content": f"the answer is {i + 2}"},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX base and a messages-format data file, shared by every test here."""
    root = tmp_path_factory.mktemp("zero")
    tok = make_tokenizer("neox")
    model = make_model("gpt_neox", tok, hidden=64)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    _conversations(root / "convs.jsonl")
    return root


def write_recipe(root: Path, name: str, **extra) -> Path:
    d = {
        "model_name": str(root / "base"),
        "dtype": "fp32",
        "max_length": 64,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "eval_steps": 0,
        "save_steps": 2,
        "logging_steps": 1,
        "output_dir": str(root / name),
        "cache_dir": str(root / "cache"),
        "datasets": [{"chat": {"data_files": str(root / "convs.jsonl"), "format": "messages"}}],
    }
    d.update(extra)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


oasst_peft = run_cli  # the CLI as a user runs it (python -m oasst_peft.cli), offline


def ok(res: subprocess.CompletedProcess) -> str:
    if res.returncode != 0:
        keys = ("error", "Error", "abort", "Abort", "terminate", "Traceback", "Signal")
        clues = "\n".join(line for line in res.stderr.splitlines() if any(k in line for k in keys))
        pytest.fail(
            f"exit {res.returncode}\n--- clues:\n{clues[-6000:]}\n--- stderr tail:\n{res.stderr[-4000:]}"
        )
    return res.stdout


def logged_losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def reference_loss(workdir):
    """Step-1 loss of one process on the same global batch (8 = 2 ranks x 4), no DeepSpeed, per base.

    LoRA starts as the identity (B = 0), so full and LoRA share the fp32 base's loss; QLoRA's 4-bit base
    has its own.
    """
    cache: dict[str, float] = {}

    def loss(mode: str = "full") -> float:
        base = "qlora" if mode == "qlora" else "full"
        if base not in cache:
            extra = {"peft": {"mode": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}} if base == "qlora" else {}
            recipe = load_recipe(
                write_recipe(workdir, f"single-{base}", per_device_train_batch_size=8, **extra)
            )
            cache[base] = train(recipe, max_steps=1, say=lambda _: None).metrics["train_loss"]
        return cache[base]

    return loss


def test_zero3_full_trains_checkpoints_resumes_exactly_and_consolidates(workdir, reference_loss, tmp_path):
    from transformers import AutoModelForCausalLM

    from merge_tools.zero import consolidate_zero_checkpoint

    recipe = write_recipe(workdir, "z3full", deepspeed_config="zero3", save_total_limit=3)
    out = workdir / "z3full"
    stdout = ok(oasst_peft("train", str(recipe), "--nproc", "2", "--max-steps", "4"))
    assert "launch: " in stdout and "--nproc-per-node 2" in stdout
    assert stdout.count("done: model saved") == 1  # rank 0 speaks for both
    for step in (2, 4):
        shards = sorted(p.name for p in (out / f"checkpoint-{step}" / f"global_step{step}").iterdir())
        assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    losses = logged_losses(out / "checkpoint-4")
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[1] == pytest.approx(reference_loss("full"), rel=1e-4)
    final = load_file(out / "model.safetensors")

    # Consolidated ZeRO-3 shards load with from_pretrained and equal the trained model.
    consolidated = tmp_path / "consolidated"
    consolidate_zero_checkpoint(out / "checkpoint-4", consolidated)
    state = AutoModelForCausalLM.from_pretrained(consolidated).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()  # gathered from the ranks at the end
    assert state.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name

    # Resume from checkpoint-2 into a new folder: same losses for steps 3-4 and the same final weights.
    resumed = workdir / "z3full-resumed"
    ckpt2 = str(out / "checkpoint-2")
    stdout = ok(
        oasst_peft(
            "train",
            str(recipe),
            "--nproc",
            "2",
            "--max-steps",
            "4",
            "--resume",
            ckpt2,
            "--output-dir",
            str(resumed),
        )
    )
    assert not (resumed / "checkpoint-2").exists()  # it started at step 2, not from scratch
    again = logged_losses(resumed / "checkpoint-4")  # steps 1-2 come from checkpoint-2's history
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6)
    after = load_file(resumed / "model.safetensors")
    for name, tensor in final.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-5, atol=1e-6)

    # A changed recipe is refused with one line (the check runs before any model is loaded).
    res = oasst_peft(
        "train",
        str(recipe),
        "--nproc",
        "2",
        "--max-steps",
        "4",
        "--resume",
        ckpt2,
        "--output-dir",
        str(tmp_path / "refused"),
        "--set",
        "learning_rate=0.001",
    )
    assert res.returncode != 0
    refusal = [line for line in res.stderr.splitlines() if line.startswith("error: --resume")]
    assert refusal and "learning_rate: 0.005 -> 0.001" in refusal[0] and "--force" in refusal[0]
    assert not (tmp_path / "refused" / "checkpoint-4").exists()


@pytest.mark.parametrize(
    ("stage", "mode"), [("zero2", "full"), ("zero2", "lora"), ("zero3", "lora"), ("zero3", "qlora")]
)
def test_zero_stage_and_mode_train_and_save(workdir, reference_loss, stage, mode):
    name = f"{stage}-{mode}"
    extra = {"deepspeed_config": stage}
    if mode != "full":
        extra["peft"] = {"mode": mode, "r": 4, "alpha": 8, "dropout": 0.0}
    recipe = write_recipe(workdir, name, **extra)
    out = workdir / name
    # DeepSpeed's WarmupDecayLR (the seeds' scheduler) runs the first two optimizer steps at lr 0.
    stdout = ok(oasst_peft("train", str(recipe), "--nproc", "2", "--max-steps", "3"))
    losses = logged_losses(out / "checkpoint-3")
    assert sorted(losses) == [1, 2, 3]
    assert losses[1] == pytest.approx(reference_loss(mode), rel=1e-4)
    assert all(math.isfinite(v) for v in losses.values())
    assert (out / "checkpoint-2" / "global_step2").is_dir()
    if mode == "full":
        weights = load_file(out / "model.safetensors")
        base = load_file(workdir / "base" / "model.safetensors")
        same_shape = [k for k in base if k in weights and weights[k].shape == base[k].shape]
        assert same_shape and all(not torch.equal(weights[k], base[k]) for k in same_shape)
        return
    if mode == "qlora" and stage == "zero3":
        assert "bnb_4bit_quant_storage set to float32" in stdout
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in adapter.values())  # ZeRO-3 gathered, not empty shards
    assert any(t.abs().sum() > 0 for t in lora_b)  # trained away from the zero init
    # The trained token rows of the embedding and head travel with the adapter under ZeRO-3 too (as under
    # ZeRO-2 / one GPU), and the adapter stays lean: no copy of the resized layers.
    assert sum(k.endswith("trainable_tokens_delta") for k in adapter) == 2, sorted(adapter)
    assert not any(".base_layer." in k for k in adapter), sorted(adapter)


def test_resume_in_one_process_refuses_a_two_rank_zero_checkpoint(workdir):
    """Runs after the ZeRO-3 test above: its checkpoint was written by 2 ranks."""
    ckpt = workdir / "z3full" / "checkpoint-2"
    if not ckpt.is_dir():
        pytest.skip("needs the ZeRO-3 run above")
    recipe = load_recipe(workdir / "z3full.yaml")
    with pytest.raises(OasstError, match="written by 2 process"):
        train(recipe, max_steps=4, resume=str(ckpt), output_dir=workdir / "z3-one", say=lambda _: None)


def test_zero2_full_of_a_tied_model_saves_its_embedding_once(workdir):
    """Under ZeRO-2 the trainer gets cloned weights; the tied lm_head must not come back as a second matrix."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer("neox")
    make_model("bloom", tok, hidden=64).save_pretrained(workdir / "tied-base")
    tok.save_pretrained(workdir / "tied-base")
    recipe = write_recipe(
        workdir, "zero2-tied", model_name=str(workdir / "tied-base"), deepspeed_config="zero2"
    )
    out = workdir / "zero2-tied"
    ok(oasst_peft("train", str(recipe), "--nproc", "2", "--max-steps", "2"))
    for folder in (out, out / "checkpoint-2"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "transformer.word_embeddings.weight" in keys and "lm_head.weight" not in keys, folder
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    base = load_file(workdir / "tied-base" / "model.safetensors")["transformer.h.0.mlp.dense_4h_to_h.weight"]
    assert not torch.equal(model.transformer.h[0].mlp.dense_4h_to_h.weight, base)  # it trained
