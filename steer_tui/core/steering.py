"""How each steering operation changes a tree, as plain functions over a ``SteerTree``:
where a rollback cuts (splitting a node), the human node a steer adds, what undo and redo
discard and restore, the model node a generation writes into, and the position recorded
in the file for the next session.

No engine calls, no locking, no saving: ``Session`` evaluates tokens, holds the position and
saves; these functions only edit the tree and say where the position goes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from steer_tui.core.engine_base import Step
from steer_tui.core.session_errors import SessionError
from steer_tui.core.token_view import TokenBytes, decoder_at, snap_to_character
from steer_tui.core.tree import Node, SteerTree

__all__ = [
    "add_human",
    "append_step",
    "can_extend",
    "generation_rng",
    "new_model_node",
    "redo_node",
    "restored_position",
    "rollback_point",
    "store_position",
    "stored_logprob",
    "stored_top",
    "undo_node",
]

#: ``Node.end`` values after which a generation may extend the node instead of branching.
EXTENDABLE_ENDS = ("paused", "length")
#: The tree file's extra top-level key that holds the session's position.
POSITION_KEY = "session"


def stored_logprob(logprob: float) -> float:
    """Log-probs are stored to 1e-6 (float32 logits carry no more; files stay compact)."""
    return round(float(logprob), 6)


def stored_top(top: Sequence[tuple[int, float]]) -> list[list[float]]:
    """A step's top-k alternatives as the tree stores them: ``[id, rounded logprob]`` pairs."""
    return [[int(t), stored_logprob(lp)] for t, lp in top]


def rollback_point(
    tree: SteerTree, path: list[Node], n: int, token_bytes: TokenBytes
) -> tuple[str | None, str | None] | None:
    """``(end, cut)`` after keeping the first ``n`` response tokens of ``path``, moved back to
    a whole character; None when ``n`` keeps the whole path. A node that the cut falls
    inside is split (``tree.split``), its text pieces decoded in context. SessionError for
    an ``n`` outside ``0..len(path)``."""
    total = sum(len(p.tokens) for p in path)
    if not 0 <= n <= total:
        raise SessionError(f"cannot roll back to {n} tokens: the response has {total}")
    if n == total:
        return None
    n = snap_to_character(path, n, token_bytes)
    start = 0
    prev: str | None = None
    for node in path:
        if start + len(node.tokens) <= n:
            prev, start = node.id, start + len(node.tokens)
            continue
        at = n - start
        if at == 0:
            return prev, node.id
        dec = decoder_at(tree, prev, token_bytes)
        head = "".join(dec.feed(token_bytes(t)) for t in node.tokens[:at])
        tail = "".join(dec.feed(token_bytes(t)) for t in node.tokens[at:])
        return node.id, tree.split(node.id, at, head, tail).id
    raise AssertionError("unreachable: n < total")


def store_position(tree: SteerTree, end: str | None, cut: str | None) -> None:
    """Record the session's position in the tree (extra top-level key ``"session"``)."""
    tree.extra[POSITION_KEY] = {"end": end, "cut": cut}


def restored_position(tree: SteerTree) -> tuple[str | None, str | None]:
    """``(end, cut)`` where a reopened task continues: the recorded position if it is still
    valid, else the most recently created live leaf outside replaced branches."""
    saved = tree.extra.get(POSITION_KEY)
    if isinstance(saved, dict):
        end, cut = saved.get("end"), saved.get("cut")
        if (end is None or end in tree) and (cut is None or (cut in tree and tree.node(cut).parent == end)):
            return end, cut
    return tree.latest_live_leaf(), None


