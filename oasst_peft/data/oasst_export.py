"""The Open-Assistant export (message trees) turned into SFT conversations, as the OA trainer did.

Two layouts are read: the export (``.jsonl``/``.jsonl.gz``, one message tree per line with nested
``replies``) and the hub's flat oasst1/oasst2 table (one message per row with ``parent_id``,
``message_tree_id`` and ``tree_state``; jsonl or parquet, any row order). Both give the same
conversations: children are ordered by ``message_id`` and trees by ``message_tree_id``.

Semantics (``load_oasst_export`` of the Open-Assistant trainer, minus its order dependence):

* a tree is kept when its state is ``ready_for_export``, its root prompt passed review
  (``review_result``) and the root prompt's ``lang`` is in ``lang`` (default ``en``);
* kept trees are split into train and validation **by tree** (``val_split``, seeded), so no tree
  has threads in both;
* every root-to-leaf path ending in an assistant message is one conversation; a path ending in a
  prompter leaf yields its assistant parent's path, once per parent however many such leaves it has;
* a path with a deleted or synthetic message, or turns that do not alternate, is dropped; with
  ``top_k`` an assistant message ranked ``>= top_k`` (or unranked among several siblings) drops it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft.data.readers import Problems, expand_files, iter_file_rows, iter_hub_rows
from oasst_peft.data.registry import DatasetInfo, register_info
from oasst_peft.errors import OasstError

DEFAULT_HUB_ID = "OpenAssistant/oasst1"
READY = "ready_for_export"
ROLE_MAP = {"prompter": "user", "assistant": "assistant"}

# Drop reasons: tree_* count trees, thread_* count root-to-leaf paths.
TREE_NOT_READY = "tree_not_ready_for_export"
TREE_FAILED_REVIEW = "tree_failed_review"
TREE_LANG = "tree_lang_not_selected"
TREE_ROOT_NOT_PROMPTER = "tree_root_not_prompter"
TREE_NO_REPLY = "tree_without_reply"
BROKEN_TREE = "broken_tree"
ORPHAN = "orphan_message"
THREAD_DELETED = "thread_deleted"
THREAD_SYNTHETIC = "thread_synthetic"
THREAD_TOP_K = "thread_outside_top_k"
THREAD_NOT_ALTERNATING = "thread_not_alternating"


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


def _step_failure(child: Node, parent: Node, top_k: int | None) -> str | None:
    if child.role == parent.role:
        return THREAD_NOT_ALTERNATING
    if child.deleted:
        return THREAD_DELETED
    if child.synthetic:
        return THREAD_SYNTHETIC
    if top_k is not None and child.role == "assistant":
        if child.rank is None and len(parent.children) > 1:
            return THREAD_TOP_K
        if child.rank is not None and child.rank >= top_k:
            return THREAD_TOP_K
    return None


def tree_threads(root: Node, top_k: int | None, dropped: Counter) -> list[list[dict]]:
    """The tree's conversations (see the module docstring); rejected paths are counted in ``dropped``."""
    out: list[list[dict]] = []
    emitted: set[int] = set()
    first = THREAD_DELETED if root.deleted else THREAD_SYNTHETIC if root.synthetic else None
    if not root.children:
        dropped[TREE_NO_REPLY] += 1
        return out
    stack: list[tuple[Node, tuple[Node, ...], str | None]] = [(root, (root,), first)]
    while stack:
        node, path, failure = stack.pop()
        if node.children:
            for child in reversed(node.children):
                stack.append((child, (*path, child), failure or _step_failure(child, node, top_k)))
            continue
        if failure:
            dropped[failure] += 1
            continue
        if node.role == "assistant":
            out.append([n.as_message() for n in path])
        else:  # a trailing prompter leaf: its assistant parent's path, once per parent
            parent = path[-2]
            if id(parent) not in emitted:
                emitted.add(id(parent))
                out.append([n.as_message() for n in path[:-1]])
    return out


