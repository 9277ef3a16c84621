"""The mix options (val_split, fraction, max_train_set, max_val_set), determinism, per-dataset
validation, and the SFT-7 mix from a recipe pointed at local fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from oasst_peft.config import load_recipe
from oasst_peft.data import Mix, data_stats, load_mix, parse_datasets, tokenize_mix
from oasst_peft.errors import OasstError
from oasst_peft.template import setup_tokenizer, tokenize_with_mask
from tests.data.builders import fixture_trees
from tests.tiny import make_tokenizer

FIX = Path(__file__).parent / "fixtures"


def chat_file(path: Path, n: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mix_of(tmp_path, seed=0, n=100, **opts):
    path = chat_file(tmp_path / "chat.jsonl", n)
    specs = parse_datasets([{"chat": {"data_files": str(path), "format": "messages", **opts}}], tmp_path)
    return load_mix(specs, seed=seed).parts["chat"]


def ids(convs):
    return [int(c[0]["content"].split()[1]) for c in convs]


def test_val_split_sizes_and_disjoint(tmp_path):
    part = mix_of(tmp_path, val_split=0.1)
    assert len(part.validation) == 10 and len(part.train) == 90
    assert not set(ids(part.train)) & set(ids(part.validation))
    assert ids(part.train) == sorted(ids(part.train))  # source order kept within a split
    tiny = mix_of(tmp_path, n=3, val_split=0.05)
    assert (len(tiny.train), len(tiny.validation)) == (2, 1)  # at least one held out, never all
    none = mix_of(tmp_path, val_split=0.0)
    assert (len(none.train), len(none.validation)) == (100, 0)


def test_deterministic_for_a_seed(tmp_path):
    a = mix_of(tmp_path, seed=1, val_split=0.2, fraction=0.5)
    b = mix_of(tmp_path, seed=1, val_split=0.2, fraction=0.5)
    c = mix_of(tmp_path, seed=2, val_split=0.2, fraction=0.5)
    assert (a.train, a.validation) == (b.train, b.validation)
    assert a.validation != c.validation


def test_fraction_and_max_train_set(tmp_path):
    full = mix_of(tmp_path, val_split=0.2)
    half = mix_of(tmp_path, val_split=0.2, fraction=0.5)
    assert len(half.train) == 40 and set(ids(half.train)) <= set(ids(full.train))
    assert half.validation == full.validation  # sampling the train split leaves validation alone
    assert half.dropped["train"]["fraction"] == 40
    capped = mix_of(tmp_path, val_split=0.2, max_train_set=7)
    assert len(capped.train) == 7 and capped.dropped["train"]["max_train_set"] == 73
    both = mix_of(tmp_path, val_split=0.2, fraction=0.5, max_train_set=30)
    assert len(both.train) == 30
    assert (both.dropped["train"]["fraction"], both.dropped["train"]["max_train_set"]) == (40, 10)


def test_max_val_set(tmp_path):
    part = mix_of(tmp_path, val_split=0.3, max_val_set=5)
    assert len(part.validation) == 5 and len(part.train) == 70
    assert part.dropped["validation"]["max_val_set"] == 25
    zero = mix_of(tmp_path, val_split=0.3, max_val_set=0)
    assert zero.validation == []


def test_validation_kept_per_dataset_and_duplicates_stay_separate(tmp_path):
    path = chat_file(tmp_path / "chat.jsonl", 20)
    specs = parse_datasets(
        [
            {"chat": {"data_files": str(path), "format": "messages", "val_split": 0.25}},
            {"chat": {"data_files": str(path), "format": "messages", "val_split": 0.5}},
            {"code_alpaca": {"data_files": str(FIX / "code_alpaca.json"), "val_split": 0.5}},
        ],
        tmp_path,
    )
    mix = load_mix(specs, seed=0)
    assert list(mix.parts) == ["chat", "chat#2", "code_alpaca"]
    assert [len(mix.validation[k]) for k in mix.parts] == [5, 10, 1]


def test_non_alternating_and_no_assistant_are_counted(tmp_path):
    mix = Mix.from_conversations(
        {
            "hand": [
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
                [{"role": "user", "content": "q"}],
                [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ],
            ]
        }
    )
    assert len(mix.train["hand"]) == 1
    assert mix.dropped("hand") == {"not_alternating": 2, "no_assistant_turn": 1}


def test_a_mix_filtered_to_nothing_says_why(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"nope": 1}\n')
    spec = parse_datasets([{"mine": {"data_files": str(path), "format": "messages"}}], tmp_path)
    with pytest.raises(
        OasstError, match=r"mine: no usable conversation \((no_assistant_turn: 1|malformed_row: 1)"
    ):
        load_mix(spec, seed=0)


def test_an_empty_file_and_a_folder_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    spec = parse_datasets([{"mine": {"data_files": str(empty), "format": "messages"}}], tmp_path)
    with pytest.raises(OasstError) as e:
        load_mix(spec, seed=0)
    assert str(e.value) == f"datasets: mine: no usable conversation ({empty} has no rows)"
    (tmp_path / "folder").mkdir()
    spec = parse_datasets([{"mine": {"data_files": "folder", "format": "messages"}}], tmp_path)
    with pytest.raises(OasstError) as e:
        load_mix(spec, seed=0)
    folder = tmp_path / "folder"
    assert str(e.value) == (
        f"datasets: mine: data_files: {folder} is a folder; name its files, or a glob such as {folder / '*.jsonl'}"
    )


# ---------------------------------------------------------------- the SFT-7 mix from a recipe


def _expected_export_conversations() -> int:
    from tests.data.test_oasst_export import EXPECTED

    return len(EXPECTED) + 1  # plus the German tree: the SFT-7 languages include de


def test_sft7_recipe_on_local_fixtures_builds_train_and_validation(tmp_path):
    recipe = load_recipe(FIX / "sft7-local.yaml")
    specs = parse_datasets(recipe.datasets, recipe.recipe_dir)
    assert [s.key for s in specs] == [
        "oasst_export",
        "vicuna",
        "dolly15k",
        "grade_school_math_instructions",
        "code_alpaca",
    ]
    mix = load_mix(specs, seed=recipe.seed)
    tok = make_tokenizer("neox")
    setup_tokenizer(tok)
    tokenized = tokenize_mix(mix, tok, max_length=recipe.max_length, cache_dir=tmp_path / "cache")
    stats = data_stats(tokenized)
    ds = stats["datasets"]

    # conversations per split: fixture sizes with val_split 0.05 -> one held out (oasst: one tree)
    sizes = {k: (v["train"]["conversations"], v["validation"]["conversations"]) for k, v in ds.items()}
    assert sizes["vicuna"] == (4, 1)
    assert sizes["dolly15k"] == (2, 1)
    assert sizes["grade_school_math_instructions"] == (3, 1)
    assert sizes["code_alpaca"] == (1, 1)
    assert sum(sizes["oasst_export"]) == _expected_export_conversations()
    assert sizes["oasst_export"][1] >= 1

    # what was dropped, and why, is exactly what the fixtures hold
    export_drops = {
        "tree_not_ready_for_export": 1,
        "tree_failed_review": 1,
        "thread_deleted": 1,
        "thread_synthetic": 1,
        "thread_not_alternating": 1,
        "tree_without_reply": 1,
    }
    all_drops = {k: {**v["train"]["dropped"], **v["validation"]["dropped"]} for k, v in ds.items()}
    assert all_drops["oasst_export"] == export_drops
    assert all_drops["vicuna"] == {"not_opened_by_user": 1, "empty_reply": 1, "unknown_speaker": 1}
    assert all_drops["dolly15k"] == {"malformed_row": 2}
    assert all_drops["grade_school_math_instructions"] == {}
    assert all_drops["code_alpaca"] == {"empty_reply": 1}

    # tokens and trained tokens are those of the conversations, tokenized independently
    for key, part in mix.parts.items():
        for split in ("train", "validation"):
            encoded = [tokenize_with_mask(tok, c) for c in part.split(split)]
            got = ds[key][split]
            assert got["tokens"] == sum(len(i) for i, _ in encoded)
            assert got["trained_tokens"] == sum(sum(m) for _, m in encoded)
            assert got["turns"] == sum(len(c) for c in part.split(split))
            assert got["truncated"] == 0
    assert stats["total"]["train"]["conversations"] == sum(v[0] for v in sizes.values())
    assert len(tokenized.train) == stats["total"]["train"]["conversations"]
    assert set(tokenized.validation) == set(ds)
    assert tokenized.train.column_names == ["input_ids", "assistant_masks"]


def test_committed_export_fixture_matches_its_builder():
    lines = (FIX / "oasst_export.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == fixture_trees()


def test_skipped_rows_are_said_with_the_first_file_and_line(tmp_path):
    """A few bad rows are skipped, and train / data stats say where the first one is (stdout stays JSON)."""
    import subprocess
    import sys

    from tests.tiny_run import recipe_dict, write_base, write_recipe

    data = chat_file(tmp_path / "c.jsonl", 6)
    lines = data.read_text().splitlines()
    lines.insert(2, "{not json")
    data.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(write_base(tmp_path / "base"), data, tmp_path / "run", tmp_path / "cache"),
    )
    cmd = [sys.executable, "-m", "oasst_peft", "data", "stats", str(recipe), "--json"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["datasets"]["chat"]["train"]["dropped"] == {"malformed_row": 1}
    assert f"data: chat: skipped 1 malformed row; first: {data}:3: not valid JSON" in proc.stderr
