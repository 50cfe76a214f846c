"""Token log-probs and the full-vocabulary KL from hidden states, chunked over tokens.

The output layer turns ``T`` hidden states into ``T x V`` logits. Computed the plain way
(``log_softmax(lm_head(h))``), autograd keeps fp32 ``[T, V]`` tensors for backward: the
logsumexp input, and for the full KL the ``exp`` of the policy rows and the difference of
policy and reference rows, ~3 x T x V x 4 bytes (10-20 GiB for one 4k-token row with a 128k
vocabulary). Here the same operations run in chunks of ``chunk`` rows inside one
``torch.autograd.Function`` that saves only its inputs (the hidden states, ``[T, H]``, and
the head's weight, a parameter that exists anyway) and recomputes each chunk's logits in
backward. Memory for backward is then ``T x (H + 1)`` numbers, linear in ``T`` and free of
``V``; the transient peak is one chunk's ``chunk x V`` rows. The price is one more
``lm_head`` matmul per token in backward (the recomputation).

Backward is autograd itself on the recomputed chunk (``torch.autograd.grad`` of the same
operations the plain path runs), so values and gradients equal the plain path's up to the
summation order of the chunked matmul (fp32 noise). The autocast state of the forward is
restored for the recomputation, so a bf16-autocast run recomputes in bf16 as it forwarded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LMHead", "HeadStates", "chunk_rows", "head_token_logprobs", "head_full_kl", "kl_rows", "KL_DIRECTIONS",
           "CHUNK_BYTES"]

#: fp32 bytes of one chunk of logits (``chunk x V x 4``); backward holds a few of these at once.
CHUNK_BYTES = 64 << 20


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about ``chunk_bytes``."""
    return max(8, int(chunk_bytes) // (4 * max(int(vocab), 1)))


@dataclass(frozen=True)
class LMHead:
    """The output layer as tensors: ``logits = softcap(h @ weight.T + bias)`` then fp32.

    ``softcap``: Gemma-style ``final_logit_softcapping`` (``cap * tanh(z / cap)``), applied
    in the layer's dtype before the fp32 cast, as the model does it."""

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    chunk: int | None = None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @property
    def rows(self) -> int:
        return int(self.chunk or chunk_rows(self.vocab))

    def logits(self, h: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        z = F.linear(h, self.weight if weight is None else weight, self.bias if bias is None else bias)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()


@dataclass
class HeadStates:
    """Hidden states ``[n, H]`` at the positions of one sequence whose full distribution a
    loss needs, plus the head that turns them into logits: the compact stand-in for
    ``n x V`` log-softmax rows."""

    hidden: Tensor
    head: LMHead

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def log_softmax(self) -> Tensor:
        """The full rows ``[n, V]`` (materialised; for tests and small cases)."""
        return self.head.logits(self.hidden).log_softmax(-1)


def _autocast_state(device: torch.device):
    kind = device.type
    try:
        return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch / odd device
        return kind, False, None


class _Chunked(torch.autograd.Function):
    """``cat([compute(hidden[a:b], weight, bias, aux[a:b]) for (a, b) in chunks])``, saving only
    the inputs; backward recomputes one chunk at a time.

    ``compute`` returns a 1-D fp32 tensor per chunk and must be a pure function of its tensor
    arguments (plus the chunk index)."""

    @staticmethod
    def forward(ctx, compute: Callable, chunks: Sequence[tuple[int, int]], hidden: Tensor, weight: Tensor,
                bias: Tensor | None, aux: Tensor | None):
        ctx.compute, ctx.chunks = compute, list(chunks)
        ctx.autocast = _autocast_state(hidden.device)
        ctx.has_bias, ctx.has_aux = bias is not None, aux is not None
        ctx.save_for_backward(hidden, weight, *(t for t in (bias, aux) if t is not None))
        outs = []
        with torch.no_grad():
            for i, (a, b) in enumerate(ctx.chunks):
                outs.append(compute(i, hidden[a:b], weight, bias, None if aux is None else aux[a:b]))
        ctx.sizes = [int(o.shape[0]) for o in outs]
        return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = list(ctx.saved_tensors)
        hidden, weight = saved[0], saved[1]
        bias = saved[2] if ctx.has_bias else None
        aux = saved[-1] if ctx.has_aux else None
        need_h, need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        kind, enabled, dtype = ctx.autocast
        grads = torch.split(grad, ctx.sizes)
        cast = torch.autocast(kind, dtype=dtype, enabled=enabled) if dtype is not None else contextlib.nullcontext()
        with torch.enable_grad(), cast:
            for i, (a, b) in enumerate(ctx.chunks):
                h = hidden[a:b].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                bb = None if bias is None else bias.detach().requires_grad_(need_b)
                out = ctx.compute(i, h, w, bb, None if aux is None else aux[a:b])
                inputs = [t for t, need in ((h, need_h), (w, need_w), (bb, need_b)) if need]
                if not inputs or not out.requires_grad:
                    continue
                got = iter(torch.autograd.grad(out, inputs, grads[i], allow_unused=True))
                if need_h:
                    g = next(got)
                    if g is not None:
                        gh[a:b] = g
                if need_w:
                    g = next(got)
                    if g is not None:
                        gw += g
                if need_b:
                    g = next(got)
                    if g is not None:
                        gb += g
        return None, None, gh, gw, gb, None


def _bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, n)) for a in range(0, n, max(1, rows))]


