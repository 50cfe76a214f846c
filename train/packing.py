"""Per-token log-probs of many sequences under a causal LM, tree-packed by default.

The one entry point the trainer calls is `token_logprobs(model, sequences)`.

Tree packing
------------
Steer-tree training sequences share long prefixes (every steer's prefix+chosen and
prefix+rejected, every SFT path of one task start with the same prompt and response).
`packing="tree"` inserts all sequences into a prefix trie over token ids, so an identical
prefix is one set of trie nodes, and forwards the trie nodes in depth-first order as one
packed row with

* ``position_ids`` = depth of the node (0-based from the first token of the sequence), and
* an ancestor-only attention mask: a node sees its ancestors and itself, never a sibling
  branch. In DFS preorder node ``j`` is an ancestor-or-self of node ``i`` exactly when
  ``j <= i < end[j]`` (``end[j]`` = one past the last node of ``j``'s subtree), so the
  mask is built from one vector without any loop over token pairs. DFS order keeps
  ancestors before descendants, so the mask is a subset of the causal mask.

The log-prob of trie node ``k`` (token ``t_k``) is read from the logits at its parent's
position, once per node however many sequences share it; each sequence then gathers its
tokens' node log-probs with one index tensor.

Rows: the unit of packing is a trie (sequences with the same first token). Tries are
placed into rows of at most ``token_budget`` tokens first-fit-decreasing. A trie larger
than the budget is split by sequence, in lexicographic order so neighbours keep their
shared prefixes, into chunks of at most ``token_budget`` unique tokens; a chunk re-emits
the prefix it needs in its row (chunks that land in one row share it again: each row is
laid out as one trie forest). A single sequence longer than the budget gets a row of its
own (a sequence cannot be split across rows without a KV cache), so a row exceeds the
budget only then.

Sequences of length 1 have nothing to predict: they get an empty tensor and are not
forwarded, so every packed row holds at least one predicted token.

Masks: a float additive 4D mask ``[1, 1, T, T]`` (0 allowed, dtype-min blocked) for the
eager and sdpa backends; transformers (5.x, ``masking_utils._preprocess_mask_arguments``)
passes a 4D mask through untouched, without combining it with its own causal mask. For
``attn_implementation="flex_attention"`` a FlexAttention ``BlockMask`` with the same rule
is passed instead, which skips the fully masked blocks.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from train.chunked import HeadStates, LMHead, head_token_logprobs

__all__ = [
    "PackPlan",
    "TreePackingUnsupported",
    "check_tree_packing",
    "lm_head_of",
    "pack_stats",
    "plan_packing",
    "token_logprobs",
]

PACKINGS = ("tree", "none")
#: Attention backends that take an arbitrary 4D additive mask (or, for flex, a BlockMask).
_MASKABLE_BACKENDS = ("eager", "sdpa", "flex_attention")
#: Layer kinds that are not softmax attention over the whole row.
_NON_ATTENTION_LAYERS = ("linear_attention", "mamba", "conv", "recurrent", "rwkv", "ssm", "hybrid")
#: Model types whose layers are (partly) recurrent / state-space, so a token sees its
#: predecessors through a state that a mask cannot cut.
_RECURRENT_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "jamba", "bamba", "zamba", "zamba2", "falcon_h1", "falcon_mamba",
    "rwkv", "recurrent_gemma", "qwen3_next", "lfm2", "lfm2_moe", "granitemoehybrid",
    "nemotron_h", "minimax", "plamo2", "xlstm",
})


class TreePackingUnsupported(ValueError):
    """The model or its attention backend cannot run a tree-packed row exactly."""


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


def _as_arrays(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
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
    seqs = _as_arrays(sequences)
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


# --------------------------------------------------------------------------- model checks


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .config; expected a transformers model")
    return cfg


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _forward_params(model) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(_base(model).forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return frozenset()


def _sub_configs(cfg):
    yield cfg
    text = getattr(cfg, "text_config", None)
    if text is not None and text is not cfg:
        yield text


def check_tree_packing(model, row_tokens: int | None = None) -> str | None:
    """Why `model` cannot run a tree-packed row exactly, or None when it can.

    row_tokens: the longest row that will be forwarded (sliding windows shorter than it
    are refused; without it any sliding window is refused).
    """
    cfg = _config(model)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl.startswith("flash") or impl not in _MASKABLE_BACKENDS:
        return (
            f"attention backend {impl!r} cannot take an arbitrary 4D mask; load the model with "
            f"attn_implementation='sdpa' or 'eager' (or 'flex_attention'), or use packing='none'"
        )
    for c in _sub_configs(cfg):
        model_type = getattr(c, "model_type", "")
        if model_type in _RECURRENT_MODEL_TYPES:
            return f"{model_type!r} has recurrent/linear-attention layers that a tree mask cannot isolate"
        kinds = set(getattr(c, "layer_types", None) or ())
        for attr in ("layers_block_type", "hybrid_override_pattern", "layer_block_types"):
            v = getattr(c, attr, None)
            if v:
                kinds.update(v if isinstance(v, (list, tuple)) else [str(v)])
        bad = sorted(k for k in kinds if any(w in str(k).lower() for w in _NON_ATTENTION_LAYERS))
        if bad:
            return f"layer types {bad} are not softmax attention; a tree mask cannot isolate branches"
        window = getattr(c, "sliding_window", None)
        uses_window = getattr(c, "use_sliding_window", True) is not False
        if "sliding_attention" in kinds or (window and uses_window):
            if window and row_tokens is not None and window >= row_tokens:
                continue
            return (
                f"sliding-window attention (window {window}) counts distance by packed index, "
                f"not tree depth; rows of {row_tokens or 'unknown'} tokens would change the result"
            )
    if "position_ids" not in _forward_params(model):
        return f"{type(_base(model)).__name__}.forward takes no position_ids (e.g. ALiBi); tree depth cannot be passed"
    return None


# --------------------------------------------------------------------------- forward


def _model_device(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _model_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    return next(model.parameters()).dtype


def ancestor_mask(end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, T, T] for a DFS-ordered row: query i sees key j iff
    j <= i < end[j] (j is i's ancestor or i itself); 0 where allowed, dtype-min elsewhere."""
    n = end.shape[0]
    pos = torch.arange(n, device=end.device)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] < end[None, :])
    mask = torch.zeros((n, n), dtype=dtype, device=end.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def ancestor_block_mask(end: torch.Tensor):
    """The same rule as a FlexAttention BlockMask (for attn_implementation='flex_attention')."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = end.shape[0]

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q < end[kv])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=end.device)


def _child_logprobs(logits: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, need: np.ndarray | None = None,
                    start: int = 0, dists: list[torch.Tensor] | None = None) -> torch.Tensor:
    """log_softmax(logits)[src, tgt] in fp32, with one logsumexp per logits row (the plain,
    unchunked path: autograd keeps the fp32 ``[rows, V]`` logits for backward).

    With ``need`` (flags over the flat edge vector; this call's edges start at ``start``),
    the full log-softmax rows of the flagged edges are appended to ``dists``, from the same
    logsumexp."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    if need is not None:
        local = np.flatnonzero(need[start : start + len(src)])
        if len(local):
            rows = src[torch.from_numpy(local).to(src.device)]
            dists.append(logits[rows] - lse[rows, None])
    return logits[src, tgt] - lse[src]


def _head_logprobs(hidden: torch.Tensor, head: LMHead, src: torch.Tensor, tgt: torch.Tensor,
                   need: np.ndarray | None, start: int, dists: list[torch.Tensor], states: bool) -> torch.Tensor:
    """The chunked equivalent of `_child_logprobs` from the hidden states ``[K, H]`` that the
    output layer would have turned into logits. Flagged edges append their hidden rows
    (``states``) or their full log-softmax rows to ``dists``."""
    if need is not None:
        local = np.flatnonzero(need[start : start + len(src)])
        if len(local):
            rows = hidden[src[torch.from_numpy(local).to(src.device)]]
            dists.append(rows if states else head.logits(rows).log_softmax(-1))
    return head_token_logprobs(hidden, head, src, tgt)


# --------------------------------------------------------------------------- output layer

#: models whose output layer output did not match ``LMHead`` (a logits transform we do not
#: know): they run the plain path.
_UNFUSABLE: "weakref.WeakSet" = weakref.WeakSet()


class _Unfusable(Exception):
    """The tapped output layer does not reproduce the model's logits; rerun unfused."""


def lm_head_of(model, chunk: int | None = None) -> tuple[torch.nn.Module, LMHead] | None:
    """The output layer of `model` and its `LMHead`, when it is a plain ``nn.Linear`` (not
    wrapped by an adapter) and the model has not been found to transform its output; else None."""
    base = _base(model)
    get = getattr(base, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if type(module) is not torch.nn.Linear or module in _UNFUSABLE:
        return None
    softcap = None
    for c in _sub_configs(_config(model)):
        softcap = softcap or getattr(c, "final_logit_softcapping", None)
    return module, LMHead(module.weight, module.bias, float(softcap) if softcap else None, chunk)


class _HeadTap:
    """For one model call, the output layer keeps its input (the hidden states) and computes
    the logits of the first position only; `check` then compares those with what `LMHead`
    computes from the same hidden state, so a model that transforms its logits after the
    layer (a scale we do not know) is caught, not silently trained on other numbers."""

    def __init__(self, module: torch.nn.Module, head: LMHead):
        self.module, self.head, self.hidden = module, head, None

    def __enter__(self):
        mod = self.module
        self._had = "forward" in mod.__dict__
        self._old = mod.__dict__.get("forward")
        inner = mod.forward

        def tapped(x, *args, **kwargs):
            self.hidden = x
            return inner(x[..., :1, :], *args, **kwargs)

        mod.forward = tapped
        return self

    def __exit__(self, *exc):
        if self._had:
            self.module.forward = self._old
        else:
            del self.module.forward
        return False

    def check(self, logits: torch.Tensor) -> None:
        if self.hidden is None:
            raise _Unfusable("the output layer was not called")
        with torch.no_grad():
            want = self.head.logits(self.hidden[..., :1, :])
            got = logits[..., :1, :].float()
            finite = bool(torch.isfinite(got).all())
        if not finite:
            # a NaN/inf step says nothing about the head; the trainer's finite check stops the
            # run. Falling back here would forward once more on this rank alone, and under DDP
            # that extra forward's buffer broadcast waits forever for the other ranks.
            return
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            raise _Unfusable("the model transforms the output layer's logits")


def _call(model, tap: _HeadTap | None, **kwargs):
    """``(hidden, None)`` through the tap, or ``(None, logits)`` without one."""
    if tap is None:
        return None, model(**kwargs).logits
    tap.hidden = None
    with tap:
        out = model(**kwargs)
    tap.check(out.logits)
    return tap.hidden, None


def _tree_forward(model, plan: PackPlan, device, need: np.ndarray | None = None,
                  dists: list[torch.Tensor] | None = None, tap: _HeadTap | None = None,
                  states: bool = False) -> list[torch.Tensor]:
    impl = getattr(_config(model), "_attn_implementation", None) or "eager"
    dtype = _model_dtype(model)
    can_keep = "logits_to_keep" in _forward_params(model)
    parts = []
    start = 0
    for row in plan.rows:
        ids = torch.from_numpy(row.tokens).to(device)[None]
        pos = torch.from_numpy(row.depth).to(device)[None]
        end = torch.from_numpy(row.end).to(device)
        mask = ancestor_block_mask(end) if impl == "flex_attention" else ancestor_mask(end, dtype)
        keep = torch.from_numpy(row.keep).to(device)
        kwargs = {"logits_to_keep": keep} if can_keep else {}
        hidden, logits = _call(model, tap, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                               **kwargs)
        src = torch.from_numpy(row.child_src).to(device)
        tgt = torch.from_numpy(row.tokens[row.child]).to(device)
        if hidden is not None:
            hidden = hidden[0] if can_keep else hidden[0][keep]
            parts.append(_head_logprobs(hidden, tap.head, src, tgt, need, start, dists, states))
        else:
            logits = logits[0] if can_keep else logits[0][keep]
            parts.append(_child_logprobs(logits, src, tgt, need, start, dists))
        start += len(src)
    return parts


def _linear_forward(model, plan: PackPlan, seqs: list[np.ndarray], device, need: np.ndarray | None = None,
                    dists: list[torch.Tensor] | None = None, tap: _HeadTap | None = None,
                    states: bool = False) -> list[torch.Tensor]:
    parts = []
    start = 0
    for batch, width in zip(plan.linear_rows, plan.linear_width):
        ids = np.zeros((len(batch), width), dtype=np.int64)
        attn = np.zeros((len(batch), width), dtype=np.int64)
        for r, i in enumerate(batch):
            ids[r, : len(seqs[i])] = seqs[i]
            attn[r, : len(seqs[i])] = 1
        ids_t = torch.from_numpy(ids).to(device)
        hidden, logits = _call(model, tap, input_ids=ids_t, attention_mask=torch.from_numpy(attn).to(device),
                               use_cache=False)
        tgt = ids_t[:, 1:].reshape(-1)  # padding targets are gathered but never indexed
        src = torch.arange(tgt.shape[0], device=device)
        if hidden is not None:
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            parts.append(_head_logprobs(flat, tap.head, src, tgt, need, start, dists, states))
        else:
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B * (W-1), V]
            parts.append(_child_logprobs(flat, src, tgt, need, start, dists))
        start += len(src)
    return parts


def token_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    packing: str = "tree",
    token_budget: int = 4096,
    device=None,
    fallback: bool = False,
    plan: PackPlan | None = None,
    dist_masks: Sequence[Sequence[bool]] | None = None,
    dist_states: bool = False,
    fused: bool = True,
    head_chunk: int | None = None,
):
    """Per-token log-probs of each sequence under `model` (a HF causal LM, maybe peft).

    out[i][j] = log p(sequences[i][j+1] | sequences[i][:j+1]), fp32, shape
    [len(sequences[i]) - 1] (empty for a length-1 sequence). Differentiable: call under
    torch.no_grad() for reference log-probs. The autograd graph of every row is held
    until the outputs are released, so pass one micro-batch at a time.

    packing: "tree" (default) or "none" (linearized rows, right-padded).
    token_budget: tokens per forward pass (rows x width for "none").
    fallback: when tree packing is impossible for this model, warn and use "none"
        instead of raising TreePackingUnsupported.
    plan: a `plan_packing(sequences, ...)` result to reuse (policy + reference passes).
    dist_masks: per sequence, one flag per predicted token (length ``len(seq) - 1``); when
        given, the call returns ``(logps, dists)`` where ``dists[i]`` holds the full
        log-softmax rows ``[n_i, vocab]`` (fp32) at the flagged predictions, in order (for a
        full-distribution KL). Only those rows are materialised.
    dist_states: with ``dist_masks``, return each sequence's flagged positions as a
        `train.chunked.HeadStates` (hidden states ``[n_i, H]`` + the output layer) instead of
        ``[n_i, V]`` rows, so a loss over the full distribution can run chunked
        (`train.losses.full_reference_kl` takes either form). Plain rows come back when the
        output layer cannot be tapped (see ``fused``).
    fused: compute the log-probs from the output layer's input in chunks of ``head_chunk``
        rows (`train.chunked`), so backward keeps ``[T, H]`` hidden states instead of fp32
        ``[T, V]`` logits. Used when the output layer is a plain ``nn.Linear`` whose output
        the model returns unchanged (checked on every call from one position); otherwise,
        and with ``fused=False``, the plain path runs.
    head_chunk: rows per chunk (default: ~64 MiB of fp32 logits, `train.chunked.chunk_rows`).
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    seqs = _as_arrays(sequences)
    vocab = getattr(_config(model), "vocab_size", None)
    if vocab is not None:
        for i, s in enumerate(seqs):
            if s.max() >= vocab:
                raise ValueError(f"sequences[{i}] holds token id {int(s.max())} >= vocab size {vocab}")
    if plan is None or plan.packing != packing:
        plan = plan_packing(seqs, packing=packing, token_budget=token_budget)
    if len(plan.seq_counts) != len(seqs) or plan.seq_counts != tuple(len(s) - 1 for s in seqs):
        raise ValueError("plan was built for other sequences")
    if packing == "tree":
        reason = check_tree_packing(model, row_tokens=plan.max_row)
        if reason is not None:
            if not fallback:
                raise TreePackingUnsupported(f"tree packing refused: {reason}")
            warnings.warn(f"tree packing refused, using packing='none': {reason}", stacklevel=2)
            return token_logprobs(model, seqs, packing="none", token_budget=token_budget, device=device,
                                  dist_masks=dist_masks, dist_states=dist_states, fused=fused, head_chunk=head_chunk)
    need = None
    if dist_masks is not None:
        if len(dist_masks) != len(seqs):
            raise ValueError(f"dist_masks has {len(dist_masks)} entries for {len(seqs)} sequences")
        flags = []
        for i, (m, n) in enumerate(zip(dist_masks, plan.seq_counts)):
            a = np.asarray(m, dtype=bool).reshape(-1)
            if len(a) != n:
                raise ValueError(f"dist_masks[{i}] has {len(a)} flags; sequences[{i}] predicts {n} tokens")
            flags.append(a)
        picked_flags = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
        need = np.zeros(plan.n_edges, dtype=bool)
        need[plan.seq_index[picked_flags]] = True
    dev = _model_device(model, device)
    found = lm_head_of(model, head_chunk) if fused else None
    tap = _HeadTap(*found) if found is not None else None
    states = bool(dist_states) and tap is not None
    dists: list[torch.Tensor] = []
    try:
        if packing == "tree":
            parts = _tree_forward(model, plan, dev, need, dists, tap, states)
        else:
            parts = _linear_forward(model, plan, seqs, dev, need, dists, tap, states)
    except _Unfusable as exc:
        _UNFUSABLE.add(tap.module)
        warnings.warn(f"chunked log-probs off for {type(_base(model)).__name__} ({exc}); "
                      f"using full logits", stacklevel=2)
        return token_logprobs(model, seqs, packing=packing, token_budget=token_budget, device=device,
                              plan=plan, dist_masks=dist_masks, dist_states=dist_states, fused=False)
    if not parts:
        logps = [torch.zeros(0, dtype=torch.float32, device=dev) for _ in seqs]
    else:
        flat = torch.cat(parts)
        picked = flat[torch.from_numpy(plan.seq_index).to(dev)]
        logps = list(torch.split(picked, list(plan.seq_counts)))
    if need is None:
        return logps
    # rows were appended in flat-edge order; rank maps a needed edge to its row
    rank = np.cumsum(need) - 1
    width = tap.head.weight.shape[1] if states else (getattr(_config(model), "vocab_size", None) or 0)
    table = torch.cat(dists) if dists else torch.zeros(0, width, dtype=torch.float32, device=dev)
    rows = torch.from_numpy(rank[plan.seq_index[picked_flags]]).to(dev)
    gathered = table[rows] if len(rows) else table[:0]
    counts = [int(f.sum()) for f in flags]
    split = list(torch.split(gathered, counts))
    if states:
        return logps, [HeadStates(h, tap.head) for h in split]
    return logps, split
