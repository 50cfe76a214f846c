"""Per-token log-probs of many sequences under a causal LM, in the rows `train.packing` plans.

The one entry point the trainer, the reference cache and the evaluation call is
`token_logprobs(model, sequences)`: ``out[i][j] = log p(sequences[i][j+1] | sequences[i][:j+1])``.

Tree-packed rows (`train.packing.PackPlan`) go through the model with ``position_ids`` =
trie depth and an ancestor-only attention mask built from the row's ``end`` vector (query
``i`` sees key ``j`` iff ``j <= i < end[j]``); `check_tree_packing` says when a model cannot
run such a row exactly (then ``fallback`` uses ``packing="none"``).

Masks: a float additive 4D mask ``[1, 1, T, T]`` (0 allowed, dtype-min blocked) for the
eager and sdpa backends; transformers (5.x, ``masking_utils._preprocess_mask_arguments``)
passes a 4D mask through untouched, without combining it with its own causal mask. For
``attn_implementation="flex_attention"`` a FlexAttention ``BlockMask`` with the same rule
is passed instead, which skips the fully masked blocks.

Output layer: when it is a plain ``nn.Linear`` whose output the model returns unchanged, the
log-probs are computed from its input in chunks (`train.chunked`), so backward keeps hidden
states instead of fp32 ``[T, V]`` logits.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from train.chunked import HeadStates, LMHead, head_token_logprobs
from train.config import PACKINGS
from train.packing import PackPlan, as_token_arrays, plan_packing

__all__ = [
    "TreePackingUnsupported",
    "ancestor_block_mask",
    "ancestor_mask",
    "check_tree_packing",
    "lm_head_of",
    "token_logprobs",
]

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
                   need: np.ndarray | None, start: int, dists: list[torch.Tensor], states: bool,
                   want: np.ndarray | None = None) -> torch.Tensor:
    """The chunked equivalent of `_child_logprobs` from the hidden states ``[K, H]`` that the
    output layer would have turned into logits. Flagged edges append their hidden rows
    (``states``) or their full log-softmax rows to ``dists``.

    ``want`` (flags over the flat edge vector, like ``need``): only the flagged edges' log-probs
    are computed, from the hidden rows they read; the others are 0. The output layer is the
    costliest part of a small model's step (``V x H`` per row and direction), and a loss
    reads few of a row's log-probs (the DPO spans), so this skips most of it."""
    if need is not None:
        local = np.flatnonzero(need[start : start + len(src)])
        if len(local):
            rows = hidden[src[torch.from_numpy(local).to(src.device)]]
            dists.append(rows if states else head.logits(rows).log_softmax(-1))
    if want is None:
        return head_token_logprobs(hidden, head, src, tgt)
    # zeros that stay in the graph: a micro-batch whose loss reads none of them still gives
    # every trainable parameter a (zero) gradient, as reading all of them did
    out = hidden.new_zeros(len(src), dtype=torch.float32) + hidden[:1].sum().float() * 0.0
    local = np.flatnonzero(want[start : start + len(src)])
    if not len(local):
        return out
    idx = torch.from_numpy(local).to(src.device)
    rows, row_of = torch.unique(src[idx], return_inverse=True)
    return out.index_put((idx,), head_token_logprobs(hidden[rows], head, row_of, tgt[idx]))


# --------------------------------------------------------------------------- output layer

#: models whose output layer output did not match ``LMHead`` (a logits transform we do not
#: know): they run the plain path.
_UNFUSABLE: "weakref.WeakSet" = weakref.WeakSet()


class _Unfusable(Exception):
    """The tapped output layer does not reproduce the model's logits; rerun unfused."""


