"""How many sequences are laid out for one forward pass: the packing plan. No model here.

The per-token log-probs themselves come from `train.logprobs.token_logprobs`, which
forwards the rows this module plans.

Tree packing
------------
Steer-tree training sequences share long prefixes (every steer's prefix+chosen and
prefix+rejected, every SFT path of one task start with the same prompt and response).
`packing="tree"` inserts all sequences into a prefix trie over token ids, so an identical
prefix is one set of trie nodes, laid out in depth-first order as one packed row with

* ``depth`` (the ``position_ids``) = depth of the node (0-based from the first token of the
  sequence), and
* ``end``: one past the last node of each node's subtree. In DFS preorder node ``j`` is an
  ancestor-or-self of node ``i`` exactly when ``j <= i < end[j]``, so the attention mask
  (a node sees its ancestors and itself, never a sibling branch) is built from this one
  vector without any loop over token pairs. DFS order keeps ancestors before descendants,
  so the mask is a subset of the causal mask.

The log-prob of trie node ``k`` (token ``t_k``) is read from the logits at its parent's
position, once per node however many sequences share it; each sequence then gathers its
tokens' node log-probs with one index vector (``PackPlan.seq_index``).

Rows: the unit of packing is a trie (sequences with the same first token). Tries are
placed into rows of at most ``token_budget`` tokens first-fit-decreasing. A trie larger
than the budget is split by sequence, in lexicographic order so neighbours keep their
shared prefixes, into chunks of at most ``token_budget`` unique tokens; a chunk re-emits
the prefix it needs in its row (chunks that land in one row share it again: each row is
laid out as one trie forest). A single sequence longer than the budget gets a row of its
own (a sequence cannot be split across rows without a KV cache), so a row exceeds the
budget only then.

Sequences of length 1 have nothing to predict: they are not forwarded, so every packed row
holds at least one predicted token.

`packing="none"` lays each sequence out as its own right-padded row, rows batched while
batch x width stays within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from train.config import PACKINGS

__all__ = ["PackPlan", "PackedRow", "as_token_arrays", "pack_stats", "plan_packing"]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PackedRow:
    """One forward pass: trie nodes in DFS order.

    tokens, depth, end, parent: int64 [T]. ``parent`` is -1 for a root. ``end[j]`` is one
    past the last node of j's subtree. ``keep``: sorted positions whose logits are needed
    (nodes with at least one child). ``child``: the non-root nodes, ``child_src``: index
    into ``keep`` of each child's parent.
    """

    tokens: np.ndarray
    depth: np.ndarray
    end: np.ndarray
    parent: np.ndarray
    keep: np.ndarray
    child: np.ndarray
    child_src: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class PackPlan:
    """Everything about a batch of sequences that does not need the model.

    The concatenated per-row child log-probs form one flat vector; ``seq_index`` picks
    each sequence's predicted tokens from it in order, ``seq_counts`` splits it back.
    Build once with `plan_packing` and reuse for the policy and the reference pass.
    """

    packing: str
    rows: tuple[PackedRow, ...]
    seq_index: np.ndarray
    seq_counts: tuple[int, ...]
    # packing="none" only: per row, the sequence ids it holds (padded to the longest).
    linear_rows: tuple[tuple[int, ...], ...] = ()
    linear_width: tuple[int, ...] = ()

    @property
    def tokens_forwarded(self) -> int:
        if self.packing == "tree":
            return int(sum(len(r) for r in self.rows))
        return int(sum(len(r) * w for r, w in zip(self.linear_rows, self.linear_width)))

    @property
    def n_edges(self) -> int:
        """Length of the flat per-row child log-prob vector that ``seq_index`` indexes."""
        if self.packing == "tree":
            return int(sum(len(r.child_src) for r in self.rows))
        return int(sum(len(r) * (w - 1) for r, w in zip(self.linear_rows, self.linear_width)))

    @property
    def max_row(self) -> int:
        if self.packing == "tree":
            return max((len(r) for r in self.rows), default=0)
        return max(self.linear_width, default=0)


def as_token_arrays(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each sequence as an int64 array; TypeError/ValueError for anything but non-empty lists of
    non-negative token ids."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError("sequences must be a list of token-id lists")
    arrays = []
    for i, s in enumerate(sequences):
        a = np.asarray(s.tolist() if isinstance(s, torch.Tensor) else list(s), dtype=np.int64)
        if a.ndim != 1 or len(a) == 0:
            raise ValueError(f"sequences[{i}] must be a non-empty list of token ids")
        if (a < 0).any():
            raise ValueError(f"sequences[{i}] holds a negative token id")
        arrays.append(a)
    return arrays


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def _chunks(order: list[int], seqs: list[np.ndarray], budget: int) -> list[tuple[list[int], int]]:
    """Split sequences (sorted lexicographically) into tries, and tries larger than the
    budget into chunks of at most `budget` unique tokens. Returns (members, n_tokens)."""
    out: list[tuple[list[int], int]] = []
    members: list[int] = []
    size = 0
    prev = None
    for i in order:
        s = seqs[i]
        shared = _lcp(s, seqs[prev]) if prev is not None else 0
        new = len(s) - shared
        if members and (shared == 0 or size + new > budget):
            out.append((members, size))
            members, size, new = [], 0, len(s)
        members.append(i)
        size += new
        prev = i
    if members:
        out.append((members, size))
    return out


def _first_fit(items: list[tuple[list[int], int]], budget: int) -> list[list[list[int]]]:
    """First-fit decreasing: rows of items whose sizes sum to at most budget."""
    rows: list[list[list[int]]] = []
    room: list[int] = []
    for members, size in sorted(items, key=lambda it: -it[1]):
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(members)
                room[r] -= size
                break
        else:
            rows.append([members])
            room.append(budget - size)
    return rows


def _emit_row(members: list[int], seqs: list[np.ndarray], seq_nodes: dict[int, np.ndarray]) -> PackedRow:
    """Lay the sequences of one row (sorted lexicographically) out as a trie forest in DFS
    order; record each sequence's node indices in `seq_nodes`."""
    shared_with_prev = [0] + [_lcp(seqs[b], seqs[a]) for a, b in zip(members, members[1:])]
    total = sum(len(seqs[i]) - k for i, k in zip(members, shared_with_prev))
    tokens: list[np.ndarray] = []
    depth: list[np.ndarray] = []
    parent: list[np.ndarray] = []
    end = np.full(total, total, dtype=np.int64)
    prev_nodes = np.zeros(0, dtype=np.int64)
    cur = 0
    for i, shared in zip(members, shared_with_prev):
        s = seqs[i]
        # Nodes of the previous path deeper than the shared prefix end their subtree here.
        end[prev_nodes[shared:]] = cur
        n_new = len(s) - shared
        new_nodes = np.arange(cur, cur + n_new, dtype=np.int64)
        if n_new:
            tokens.append(s[shared:])
            depth.append(np.arange(shared, len(s), dtype=np.int64))
            first_parent = prev_nodes[shared - 1] if shared else -1
            parent.append(np.concatenate(([first_parent], new_nodes[:-1])))
        nodes = np.concatenate((prev_nodes[:shared], new_nodes))
        seq_nodes[i] = nodes
        prev_nodes = nodes
        cur += n_new
    tok = np.concatenate(tokens)
    par = np.concatenate(parent)
    child = np.flatnonzero(par >= 0)
    keep, child_src = np.unique(par[child], return_inverse=True)
    return PackedRow(tok, np.concatenate(depth), end, par, keep, child, child_src.reshape(-1))


