"""Every registered dataset on a small fixture in its real schema, the generic formats, the registry,
and the recipe-entry errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from oasst_peft.data import load_mix, parse_datasets, register_dataset
from oasst_peft.data.sources import CONTINUE, TRANSLATION_PROMPTS
from oasst_peft.errors import OasstError

FIX = Path(__file__).parent / "fixtures"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def load(name: str, seed: int = 0, **opts):
    opts = {"val_split": 0.0, **opts}
    specs = parse_datasets([{name: opts}], FIX)
    return load_mix(specs, seed=seed).parts[specs[0].key]


def test_vicuna_sharegpt():
    part = load("vicuna", data_files="sharegpt.json")
    got = part.train
    assert got[0] == [
        u("How do I boil an egg?"),
        a("Put it in boiling water for nine minutes."),
        u("And a soft one?"),
        a("About six minutes."),
    ]
    assert got[1] == [u("Write a list\nof three fruits"), a("apple, pear, plum")]  # merged turns
    assert got[2] == [u("Should I use snake_case?"), a("Yes, like my_var or *args.")]  # unescaped, tail cut
    assert got[3][0]["content"] in CONTINUE and got[3][1] == a("Could you say a little more?")
    assert got[4] == [s("You are terse."), u("Capital of France?"), a("Paris.")]
    assert len(got) == 5
    assert dict(part.dropped["train"]) == {"not_opened_by_user": 1, "empty_reply": 1, "unknown_speaker": 1}


@pytest.mark.parametrize(
    ("context", "first"),
    [
        (
            "prompt",
            [u("Who wrote the novel mentioned?\n\nThe novel Blue Harbour was written by Ana Lind in 1931.")],
        ),
        (
            "system",
            [
                s("The novel Blue Harbour was written by Ana Lind in 1931."),
                u("Who wrote the novel mentioned?"),
            ],
        ),
        ("drop", [u("Who wrote the novel mentioned?")]),
    ],
)
def test_dolly_context_modes(context, first):
    part = load("dolly15k", data_files="dolly.jsonl", context=context)
    assert part.train[0] == [*first, a("Ana Lind.")]
    assert part.train[1] == [u("Suggest a name for a cat."), a("Pepper.")]  # no context: never a system turn
    assert len(part.train) == 3
    assert part.dropped["train"]["malformed_row"] == 2  # a broken JSON line, a row without 'response'


def test_dolly_default_context_in_prompt_references_stripped():
    part = load("dolly15k", data_files="dolly.jsonl")
    assert part.train[2][0] == u("Summarize the text.\n\nRivers carry water to the sea. They shape valleys.")


def test_bad_row_fails_with_file_and_line_when_asked():
    with pytest.raises(OasstError, match=r"dolly\.jsonl:4: not valid JSON.*dolly15k"):
        load("dolly15k", data_files="dolly.jsonl", on_error="fail")


def test_code_alpaca_and_alpaca():
    part = load("code_alpaca", data_files="code_alpaca.json")
    assert part.train == [
        [u("Write a function that adds two numbers."), a("def add(a, b):\n    return a + b")],
        [u("Reverse the given string in Python.\ns = 'abc'"), a("s[::-1]")],
    ]
    assert dict(part.dropped["train"]) == {"empty_reply": 1}
    alp = load("alpaca", data_files="alpaca.json")
    assert alp.train == [
        [u("Give a synonym for happy."), a("Glad.")],
        [u("Classify the animal.\nwhale"), a("Mammal.")],
    ]


def test_grade_school_math_jsonl_and_csv(tmp_path):
    part = load("grade_school_math_instructions", data_files="grade_school_math.jsonl")
    assert part.train[1] == [u("A box holds 6 eggs. How many eggs are in 5 boxes?"), a("6 * 5 = 30 eggs.")]
    assert len(part.train) == 4
    rows = [json.loads(x) for x in (FIX / "grade_school_math.jsonl").read_text().splitlines()]
    path = tmp_path / "gsm.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["INSTRUCTION", "RESPONSE", "SOURCE"])
        w.writeheader()
        w.writerows(rows)
    assert load("grade_school_math_instructions", data_files=str(path)).train == part.train


def test_gsm8k():
    part = load("gsm8k", data_files="gsm8k.jsonl")
    assert part.train[0] == [
        u("Sam has 5 pens and gives away 2. How many are left?"),
        a("Sam has 5 - 2 = <<5-2=3>>3 pens left.\n#### 3"),
    ]


def test_webgpt_best_answer_per_question():
    part = load("webgpt", data_files="webgpt.jsonl")
    assert part.train == [
        [u("Why is the sky blue?"), a("Sunlight scatters off air molecules.")],
        [u("How many legs does a spider have?"), a("Eight.")],
    ]
    assert dict(part.dropped["train"]) == {"empty_reply": 1, "worse_answer_same_question": 1}


def test_joke():
    part = load("joke", data_files="joke.jsonl")
    assert part.train[0] == [
        u("I told my plant a joke. It did not laugh; it was a little stem-otional."),
        a("A pun on 'emotional' and a plant's stem."),
    ]


def test_translation_random_direction_and_phrasing_seeded():
    rows = [json.loads(x)["translation"] for x in (FIX / "wmt_zh_en.jsonl").read_text().splitlines()]
    first = load("wmt2019_zh-en", data_files="wmt_zh_en.jsonl", seed=5).train
    assert first == load("wmt2019_zh-en", data_files="wmt_zh_en.jsonl", seed=5).train
    names = {"zh": "Chinese", "en": "English"}
    directions, phrasings = set(), set()
    for conv, pair in zip(first, rows, strict=True):
        prompt, answer = conv[0]["content"], conv[1]["content"]
        src, tgt = ("zh", "en") if answer == pair["en"] else ("en", "zh")
        assert answer == pair[tgt]
        options = {t.format(src=names[src], tgt=names[tgt], text=pair[src]): t for t in TRANSLATION_PROMPTS}
        assert prompt in options
        directions.add(src)
        phrasings.add(options[prompt])
    assert directions == {"zh", "en"} and len(phrasings) >= 2
    assert load("wmt2019_zh-en", data_files="wmt_zh_en.jsonl", seed=6).train != first


def test_translation_rows_missing_a_language_say_so():
    with pytest.raises(
        OasstError, match=r"ted_trans_zh-ja: no usable conversation \(malformed_row: 6\).*'ja'"
    ):
        load("ted_trans_zh-ja", data_files="wmt_zh_en.jsonl")


def test_generic_messages_format_counts_bad_conversations():
    part = load("my_chat", data_files="messages.jsonl", format="messages")
    assert part.train == [
        [u("What is 2 + 3?"), a("5")],
        [s("Answer in one word."), u("Opposite of hot?"), a("Cold.")],
        [u("Hello?"), a("Hello!")],
    ]
    assert dict(part.dropped["train"]) == {
        "not_alternating": 1,
        "no_assistant_turn": 1,
        "malformed_message": 1,
    }


def test_generic_sharegpt_and_alpaca_formats():
    sg = load("mine", data_files="sharegpt.json", format="sharegpt")
    assert sg.train[2] == [u("Should I use snake\\_case?"), a("Yes, like my\\_var or \\*args.")]  # raw text
    al = load("mine", data_files="code_alpaca.json", format="alpaca")
    assert al.train == load("code_alpaca", data_files="code_alpaca.json").train


def test_register_dataset_in_a_few_lines(tmp_path):
    @register_dataset("test_qa_pairs", hub_id="someone/qa-pairs")
    def qa_pairs(row, ctx):
        return [u(row["q"]), a(row["a"])]

    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "one?", "a": "1"}\n{"q": "two?"}\n{"q": "three?", "a": "3"}\n')
    part = load("test_qa_pairs", data_files=str(path))
    assert part.train == [[u("one?"), a("1")], [u("three?"), a("3")]]
    assert part.dropped["train"]["malformed_row"] == 1
    with pytest.raises(OasstError, match=r"qa\.jsonl:2: missing field 'a'"):
        load("test_qa_pairs", data_files=str(path), on_error="fail")


@pytest.mark.parametrize(
    ("name", "key", "hub"),
    [
        ("vicuna", "data_files", "anon8231489123/ShareGPT_Vicuna_unfiltered"),
        ("dolly15k", "data_files", "databricks/databricks-dolly-15k"),
        ("code_alpaca", "data_files", "sahil2801/CodeAlpaca-20k"),
        ("grade_school_math_instructions", "data_files", "qwedsacf/grade-school-math-instructions"),
        ("gsm8k", "data_files", "gsm8k"),
        ("webgpt", "data_files", "openai/webgpt_comparisons"),
        ("wmt2019_zh-en", "data_files", "wmt19"),
        ("ted_trans_en-ja", "data_files", "ted_talks_iwslt"),
    ],
)
def test_offline_hub_is_one_line_naming_dataset_and_key(monkeypatch, name, key, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        OasstError, match=rf"datasets: {name}: needs {hub} .*set {key}: PATH under {name}"
    ) as e:
        load_mix(parse_datasets([name], FIX), seed=0)
    assert "\n" not in str(e.value)


def test_unknown_dataset_lists_close_names():
    with pytest.raises(
        OasstError, match=r"unknown dataset 'vicunna' \(did you mean 'vicuna'\?\); known: .*dolly15k"
    ):
        parse_datasets(["vicunna"], FIX)


def test_unknown_option_suggests_closest_key():
    with pytest.raises(
        OasstError, match=r"vicuna: unknown option 'max_val_sets' \(did you mean 'max_val_set'\?\)"
    ):
        parse_datasets([{"vicuna": {"max_val_sets": 3}}], FIX)
    with pytest.raises(OasstError, match=r"vicuna: option 'top_k' does not apply to vicuna.*oasst_export"):
        parse_datasets([{"vicuna": {"top_k": 1}}], FIX)
    with pytest.raises(OasstError, match=r"unknown option 'size' \(use max_train_set"):
        parse_datasets([{"dolly15k": {"size": 100}}], FIX)
    with pytest.raises(OasstError, match=r"dolly15k: fraction"):
        parse_datasets([{"dolly15k": {"fraction": 1.5}}], FIX)
    with pytest.raises(OasstError, match=r"datasets\[0\]: each entry is a dataset name"):
        parse_datasets([{"a": 1, "b": 2}], FIX)


def test_entries_forms_paths_and_duplicate_keys(tmp_path):
    specs = parse_datasets(
        [
            "dolly15k",
            {"vicuna": None},
            {"vicuna": {"data_files": "x.json"}},
            {"oasst_export": {"lang": "en,de"}},
        ],
        tmp_path,
    )
    assert [sp.key for sp in specs] == ["dolly15k", "vicuna", "vicuna#2", "oasst_export"]
    assert specs[2].data_files == [str(tmp_path / "x.json")]
    assert specs[3].lang == ["en", "de"]
    assert specs[0].val_split == 0.05


def test_alpaca_without_input_and_with_llama_factory_system_and_history(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "output": "Teal."},  # no input field at all
        {
            "instruction": "And one more?",
            "input": "",
            "output": "Ochre.",
            "system": "Answer in one word.",
            "history": [["Name a colour.", "Teal."]],
        },
        {"instruction": "Bad history.", "output": "x", "history": ["not a pair"]},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    part = load("alpaca", data_files=str(path))
    assert part.train == [
        [u("Name a colour."), a("Teal.")],
        [s("Answer in one word."), u("Name a colour."), a("Teal."), u("And one more?"), a("Ochre.")],
    ]
    assert dict(part.dropped["train"]) == {"malformed_row": 1}


def test_a_utf8_bom_is_not_part_of_the_first_field(tmp_path):
    """Excel and some editors start a CSV or JSON file with a byte-order mark."""
    rows = [{"INSTRUCTION": "What is 2 + 2?", "RESPONSE": "4.", "SOURCE": "mine"}]
    csv_path = tmp_path / "gsm.csv"
    with csv_path.open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=["INSTRUCTION", "RESPONSE", "SOURCE"])
        w.writeheader()
        w.writerows(rows)
    jsonl = tmp_path / "gsm.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8-sig")
    array = tmp_path / "gsm.json"
    array.write_text(json.dumps(rows), encoding="utf-8-sig")
    for path in (csv_path, jsonl, array):
        part = load("grade_school_math_instructions", data_files=str(path))
        assert part.train == [[u("What is 2 + 2?"), a("4.")]], path.name


def test_a_pretty_printed_json_object_is_named_as_such(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": [{"instruction": "q", "output": "a"}]}, indent=2), encoding="utf-8")
    with pytest.raises(OasstError, match=r"obj\.json: one JSON object .*give a JSON list of rows"):
        load("alpaca", data_files=str(path))
    lines = tmp_path / "rows.jsonl"  # a bad first line of a real JSON-lines file is still skipped and counted
    lines.write_text('{not json\n{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    assert dict(load("alpaca", data_files=str(lines)).dropped["train"]) == {"malformed_row": 1}


def test_a_big_file_is_not_read_whole_to_tell_a_json_object_from_bad_lines(tmp_path, monkeypatch):
    import oasst_peft.data.readers as readers

    monkeypatch.setattr(readers, "WHOLE_FILE_CHECK_BYTES", 10)  # every file below counts as big
    monkeypatch.setattr(readers.json, "loads", _no_whole_file(readers.json.loads))
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": [{"instruction": "q", "output": "a"}]}, indent=2), encoding="utf-8")
    with pytest.raises(OasstError, match=r"obj\.json: one JSON object .*give a JSON list of rows"):
        load("alpaca", data_files=str(path))
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{not json\n{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    assert dict(load("alpaca", data_files=str(lines)).dropped["train"]) == {"malformed_row": 1}


def _no_whole_file(loads):
    def guarded(text, *a, **k):
        assert "\n" not in (text.decode() if isinstance(text, bytes) else text).strip(), "read the file whole"
        return loads(text, *a, **k)

    return guarded
