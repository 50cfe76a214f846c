"""Steer statistics of one tree: how many steers count, one row per steer (where the cut
fell, rejected vs chosen, how likely the model already found the correction). Pure
functions over a ``SteerTree``: the stats screen shows them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from steer_tui.core.sampling import rank_of
from steer_tui.core.tree import SteerTree


@dataclass
class SteerRow:
    node_id: str
    position: int  # response token index where the cut fell
    kind: str
    rejected: str
    chosen: str
    p_chosen: float | None  # model probability of the whole correction
    p_first: float | None  # of its first token
    rank_first: int | None  # rank of its first token in the top-k at the cut (1 = best); None: not in top-k
    discarded: bool


def rejected_text(tree: SteerTree, node_id: str) -> str:
    """The replaced node's text as the model wrote it (following later splits)."""
    return "".join(n.text for n in tree.split_chain(node_id))


def count_steers(tree: SteerTree) -> int:
    """Steers that count for training (not undone, nor under an undone node), in O(nodes)."""
    if not tree.discarded:
        return sum(1 for n in tree.nodes if n.is_steer)
    gone = set(tree.discarded)
    parent = {n.id: n.parent for n in tree.nodes}
    dead: dict[str | None, bool] = {None: False}

    def is_dead(nid: str | None) -> bool:
        chain = []
        while nid not in dead:
            if nid in gone:
                dead[nid] = True
                break
            chain.append(nid)
            nid = parent[nid]
        value = dead[nid]
        for c in chain:
            dead[c] = value
        return value

    return sum(1 for n in tree.nodes if n.is_steer and not is_dead(n.id))


def steer_rows(tree: SteerTree) -> list[SteerRow]:
    """One row per steer (undone ones included, flagged), in O(nodes): a 500-steer task's
    ``tree.steers()`` would build every prefix, which the table does not need."""
    parent = {n.id: n.parent for n in tree.nodes}
    length = {n.id: len(n.tokens) for n in tree.nodes}
    gone = set(tree.discarded)
    depth: dict[str | None, int] = {None: 0}  # response tokens before a node ends
    dead: dict[str | None, bool] = {None: False}

    def resolve(nid: str | None) -> None:
        chain = []
        while nid not in depth:
            chain.append(nid)
            nid = parent[nid]
        for c in reversed(chain):
            p = parent[c]
            depth[c] = depth[p] + length[c]
            dead[c] = dead[p] or c in gone

    rows = []
    for h in tree.nodes:
        if not h.is_steer:
            continue
        resolve(h.id)
        replaced = tree.node(h.replaces)  # type: ignore[arg-type]
        lps = h.logprobs
        tops = h.top[0] if h.top else (replaced.top[0] if replaced.top else None)
        rows.append(
            SteerRow(
                node_id=h.id,
                position=depth[h.parent],
                kind=h.kind,
                rejected=rejected_text(tree, replaced.id),
                chosen=h.text,
                p_chosen=math.exp(sum(lps)) if lps else None,
                p_first=math.exp(lps[0]) if lps else None,
                rank_first=rank_of(tops, h.tokens[0]) if tops and h.tokens else None,
                discarded=dead[h.id],
            )
        )
    return rows
