"""Generate a small skill set in the Open-Assistant export layout: arithmetic and unit conversions.

Questions come in varied phrasings; every answer has one fixed format (``The answer is N.``), so a
model's learning of both the skill and the oasst chat format can be measured exactly. The demo recipe
trains on ``recipes/data/demo-oasst.jsonl``, written by:

    python examples/skill_data.py --out recipes/data/demo-oasst.jsonl --trees 160 --seed 1

Run with ``--heldout FILE`` to also write unseen questions (JSONL of messages + expected answer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import uuid
from pathlib import Path

ADD = [
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "How much is {a} + {b}?",
    "Please work out the sum of {a} and {b}.",
]
SUB = [
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Compute {a} - {b}.",
    "How much is {a} take away {b}?",
]
MUL = [
    "What is {a} times {b}?",
    "Multiply {a} by {b}.",
    "Compute {a} * {b}.",
    "What do you get when you multiply {a} and {b}?",
]
CONVERSIONS = [
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("litres", "millilitres", 1000),
]
CONVERT = [
    "How many {to} are in {n} {frm}?",
    "Convert {n} {frm} to {to}.",
    "{n} {frm} is how many {to}?",
    "Please express {n} {frm} in {to}.",
]
FOLLOW_UP = ["And if you double that?", "Now double the result.", "What is twice that number?"]
# Wordings that never occur in training: held-out questions asked these ways test the operation, not
# the memorised sentence.
NEW_WORDINGS = {
    "add": ["If I have {a} and get {b} more, how many is that?", "Find the total of {a} and {b}."],
    "sub": ["Take {b} away from {a}: what is left?", "Find the difference between {a} and {b}."],
    "mul": ["What is the product of {a} and {b}?", "Give me {a} multiplied by {b}."],
    "convert": ["Turn {n} {frm} into {to}.", "What is {n} {frm} when written in {to}?"],
}


def answer(n: int) -> str:
    """The one answer format the model must learn."""
    return f"The answer is {n}."


def make_question(rng: random.Random, new_wording: bool = False) -> tuple[str, int]:
    """One question and its integer answer; ``new_wording``: phrased as training never phrases it."""
    kind = rng.choice(["add", "sub", "mul", "convert"])
    forms = (
        NEW_WORDINGS[kind] if new_wording else {"add": ADD, "sub": SUB, "mul": MUL, "convert": CONVERT}[kind]
    )
    if kind == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return rng.choice(forms).format(a=a, b=b), a + b
    if kind == "sub":
        a = rng.randint(100, 999)
        b = rng.randint(10, a)
        return rng.choice(forms).format(a=a, b=b), a - b
    if kind == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        return rng.choice(forms).format(a=a, b=b), a * b
    frm, to, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 50)
    return rng.choice(forms).format(n=n, frm=frm, to=to), n * factor


def _node(rng: random.Random, text: str, role: str, parent: str | None, rank: int | None = None) -> dict:
    return {
        "message_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "parent_id": parent,
        "text": text,
        "role": role,
        "lang": "en",
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "synthetic": False,
        "rank": rank,
        "replies": [],
    }


def make_tree(rng: random.Random) -> dict:
    """A message tree: a question, its answer, and sometimes a follow-up turn."""
    question, value = make_question(rng)
    root = _node(rng, question, "prompter", None)
    reply = _node(rng, answer(value), "assistant", root["message_id"], rank=0)
    root["replies"].append(reply)
    if rng.random() < 0.3:
        follow = _node(rng, rng.choice(FOLLOW_UP), "prompter", reply["message_id"])
        follow["replies"].append(_node(rng, answer(2 * value), "assistant", follow["message_id"], rank=0))
        reply["replies"].append(follow)
    return {"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root}


def heldout(rng: random.Random, n: int, seen: set[str], new_wordings: float = 0.0) -> list[dict]:
    """``n`` questions not in ``seen``, each with its expected reply; the first ``new_wordings`` share of them
    (rounded up) in wordings training never uses (``"new_wording": true`` on those rows)."""
    out = []
    fresh = math.ceil(n * new_wordings)
    while len(out) < n:
        novel = len(out) < fresh
        q, v = make_question(rng, new_wording=novel)
        if q in seen:
            continue
        seen.add(q)
        out.append(
            {"messages": [{"role": "user", "content": q}], "expected": answer(v), "new_wording": novel}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trees", type=int, default=160)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--heldout", type=Path)
    ap.add_argument("--heldout-n", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    trees = [make_tree(rng) for _ in range(args.trees)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(t) + "\n" for t in trees), encoding="utf-8")
    if args.heldout:
        seen = {t["prompt"]["text"] for t in trees}
        rows = heldout(random.Random(args.seed + 1000), args.heldout_n, seen)
        args.heldout.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
