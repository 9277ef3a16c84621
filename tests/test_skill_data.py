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