def head_token_logprobs(hidden: Tensor, head: LMHead, src: Tensor, tgt: Tensor) -> Tensor:
    """``log_softmax(head(hidden))[src, tgt]`` in fp32, ``[E]``, chunked over the rows of
    ``hidden`` (``[K, H]``); one logsumexp per row however many edges read it."""
    n = int(hidden.shape[0])
    if src.numel() == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    order = torch.argsort(src, stable=True)
    s_sorted, t_sorted = src[order], tgt[order]
    chunks = _bounds(n, head.rows)
    starts = torch.tensor([a for a, _ in chunks] + [n], device=src.device)
    cut = torch.searchsorted(s_sorted, starts).tolist()
    parts = [(s_sorted[cut[i]:cut[i + 1]] - a, t_sorted[cut[i]:cut[i + 1]]) for i, (a, _) in enumerate(chunks)]

    def compute(i, h, w, b, _aux):
        loc, t = parts[i]
        z = head.logits(h, w, b)
        lse = torch.logsumexp(z, dim=-1)
        return z[loc, t] - lse[loc]

    flat = _Chunked.apply(compute, chunks, hidden, head.weight, head.bias, None)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return flat[inv]


#: which KL between the policy ``p`` and the reference ``q`` a full-vocabulary KL term computes
KL_DIRECTIONS = ("reverse", "forward", "symmetric")


def kl_rows(lp: Tensor, lq: Tensor, direction: str = "reverse") -> Tensor:
    """Per row KL of log-softmax rows ``lp`` (policy) and ``lq`` (reference, no grad), over the
    last axis: ``"reverse"`` KL(p ‖ q), ``"forward"`` KL(q ‖ p), ``"symmetric"`` the sum."""
    d = lp - lq
    if direction == "reverse":
        return (lp.exp() * d).sum(-1)
    if direction == "forward":
        return -(lq.exp() * d).sum(-1)
    if direction == "symmetric":
        return ((lp.exp() - lq.exp()) * d).sum(-1)
    raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}, got {direction!r}")


def head_full_kl(policy: Tensor, reference: Tensor, head: LMHead, direction: str = "reverse") -> Tensor:
    """Per position ``sum_v p(v) (log p(v) - log q(v))``, ``[n]`` fp32, where ``p`` / ``q`` are
    the softmax of ``head`` applied to the policy / reference hidden states (both ``[n, H]``;
    no gradient reaches ``reference``). ``direction``: ``"reverse"`` is that KL(p ‖ q),
    ``"forward"`` KL(q ‖ p) = ``sum_v q(v) (log q(v) - log p(v))``, ``"symmetric"`` their sum."""
    if direction not in KL_DIRECTIONS:  # before any chunk runs
        raise ValueError(f"head_full_kl: KL direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if policy.shape != reference.shape:
        raise ValueError(f"head_full_kl: policy {tuple(policy.shape)} vs reference {tuple(reference.shape)}")
    n = int(policy.shape[0])
    if n == 0:
        return policy.sum(-1).float() * 0.0

    def compute(i, h, w, b, ref):
        lp = head.logits(h, w, b).log_softmax(-1)
        with torch.no_grad():
            lq = head.logits(ref, w.detach(), None if b is None else b.detach()).log_softmax(-1)
        return kl_rows(lp, lq, direction)

    return _Chunked.apply(compute, _bounds(n, head.rows), policy, head.weight, head.bias, reference.detach())