def lm_head_of(model, chunk: int | None = None) -> tuple[torch.nn.Module, LMHead] | None:
    """The output layer of `model` and its `LMHead`, when it is a plain ``nn.Linear`` (not
    wrapped by an adapter) and the model has not been found to transform its output; else None.
    None too for a model whose parameters are sharded between forwards (FSDP, ZeRO-3:
    ``params_sharded``), since the chunked path reads the layer's weight after the forward."""
    if getattr(model, "params_sharded", False) is True:
        return None
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
                  states: bool = False, want: np.ndarray | None = None) -> list[torch.Tensor]:
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
            parts.append(_head_logprobs(hidden, tap.head, src, tgt, need, start, dists, states, want))
        else:
            logits = logits[0] if can_keep else logits[0][keep]
            parts.append(_child_logprobs(logits, src, tgt, need, start, dists))
        start += len(src)
    return parts


def _linear_forward(model, plan: PackPlan, seqs: list[np.ndarray], device, need: np.ndarray | None = None,
                    dists: list[torch.Tensor] | None = None, tap: _HeadTap | None = None,
                    states: bool = False, want: np.ndarray | None = None) -> list[torch.Tensor]:
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
            parts.append(_head_logprobs(flat, tap.head, src, tgt, need, start, dists, states, want))
        else:
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B * (W-1), V]
            parts.append(_child_logprobs(flat, src, tgt, need, start, dists))
        start += len(src)
    return parts


def _edge_flags(name: str, masks: Sequence[Sequence[bool]], plan: PackPlan):
    """Per-sequence flags (one per predicted token) checked against the plan, and mapped to
    the plan's flat edges: ``(flags, their concatenation, edge flags)``. An edge shared by
    several sequences (a common prefix) is flagged when any of them flags it."""
    if len(masks) != len(plan.seq_counts):
        raise ValueError(f"{name} has {len(masks)} entries for {len(plan.seq_counts)} sequences")
    flags = []
    for i, (m, n) in enumerate(zip(masks, plan.seq_counts)):
        a = np.asarray(m, dtype=bool).reshape(-1)
        if len(a) != n:
            raise ValueError(f"{name}[{i}] has {len(a)} flags; sequences[{i}] predicts {n} tokens")
        flags.append(a)
    picked = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    edges = np.zeros(plan.n_edges, dtype=bool)
    edges[plan.seq_index[picked]] = True
    return flags, picked, edges


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
    logp_masks: Sequence[Sequence[bool]] | None = None,
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
    logp_masks: per sequence, one flag per predicted token (like ``dist_masks``): the log-probs
        the caller will read. With the chunked output layer only those are computed and the
        others come back as 0 (still in the graph), or as their value where a sequence sharing
        that prefix flagged the same prediction; the plain path computes them all. A
        loss that reads few positions (DPO spans) then skips most of the output layer.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    seqs = as_token_arrays(sequences)
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
                                  dist_masks=dist_masks, dist_states=dist_states, fused=fused, head_chunk=head_chunk,
                                  logp_masks=logp_masks)
    need = want = None
    if dist_masks is not None:
        flags, picked_flags, need = _edge_flags("dist_masks", dist_masks, plan)
    if logp_masks is not None:
        want = _edge_flags("logp_masks", logp_masks, plan)[2]
    dev = _model_device(model, device)
    found = lm_head_of(model, head_chunk) if fused else None
    tap = _HeadTap(*found) if found is not None else None
    states = bool(dist_states) and tap is not None
    dists: list[torch.Tensor] = []
    try:
        if packing == "tree":
            parts = _tree_forward(model, plan, dev, need, dists, tap, states, want)
        else:
            parts = _linear_forward(model, plan, seqs, dev, need, dists, tap, states, want)
    except _Unfusable as exc:
        _UNFUSABLE.add(tap.module)
        warnings.warn(f"chunked log-probs off for {type(_base(model)).__name__} ({exc}); "
                      f"using full logits", stacklevel=2)
        return token_logprobs(model, seqs, packing=packing, token_budget=token_budget, device=device,
                              plan=plan, dist_masks=dist_masks, dist_states=dist_states, fused=False,
                              logp_masks=logp_masks)
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