def plan_packing(
    sequences: Sequence[Sequence[int]], *, packing: str = "tree", token_budget: int = 4096
) -> PackPlan:
    """Lay out `sequences` in rows of at most `token_budget` tokens (see module doc)."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    seqs = as_token_arrays(sequences)
    counts = tuple(len(s) - 1 for s in seqs)
    live = [i for i, s in enumerate(seqs) if len(s) > 1]
    if packing == "none":
        return _plan_linear(seqs, live, counts, token_budget)

    order = sorted(live, key=lambda i: seqs[i].tolist())
    rank = {i: r for r, i in enumerate(order)}
    rows_members = _first_fit(_chunks(order, seqs, token_budget), token_budget)
    rows: list[PackedRow] = []
    index_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(seqs)
    offset = 0
    for groups in rows_members:
        seq_nodes: dict[int, np.ndarray] = {}
        # One trie forest per row: chunks of one split trie that share a row share again.
        members = sorted((i for g in groups for i in g), key=rank.__getitem__)
        row = _emit_row(members, seqs, seq_nodes)
        # slot of each node among the row's children (its place in the row's log-prob vector)
        slot = np.full(len(row), -1, dtype=np.int64)
        slot[row.child] = np.arange(len(row.child)) + offset
        for i, nodes in seq_nodes.items():
            index_parts[i] = slot[nodes[1:]]
        offset += len(row.child)
        rows.append(row)
    seq_index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    return PackPlan("tree", tuple(rows), seq_index, counts)


def _plan_linear(seqs, live, counts, budget) -> PackPlan:
    """Each sequence its own row, right-padded; rows batched while batch*width <= budget."""
    by_len = sorted(live, key=lambda i: -len(seqs[i]))
    batches: list[list[int]] = []
    widths: list[int] = []
    for i in by_len:
        n = len(seqs[i])
        if batches and widths[-1] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)  # sorted by length: the width stays the first one's
        else:
            batches.append([i])
            widths.append(n)
    # Flat layout: batch b row r position p -> offset_b + r * (width_b - 1) + p
    index_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(seqs)
    offset = 0
    for batch, w in zip(batches, widths):
        for r, i in enumerate(batch):
            index_parts[i] = offset + r * (w - 1) + np.arange(len(seqs[i]) - 1)
        offset += len(batch) * (w - 1)
    seq_index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    return PackPlan(
        "none", (), seq_index, counts, tuple(tuple(b) for b in batches), tuple(widths)
    )


def pack_stats(sequences: Sequence[Sequence[int]], token_budget: int = 4096) -> dict:
    """Token counts of both layouts, for logs and the benchmark.

    tokens_tree: tokens forwarded tree-packed; tokens_linear: sum of sequence lengths;
    tokens_linear_padded: what the linearized path forwards with its padding; rows /
    rows_linear: forward passes; loss_tokens: predicted tokens over all sequences.
    """
    tree = plan_packing(sequences, packing="tree", token_budget=token_budget)
    lin = plan_packing(sequences, packing="none", token_budget=token_budget)
    return {
        "sequences": len(tree.seq_counts),
        "loss_tokens": int(sum(tree.seq_counts)),
        "tokens_tree": tree.tokens_forwarded,
        "tokens_linear": int(sum(c + 1 for c in tree.seq_counts if c > 0)),
        "tokens_linear_padded": lin.tokens_forwarded,
        "rows": len(tree.rows),
        "rows_linear": len(lin.linear_rows),
        "max_row": tree.max_row,
    }
