"""The Open-Assistant export (message trees) turned into SFT conversations, as the OA trainer did.

The trees are read by ``oasst_trees`` (the export's nested layout or the hub's flat oasst1/oasst2
table, identical trees either way); this module filters them, splits them and extracts their threads.

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

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft.data.oasst_trees import (  # noqa: F401  (re-exported: they were defined here)
    BROKEN_TREE,
    ORPHAN,
    ROLE_MAP,
    Node,
    Tree,
    assemble_flat,
    node_from,
    read_trees,
    tree_from,
)
from oasst_peft.data.readers import Problems, expand_files, iter_file_rows, iter_hub_rows
from oasst_peft.data.registry import DatasetInfo, register_info
from oasst_peft.errors import OasstError

DEFAULT_HUB_ID = "OpenAssistant/oasst1"
READY = "ready_for_export"

# Drop reasons: tree_* count trees, thread_* count root-to-leaf paths (reading's own are in oasst_trees).
TREE_NOT_READY = "tree_not_ready_for_export"
TREE_FAILED_REVIEW = "tree_failed_review"
TREE_LANG = "tree_lang_not_selected"
TREE_ROOT_NOT_PROMPTER = "tree_root_not_prompter"
TREE_NO_REPLY = "tree_without_reply"
THREAD_DELETED = "thread_deleted"
THREAD_SYNTHETIC = "thread_synthetic"
THREAD_TOP_K = "thread_outside_top_k"
THREAD_NOT_ALTERNATING = "thread_not_alternating"


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