@dataclass
class TreeFilter:
    """The tree-level filter and what it removed (for stats and for 'which filter emptied it')."""

    lang: tuple[str, ...]
    states: Counter = field(default_factory=Counter)
    langs: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    read: int = 0

    def keep(self, tree: Tree) -> bool:
        self.read += 1
        self.states[tree.state] += 1
        if tree.root.role != "prompter":
            self.dropped[TREE_ROOT_NOT_PROMPTER] += 1
            return False
        if tree.state != READY:
            self.dropped[TREE_NOT_READY] += 1
            return False
        if not tree.root.review_result:
            self.dropped[TREE_FAILED_REVIEW] += 1
            return False
        self.langs[tree.root.lang] += 1
        if tree.root.lang not in self.lang:
            self.dropped[TREE_LANG] += 1
            return False
        return True

    def emptied(self, key: str) -> OasstError:
        """One line naming the filter (applied in order: root, tree_state, review, lang) that left no tree."""
        if self.read == 0:
            return OasstError(f"datasets: {key}: the export holds no usable message tree")
        left = self.read - self.dropped[TREE_ROOT_NOT_PROMPTER]
        if left == 0:
            return OasstError(f"datasets: {key}: none of {self.read} trees starts with a prompter message")
        left -= self.dropped[TREE_NOT_READY]
        if left == 0:
            seen = ", ".join(f"{s}: {n}" for s, n in self.states.most_common(6))
            return OasstError(
                f"datasets: {key}: the tree_state filter removed all {self.read} trees: none is "
                f"'{READY}' (states seen: {seen})"
            )
        left -= self.dropped[TREE_FAILED_REVIEW]
        if left == 0:
            return OasstError(
                f"datasets: {key}: the review filter removed every ready tree: no root prompt has "
                "review_result true"
            )
        seen = ", ".join(f"{lang}: {n}" for lang, n in self.langs.most_common(10))
        return OasstError(
            f"datasets: {key}: the lang filter removed every reviewed ready tree: no prompt is in "
            f"lang {','.join(self.lang)} (prompt languages seen: {seen}); set lang"
        )


def export_rows(spec, problems: Problems) -> Iterator[tuple[str, object]]:
    """Raw rows of the export: the local files if given, else the hub's flat table."""
    files = spec.files()
    if files:
        for path in expand_files(spec.key, spec.file_key(), files):
            yield from iter_file_rows(Path(path), problems)
        return
    hub_id = spec.hf_dataset_name or DEFAULT_HUB_ID
    # OA merged the hub's train and validation and re-split by tree with its own seed; so does this.
    yield from iter_hub_rows(spec.key, spec.file_key(), hub_id, spec.hf_config, "train+validation")


def threads_by_split(
    trees: list[Tree], spec, split_trees, dropped: dict[str, Counter]
) -> tuple[list[list[dict]], list[list[dict]], TreeFilter]:
    """Filter trees, split them with ``split_trees(kept) -> (train, val)``, and extract their threads."""
    filt = TreeFilter(lang=tuple(spec.lang or ["en"]))
    kept = [t for t in trees if filt.keep(t)]
    dropped["train"].update(filt.dropped)
    if not kept:
        raise filt.emptied(spec.key)
    train_trees, val_trees = split_trees(kept)
    train = [c for t in train_trees for c in tree_threads(t.root, spec.top_k, dropped["train"])]
    val = [c for t in val_trees for c in tree_threads(t.root, spec.top_k, dropped["validation"])]
    if not train and not val:
        reasons = (dropped["train"] + dropped["validation"]).most_common()
        why = ", ".join(f"{r}: {n}" for r, n in reasons if r.startswith("thread") or r == TREE_NO_REPLY)
        raise OasstError(
            f"datasets: {spec.key}: {len(kept)} trees passed the filters but gave no conversation ({why})"
        )
    return train, val, filt


def split_export(spec, problems: Problems, split_trees, dropped: dict[str, Counter]):
    """The registry's ``split`` for oasst_export: read the trees, split whole trees, return their threads."""
    trees = read_trees(export_rows(spec, problems), problems)
    train, val, _ = threads_by_split(trees, spec, split_trees, dropped)
    return train, val


INFO = register_info(
    DatasetInfo(
        name="oasst_export",
        split=split_export,
        hub_id=DEFAULT_HUB_ID,
        hub_split="train+validation",
        options=("lang", "top_k"),
        description="Open-Assistant message trees (export .jsonl[.gz] or the hub's flat oasst1/oasst2)",
    )
)