def add_human(
    tree: SteerTree,
    *,
    parent: str | None,
    cut: str | None,
    kind: str,
    tokens: list[int],
    text: str,
    steps: list[Step],
    annotator: str | None,
) -> Node:
    """Add the human node of a ``correction`` or ``pick`` after ``parent``. It replaces
    ``cut`` when that is a model node (a steer; a correction without one is an ``append``).
    Typing over your own earlier text supersedes it: the cut human branch is discarded
    (kept in the file, never trained on) and undo brings it back."""
    cut_node = tree.node(cut) if cut is not None else None
    replaces = cut_node.id if cut_node is not None and cut_node.is_model else None
    supersedes = (
        cut_node.id if cut_node is not None and cut_node.is_human and cut_node.id not in tree.discarded else None
    )
    if replaces is None and kind == "correction":
        kind = "append"
    node = tree.add(
        Node(
            id=tree.new_id(),
            parent=parent,
            author="human",
            kind=kind,
            tokens=list(tokens),
            text=text,
            logprobs=[stored_logprob(s.logprob) for s in steps],
            top=[stored_top(s.top) for s in steps],
            replaces=replaces,
            annotator=annotator,
            extra={"supersedes": supersedes} if supersedes else {},
        )
    )
    if supersedes:
        tree.discarded.append(supersedes)
    return node


def undo_node(tree: SteerTree, end: str | None) -> tuple[Node, str | None] | None:
    """Discard the most recent live human node on the path to ``end``; return it and the new
    end: the original end of the model branch it replaced (or of the human text it
    superseded, which is restored), else its parent. None when there is nothing to undo."""
    gone = set(tree.discarded)
    human = next((n for n in reversed(tree.path(end)) if n.is_human and n.id not in gone), None)
    if human is None:
        return None
    superseded = human.extra.get("supersedes")
    tree.set_discarded(human.id, True)
    if superseded in tree.discarded:  # bring back the text it had replaced
        tree.set_discarded(superseded, False)
        return human, tree.split_chain(superseded)[-1].id
    if human.replaces is not None:
        return human, tree.split_chain(human.replaces)[-1].id
    return human, human.parent


def redo_node(tree: SteerTree, node_id: str) -> Node:
    """Restore an undone human node (and discard again the text it superseded)."""
    tree.set_discarded(node_id, False)
    node = tree.node(node_id)
    superseded = node.extra.get("supersedes")
    if superseded:
        tree.set_discarded(superseded, True)
    return node


def can_extend(tree: SteerTree, node: Node | None, adapter: dict | None) -> bool:
    """May a generation continue ``node`` itself (a live model node that paused or hit
    ``max_tokens``, has nothing after it and was written with the same adapter)?"""
    return (
        node is not None
        and node.is_model
        and node.end in EXTENDABLE_ENDS
        and not tree.children(node.id)
        and node.adapter == adapter
        and not tree.is_discarded(node.id)
    )


def generation_rng(seed: int, context: Sequence[int], tree: SteerTree, parent: str | None) -> np.random.Generator:
    """The generator for one generation: seeded by the task seed, the context and the number
    of model branches already at ``parent``, so a task replays identically and a resample
    draws a different branch."""
    n_model_children = sum(1 for c in tree.children(parent) if c.is_model)
    return np.random.default_rng([seed, zlib.crc32(np.asarray(context, dtype=np.int64).tobytes()), n_model_children])


def new_model_node(tree: SteerTree, parent: str | None, adapter: dict | None) -> Node:
    """An empty model node after ``parent`` that a generation fills (``end`` paused until it stops)."""
    return tree.add(
        Node(
            id=tree.new_id(),
            parent=parent,
            author="model",
            kind="generated",
            tokens=[],
            text="",
            logprobs=[],
            top=[],
            end="paused",
            adapter=dict(adapter) if adapter else None,
        )
    )


def append_step(node: Node, step: Step, piece: str) -> None:
    """Write one generated token (id, text piece, log-prob, top-k) at the end of ``node``."""
    assert node.logprobs is not None and node.top is not None
    node.tokens.append(int(step.id))
    node.text += piece
    node.logprobs.append(stored_logprob(step.logprob))
    node.top.append(stored_top(step.top))
    node.end = "paused"
