"""The learning example's data: held-out questions in new wordings really are new; the demo data is unchanged."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import skill_data  # noqa: E402


def _shape(question: str) -> str:
    """A question with its numbers and units blanked: the wording alone."""
    units = {u for c in skill_data.CONVERSIONS for u in c[:2]}
    text = re.sub(r"\d+", "#", question)
    return re.sub(r"\b(" + "|".join(sorted(units, key=len, reverse=True)) + r")\b", "U", text)


def test_a_third_of_heldout_questions_use_wordings_training_never_uses():
    rng = random.Random(1)
    trees = [skill_data.make_tree(rng) for _ in range(600)]
    trained = {_shape(t["prompt"]["text"]) for t in trees}
    rows = skill_data.heldout(
        random.Random(1001), 48, {t["prompt"]["text"] for t in trees}, new_wordings=1 / 3
    )
    novel = [r for r in rows if r["new_wording"]]
    assert len(novel) >= 16 and len(rows) == 48
    for r in rows:
        shape = _shape(r["messages"][0]["content"])
        assert (shape not in trained) == r["new_wording"], r["messages"][0]["content"]


def test_the_bundled_demo_data_is_still_what_skill_data_writes():
    rng = random.Random(1)
    made = [skill_data.make_tree(rng) for _ in range(160)]
    bundled = [json.loads(line) for line in (ROOT / "recipes/data/demo-oasst.jsonl").read_text().splitlines()]
    assert made == bundled


def _row(hits: list[bool]) -> dict:
    return {"exact_match": sum(hits) / len(hits), "format_adherence": 1.0, "hits": hits}


def test_learning_benchmark_verdict_and_paired_gap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning

    n = 20
    lora = [i < 8 for i in range(n)]  # 40 %
    close = [i < 7 for i in range(n)]  # 35 %: 5 points below
    far = [i < 5 for i in range(n)]  # 25 %
    mean, se = learning.paired_gap(_row(far), _row(lora))
    assert mean == -3 / n and 0 < se < 1
    for qlora, passes in ((close, True), (far, False)):
        result = {
            "rows": {
                "base, oasst prompt": _row([False] * n),
                "base, own template": _row([False] * n),
                "lora (adapter)": _row(lora),
                "qlora (adapter)": _row(qlora),
            },
            "heldout": n,
            "merged_identical": {"lora": n, "qlora": n},
            "seconds": {"total": 60.0},
        }
        ok, line = learning.check(result)
        assert ok is passes, line
        assert "paired standard error" in line and ("QLoRA vs LoRA" in line) is not passes
