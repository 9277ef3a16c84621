"""Reading an Open-Assistant export into message trees (``Node``, ``Tree``), from either layout.

Two layouts are read: the export (``.jsonl``/``.jsonl.gz``, one message tree per line with nested
``replies``) and the hub's flat oasst1/oasst2 table (one message per row with ``parent_id``,
``message_tree_id`` and ``tree_state``; jsonl or parquet, any row order). Both give the same trees:
children are ordered by ``message_id`` and trees by ``message_tree_id``; a row that is not a valid
message is reported with its location, a flat tree without exactly one root is counted as
``broken_tree`` and a message its root does not reach as ``orphan_message``. Which trees and threads
become conversations is decided by ``oasst_export``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from oasst_peft.data.readers import Problems
from oasst_peft.errors import OasstError

ROLE_MAP = {"prompter": "user", "assistant": "assistant"}

# Drop reasons counted while reading (the filters' tree_* and thread_* reasons are oasst_export's).
BROKEN_TREE = "broken_tree"
ORPHAN = "orphan_message"


class _Bad(Exception):
    """A message that is not a valid export node (reported with the row's location)."""


@dataclass(eq=False)
class Node:
    """One export message, validated, with its replies sorted by message_id."""

    id: str
    role: str
    text: str
    lang: str | None
    review_result: bool | None
    deleted: bool
    synthetic: bool
    rank: int | None
    children: list[Node] = field(default_factory=list)
    message: dict | None = None

    def as_message(self) -> dict:
        if self.message is None:
            self.message = {"role": ROLE_MAP[self.role], "content": self.text}
        return self.message


@dataclass(eq=False)
class Tree:
    """A message tree: its id, state and root prompt."""

    id: str
    state: str | None
    root: Node
    where: str = ""


def _opt_bool(obj: dict, name: str) -> bool | None:
    v = obj.get(name)
    if v is None or isinstance(v, bool):
        return v
    raise _Bad(f"'{name}' must be true, false or null, got {v!r:.40}")


def _rank(obj: dict) -> int | None:
    v = obj.get("rank")
    if v is None or isinstance(v, bool):
        if isinstance(v, bool):
            raise _Bad(f"'rank' must be an integer or null, got {v!r}")
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            return int(v)
    raise _Bad(f"'rank' must be an integer or null, got {v!r:.40}")


def node_from(obj) -> Node:
    """Validate one message object (its ``replies`` are not read here)."""
    if not isinstance(obj, dict):
        raise _Bad(f"a message must be a JSON object, got {type(obj).__name__}")
    mid = obj.get("message_id")
    if not isinstance(mid, str) or not mid:
        raise _Bad("message without a 'message_id' string")
    text = obj.get("text")
    if not isinstance(text, str):
        raise _Bad(f"message {mid}: 'text' must be a string")
    role = obj.get("role")
    if role not in ROLE_MAP:
        raise _Bad(f"message {mid}: role {role!r:.40} (expected prompter or assistant)")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise _Bad(f"message {mid}: 'lang' must be a string")
    try:
        return Node(
            id=mid,
            role=role,
            text=text,
            lang=lang,
            review_result=_opt_bool(obj, "review_result"),
            deleted=bool(_opt_bool(obj, "deleted")),
            synthetic=bool(_opt_bool(obj, "synthetic")),
            rank=_rank(obj),
        )
    except _Bad as e:
        raise _Bad(f"message {mid}: {e}") from None


def tree_from(obj: dict) -> Tree:
    """A nested export tree (``prompt`` with recursive ``replies``), read without recursion."""
    tree_id = obj.get("message_tree_id")
    if not isinstance(tree_id, str):
        raise _Bad("tree without a 'message_tree_id' string")
    state = obj.get("tree_state")
    if state is not None and not isinstance(state, str):
        raise _Bad(f"tree {tree_id}: 'tree_state' must be a string")
    root = node_from(obj.get("prompt"))
    seen = {id(obj.get("prompt"))}
    stack = [(obj["prompt"], root)]
    while stack:
        raw, node = stack.pop()
        replies = raw.get("replies")
        if replies is None:
            continue
        if not isinstance(replies, list):
            raise _Bad(f"message {node.id}: 'replies' must be a list")
        for child_raw in replies:
            if id(child_raw) in seen:
                raise _Bad(f"message {node.id}: a reply appears twice in the tree")
            seen.add(id(child_raw))
            child = node_from(child_raw)
            node.children.append(child)
            stack.append((child_raw, child))
        node.children.sort(key=lambda n: n.id)
    return Tree(id=tree_id, state=state, root=root)


@dataclass
class _Flat:
    node: Node
    parent_id: str | None
    tree_id: str
    state: str | None
    where: str


def _flat_from(obj: dict) -> _Flat:
    node = node_from(obj)
    parent = obj.get("parent_id")
    if parent is not None and not isinstance(parent, str):
        raise _Bad(f"message {node.id}: 'parent_id' must be a string or null")
    tree_id = obj.get("message_tree_id")
    if not isinstance(tree_id, str):
        raise _Bad(f"message {node.id}: no 'message_tree_id' (flat layout rows need it)")
    state = obj.get("tree_state")
    if state is not None and not isinstance(state, str):
        raise _Bad(f"message {node.id}: 'tree_state' must be a string")
    return _Flat(node, parent, tree_id, state, "")


def assemble_flat(rows: list[_Flat], problems: Problems) -> list[Tree]:
    """Trees from flat message rows in any order; orphans and rootless trees are counted, not guessed."""
    by_tree: dict[str, list[_Flat]] = {}
    seen_ids: set[str] = set()
    for r in rows:
        if r.node.id in seen_ids:
            problems.bad(r.where, f"duplicate message_id {r.node.id}")
            continue
        seen_ids.add(r.node.id)
        by_tree.setdefault(r.tree_id, []).append(r)
    trees = []
    for tree_id, members in by_tree.items():
        roots = [m for m in members if m.parent_id is None]
        if len(roots) != 1:
            where = min(m.where for m in members)
            what = "no root message (parent_id null)" if not roots else f"{len(roots)} root messages"
            problems.bad(where, f"message tree {tree_id} has {what}", reason=BROKEN_TREE)
            continue
        index = {m.node.id: m.node for m in members}
        reached = 1
        for m in members:
            if m.parent_id is not None and m.parent_id in index:
                index[m.parent_id].children.append(m.node)
        for m in members:
            m.node.children.sort(key=lambda n: n.id)
        # count messages not reachable from the root (missing parent, or a parent cycle)
        stack = [roots[0].node]
        while stack:
            n = stack.pop()
            reached += len(n.children)
            stack.extend(n.children)
        if reached < len(members):
            problems.dropped[ORPHAN] += len(members) - reached
        trees.append(Tree(id=tree_id, state=roots[0].state, root=roots[0].node, where=roots[0].where))
    return trees


def _wrong_layout(where: str) -> OasstError:
    return OasstError(
        f"{where}: not an Open-Assistant export: expected message trees (message_tree_id, prompt) "
        "or flat messages (message_id, parent_id, message_tree_id); check input_file_path"
    )


def read_trees(rows: Iterable[tuple[str, object]], problems: Problems) -> list[Tree]:
    """Trees from export rows of either layout (the first row decides whether the file is an export)."""
    trees: list[Tree] = []
    flat: list[_Flat] = []
    first = True
    for where, obj in rows:
        is_tree = isinstance(obj, dict) and "prompt" in obj and "message_tree_id" in obj
        is_msg = isinstance(obj, dict) and "message_id" in obj and not is_tree
        if first and not (is_tree or is_msg):
            raise _wrong_layout(where)
        first = False
        try:
            if is_tree:
                t = tree_from(obj)
                t.where = where
                trees.append(t)
            elif is_msg:
                f = _flat_from(obj)
                f.where = where
                flat.append(f)
            else:
                raise _Bad("neither a message tree nor a message")
        except _Bad as e:
            problems.bad(where, str(e))
    if flat:
        trees.extend(assemble_flat(flat, problems))
    seen: set[str] = set()
    unique = []
    for t in sorted(trees, key=lambda t: (t.id, t.where)):
        if t.id in seen:
            problems.bad(t.where, f"duplicate message tree {t.id}")
            continue
        seen.add(t.id)
        unique.append(t)
    return unique
