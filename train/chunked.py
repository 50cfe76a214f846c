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

When the output layer is frozen (LoRA) and no autocast is active, both functions skip the
recomputation: the gradient with respect to each hidden row is linear in the upstream
gradient with a factor known in forward (the softmax Jacobian, written by hand), so forward
keeps that factor (``[T, H]``, the size of what it saved before) and backward only scales
or gathers. The full KL drops from five ``lm_head`` matmuls per chunk to three, the token
log-probs from three to two. Tests compare both against materialised autograd.
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
        return self.capped(h, weight, bias)[0]

    def capped(self, h: Tensor, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The fp32 logits and, with a softcap, ``tanh(y / cap)`` of the layer's output ``y``
        (its derivative ``1 - tanh^2`` is what the by-hand gradients need)."""
        y = F.linear(h, self.weight if weight is None else weight, self.bias if bias is None else bias)
        if not self.softcap:
            return y.float(), None
        t = torch.tanh(y / self.softcap)
        return (t * self.softcap).float(), t


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


def _by_hand(head: LMHead, hidden: Tensor) -> bool:
    """Whether a head function may use its by-hand gradient: the output layer is frozen (only
    the hidden states get a gradient, as under LoRA) and no autocast is active (a bf16
    autocast run keeps the recomputing path, which replays its forward's casts)."""
    frozen = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
    return frozen and not torch.is_autocast_enabled(hidden.device.type)


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

    if _by_hand(head, hidden):
        flat = _TokenHead.apply(hidden, head, chunks, parts, hidden.requires_grad and torch.is_grad_enabled())
    else:
        flat = _Chunked.apply(_token_compute(head, parts), chunks, hidden, head.weight, head.bias, None)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return flat[inv]


def _token_compute(head: LMHead, parts: list[tuple[Tensor, Tensor]]) -> Callable:
    def compute(i, h, w, b, _aux):
        loc, t = parts[i]
        z = head.logits(h, w, b)
        lse = torch.logsumexp(z, dim=-1)
        return z[loc, t] - lse[loc]

    return compute


class _TokenHead(torch.autograd.Function):
    """`head_token_logprobs` when only the hidden states train. For an edge ``e`` reading row
    ``s`` at token ``t``, ``d(z_t - lse) / dh_s = c_t W_t - (p * c) @ W`` (``c`` the softcap's
    derivative, 1 without one): forward keeps ``A_s = (p_s * c_s) @ W`` per row (``[K, H]``)
    and ``c`` per edge, and backward gathers ``W_t``. Two ``lm_head``-sized matmuls per chunk,
    where recomputing in backward takes three (logits, logits again, the gradient)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: LMHead, chunks, parts, need_grad: bool):
        outs, rows_a, cs = [], [], []
        w, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
        with torch.no_grad():
            for (a, e), (loc, t) in zip(chunks, parts):
                z, th = head.capped(hidden[a:e], w, b)
                lse = torch.logsumexp(z, dim=-1)
                outs.append(z[loc, t] - lse[loc])
                if need_grad:
                    pc = (z - lse.unsqueeze(-1)).exp()
                    if th is not None:
                        c = 1 - th.float() ** 2
                        pc = pc * c
                        cs.append(c[loc, t])
                    rows_a.append(pc.to(w.dtype) @ w)
        if need_grad:
            src = torch.cat([loc + a for (a, _), (loc, _t) in zip(chunks, parts)])
            tgt = torch.cat([t for _loc, t in parts])
            ctx.save_for_backward(torch.cat(rows_a), src, tgt, *(torch.cat(cs),) if cs else ())
            ctx.head, ctx.dtype = head, hidden.dtype
        return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows_a, src, tgt, *c = ctx.saved_tensors
        g = grad.to(rows_a.dtype)
        w_t = ctx.head.weight.detach()[tgt].to(rows_a.dtype)
        if c:
            w_t = w_t * c[0].to(rows_a.dtype).unsqueeze(-1)
        gh = torch.zeros_like(rows_a)
        gh.index_add_(0, src, g.unsqueeze(-1) * w_t)  # + g_e c_t W_t, for each edge of a row
        per_row = torch.zeros(rows_a.shape[0], dtype=rows_a.dtype, device=rows_a.device)
        per_row.index_add_(0, src, g)
        gh -= per_row.unsqueeze(-1) * rows_a  # - (sum of the row's g_e) A_s
        return gh.to(ctx.dtype), None, None, None, None


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


def _kl_logit_grad(lp: Tensor, lq: Tensor, direction: str) -> Tensor:
    """``d kl_rows(lp, lq, direction) / d z`` for ``lp = log_softmax(z)`` (``lq`` fixed), per row:
    reverse ``p * (d - KL(p || q))`` with ``d = lp - lq``, forward ``p - q``, symmetric their
    sum (the softmax Jacobian applied by hand, so no row of it is kept or recomputed)."""
    p = lp.exp()
    if direction == "forward":
        return p - lq.exp()
    d = lp - lq
    rev = p * (d - (p * d).sum(-1, keepdim=True))
    if direction == "reverse":
        return rev
    return rev + p - lq.exp()


def _forward_kl_and_grad(z: Tensor, zq: Tensor, grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """KL(q ‖ p) per row and its gradient ``p - q`` with respect to the policy logits ``z``
    (``zq`` the reference's), in fewer passes over the ``[n, V]`` rows than `kl_rows` and
    `_kl_logit_grad`: ``sum_v q (log q - log p) = sum_v q (zq - z) + lse(z) - lse(zq)``
    (``sum_v q = 1``), and the rows are overwritten in place (both are this chunk's own
    temporaries). The same numbers up to fp32 rounding; the tests hold it to autograd.
    Without ``grad`` the gradient is not computed (None)."""
    lse_p = torch.logsumexp(z, -1, keepdim=True)
    lse_q = torch.logsumexp(zq, -1, keepdim=True)
    q = (zq - lse_q).exp_()
    kl = (q * zq.sub_(z)).sum(-1) + (lse_p - lse_q).squeeze(-1)
    return kl, z.sub_(lse_p).exp_().sub_(q) if grad else None


class _KLHead(torch.autograd.Function):
    """The full KL of `head_full_kl` when only the hidden states train (the output layer is
    frozen, as under LoRA). Each row's KL depends on its own hidden state only, so its
    gradient ``dKL_r / dh_r`` (``[n, H]``) is computed in forward, chunk by chunk, from the
    logits already there, and backward only scales it by the incoming per-row gradient.
    That is three ``lm_head``-sized matmuls per chunk (policy and reference logits, and the
    gradient back through the head) where recomputing in backward takes five (both logits
    again, then the gradient); the saved state is the same ``[n, H]`` size."""

    @staticmethod
    def forward(ctx, policy: Tensor, reference: Tensor, head: LMHead, direction: str, need_grad: bool):
        outs, grads = [], []
        w, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
        with torch.no_grad():
            for a, e in _bounds(int(policy.shape[0]), head.rows):
                z, t = head.capped(policy[a:e], w, b)
                zq = head.logits(reference[a:e], w, b)
                if direction == "forward":
                    kl, dz = _forward_kl_and_grad(z, zq, need_grad)
                    outs.append(kl)
                else:
                    lp, lq = z.log_softmax(-1), zq.log_softmax(-1)
                    outs.append(kl_rows(lp, lq, direction))
                    dz = _kl_logit_grad(lp, lq, direction) if need_grad else None
                if need_grad:
                    if t is not None:  # z = cap * tanh(y / cap): dz/dy = 1 - tanh^2
                        dz = dz * (1 - t.float() ** 2)
                    grads.append(dz.to(w.dtype) @ w)
        if need_grad:
            ctx.save_for_backward(torch.cat(grads).to(policy.dtype))
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (gh,) = ctx.saved_tensors
        return gh * grad.unsqueeze(-1).to(gh.dtype), None, None, None, None


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

    if _by_hand(head, policy):
        return _KLHead.apply(policy, reference.detach(), head, direction,
                             policy.requires_grad and torch.is_grad_enabled())

    def compute(i, h, w, b, ref):
        lp = head.logits(h, w, b).log_softmax(-1)
        with torch.no_grad():
            lq = head.logits(ref, w.detach(), None if b is None else b.detach()).log_softmax(-1)
        return kl_rows(lp, lq, direction)

    return _Chunked.apply(compute, _bounds(n, head.rows), policy, head.weight, head.bias, reference.detach())
