"""Loss functions: tensors in, tensors out.

Nothing here runs a model. Every function takes per-token log-probabilities that
``train.logprobs.token_logprobs`` produced (``out[i][j] = log p(seq[i][j+1] | seq[i][:j+1])``)
plus weights or spans that ``train.data`` built before any model existed, and returns
tensors. Shapes are documented per function; ``B`` = number of sequences, ``T`` = padded
length of the *prediction* axis (sequence length - 1), ``N`` = number of steers.

Conventions
-----------
* A weight of 0 means "no loss on this token"; padding positions carry weight 0.
* DPO works on **summed** log-probs over the localized span (the chosen correction or the
  first K rejected tokens), optionally divided by the span length (``length_normalize``).
* The reference log-probs are plain tensors (computed once with the adapter disabled and
  cached); no gradient flows through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from train.chunked import HeadStates, head_full_kl, kl_rows
from train.config import LOSS_TYPES

__all__ = [
    "pad_logps",
    "weighted_nll",
    "span_logps",
    "dpo_loss",
    "DPOOutput",
    "chosen_nll",
    "log_odds",
    "reference_kl",
    "full_reference_kl",
    "dpo_metrics",
]


def pad_logps(logps: Sequence[Tensor], value: float = 0.0) -> Tensor:
    """Stack variable-length 1-D log-prob tensors into ``(B, T)``, right-padded with ``value``.

    Keeps the autograd graph (``torch.nn.utils.rnn.pad_sequence``)."""
    if len(logps) == 0:
        raise ValueError("pad_logps: no sequences")
    return torch.nn.utils.rnn.pad_sequence(list(logps), batch_first=True, padding_value=value)


def weighted_nll(logps: Tensor, weights: Tensor, *, normalize: str = "sequence") -> Tensor:
    """Masked, weighted negative log-likelihood.

    Args:
        logps: ``(B, T)`` log p of each target token.
        weights: ``(B, T)`` non-negative loss weight per target token (0 = masked: prompt,
            padding, model tokens by default).
        normalize: ``"sequence"``: each sequence's weighted mean NLL, then the mean over
            sequences that have any weight (every sequence counts the same, however many
            human tokens it holds); ``"token"``: total weighted NLL / total weight.

    Returns:
        scalar tensor. 0 (with a graph) when every weight is 0.
    """
    if logps.shape != weights.shape:
        raise ValueError(f"weighted_nll: logps {tuple(logps.shape)} != weights {tuple(weights.shape)}")
    w = weights.to(logps.dtype)
    nll = -(logps * w)
    if normalize == "token":
        total = w.sum()
        return nll.sum() / total.clamp_min(1e-12) if total > 0 else logps.sum() * 0.0
    if normalize != "sequence":
        raise ValueError(f"weighted_nll: normalize must be 'sequence' or 'token', not {normalize!r}")
    per_seq_w = w.sum(dim=1)
    has = per_seq_w > 0
    if not bool(has.any()):
        return logps.sum() * 0.0
    per_seq = nll.sum(dim=1)[has] / per_seq_w[has]
    return per_seq.mean()


def span_logps(logps: Sequence[Tensor], spans: Sequence[tuple[int, int]], *,
               first_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sum of log-probs over one span per sequence.

    Args:
        logps: ``B`` tensors of shape ``(L_i - 1,)`` (prediction axis).
        spans: ``B`` half-open ranges ``(start, end)`` **on the prediction axis**: the span of
            target tokens ``seq[start+1 : end+1]``. For a DPO sequence ``prefix + completion``
            the completion span is ``(len(prefix) - 1, len(prefix) - 1 + len(completion))``.
        first_weight: weight of the span's first token (the first divergent token of a steer:
            where the correction and what the model wrote part ways); the others weigh 1.

    Returns:
        ``(sums, lengths)``, both ``(B,)``; ``sums`` keeps the graph.
    """
    if len(logps) != len(spans):
        raise ValueError(f"span_logps: {len(logps)} sequences but {len(spans)} spans")
    sums, lens = [], []
    for lp, (a, b) in zip(logps, spans):
        if not (0 <= a <= b <= lp.shape[0]):
            raise ValueError(f"span_logps: span ({a}, {b}) outside a sequence of {lp.shape[0]} targets")
        total = lp[a:b].sum()
        if first_weight != 1.0 and b > a:
            total = total + (first_weight - 1.0) * lp[a]
        sums.append(total)
        lens.append(b - a)
    device = logps[0].device if len(logps) else None
    return torch.stack(sums), torch.tensor(lens, dtype=torch.float32, device=device)


@dataclass
class DPOOutput:
    """Per-steer DPO results, all ``(N,)``."""

    losses: Tensor
    chosen_rewards: Tensor  # beta * (pi_c - ref_c), detached
    rejected_rewards: Tensor  # beta * (pi_r - ref_r), detached

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[Tensor, Tensor] | None = None,
) -> DPOOutput:
    """DPO on span log-probs.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(N,)`` summed (or
            length-normalized) log-probs of the chosen / rejected span under the policy and
            the reference.
        beta: inverse temperature of the implicit reward (DPO) / regularization (IPO).
        loss_type: ``"sigmoid"``: ``-log σ(β·h)`` (with conservative label smoothing ε:
            ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``); ``"ipo"``: ``(h - 1/(2β))²``; where
            ``h = (π_c - ref_c) - (π_r - ref_r)``; ``"apo_zero"`` (APO-zero, anchored:
            push the chosen span up and the rejected span down, each against the reference):
            ``(1 - σ(β·(π_c - ref_c))) + σ(β·(π_r - ref_r))``; ``"orpo"`` (odds ratio,
            reference-free): ``-β·log σ(odds_c - odds_r)`` with ``odds = m - log(1 - e^m)``,
            ``m`` = the span's mean log-prob per token (``lengths`` required: the chosen and
            rejected span lengths). ORPO's NLL term is the trainer's ``rpo_alpha`` term.

    Returns:
        :class:`DPOOutput` with per-steer losses (reduce them yourself).
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1.0 - torch.sigmoid(beta * (policy_chosen - ref_chosen))) + torch.sigmoid(
            beta * (policy_rejected - ref_rejected))
    elif loss_type == "orpo":
        if lengths is None:
            raise ValueError("dpo_loss: loss_type 'orpo' needs the span lengths")
        losses = -beta * F.logsigmoid(log_odds(policy_chosen, lengths[0]) - log_odds(policy_rejected, lengths[1]))
    else:
        raise ValueError(f"dpo_loss: loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return DPOOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


def log_odds(span_sum: Tensor, lengths: Tensor) -> Tensor:
    """``log(p / (1 - p))`` of a span with ``p`` = exp(its mean log-prob per token) (ORPO);
    ``log(1 - p)`` is computed as ``log(-expm1(m))`` to stay finite as ``p`` -> 1."""
    m = (span_sum / lengths.to(span_sum.dtype).clamp_min(1.0)).clamp(max=-1e-6)
    return m - torch.log(-torch.expm1(m))


def chosen_nll(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """RPO-style SFT term on the chosen span, normalized per steer.

    Args:
        policy_chosen: ``(N,)`` summed log-probs of each chosen span.
        chosen_lengths: ``(N,)`` span lengths (tokens).

    Returns:
        ``(N,)`` mean NLL per chosen token of each steer (every steer weighs the same,
        however long its correction).
    """
    return -policy_chosen / chosen_lengths.to(policy_chosen.dtype).clamp_min(1.0)


def reference_kl(policy: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """Estimate of KL(reference ‖ policy) from tokens the reference model sampled (the
    one-token estimate of :func:`full_reference_kl` with ``direction="forward"``).

    The model-written tokens in a steer tree were sampled from the base model (the
    reference), so ``k3 = exp(lp - lr) - 1 - (lp - lr)`` (``lp``/``lr`` = policy/reference
    log-prob of the sampled token) is a non-negative, unbiased per-token estimate of
    KL(ref ‖ policy). It keeps the adapter close to the base model on everything the human
    did not correct, which is what prevents collapse into repetition.

    Args:
        policy: ``(B, T)`` policy log-probs.
        reference: ``(B, T)`` reference log-probs (no grad).
        mask: ``(B, T)`` 1 on model-written target tokens, 0 elsewhere.

    Returns:
        scalar: mean estimate over masked tokens (0 with a graph if none).
    """
    if not (policy.shape == reference.shape == mask.shape):
        raise ValueError(
            f"reference_kl: shapes differ: {tuple(policy.shape)}, {tuple(reference.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(policy.dtype)
    total = m.sum()
    if total <= 0:
        return policy.sum() * 0.0
    d = (policy - reference.detach()).clamp(-20.0, 20.0)
    k3 = torch.exp(d) - 1.0 - d
    return (k3 * m).sum() / total


def full_reference_kl(policy_rows: Sequence[Tensor | HeadStates],
                      reference_rows: Sequence[Tensor | HeadStates], direction: str = "reverse") -> Tensor:
    """Exact KL(policy ‖ reference) over the whole vocabulary, averaged over positions.

    The direction is the opposite of :func:`reference_kl`'s (a one-token estimate of
    KL(reference ‖ policy)): this is not an exact form of that KL but another divergence.
    It sees every token's probability at every position, so the adapter cannot quietly move mass to a token the
    model did not happen to sample there: end-of-sequence above all (the shortening that
    localized DPO causes on a small model, see docs/loop.md), or a favourite word.

    Args:
        policy_rows: per sequence, ``(n_i, V)`` policy log-softmax rows at the positions the
            KL covers (model-written targets), with grad; or a `train.chunked.HeadStates`
            (``(n_i, H)`` hidden states + the output layer), the form
            ``token_logprobs(..., dist_states=True)`` returns.
        reference_rows: the same from the reference model (no grad).
        direction: ``"reverse"`` (default) the KL(policy ‖ reference) above; ``"forward"``
            the exact KL(reference ‖ policy) = ``sum_v q(v) (log q(v) - log p(v))``, which
            penalises taking mass from any token the base model gives it (against sharpening
            onto a few tokens, i.e. repetition); ``"symmetric"`` the sum of the two.

    When every entry on both sides is a ``HeadStates`` of one output layer, the KL runs
    chunked (`train.chunked.head_full_kl`): the same sum, but backward keeps the ``(n, H)``
    hidden states instead of fp32 ``(n, V)`` rows. Otherwise the rows are materialised.

    Returns:
        scalar: mean over all positions of the per-position KL (``direction``); 0 with a
        graph when there are no positions.
    """
    if len(policy_rows) != len(reference_rows):
        raise ValueError(f"full_reference_kl: {len(policy_rows)} policy vs {len(reference_rows)} reference sequences")
    both = list(policy_rows) + list(reference_rows)
    if both and all(isinstance(r, HeadStates) for r in both) and len({id(r.head.weight) for r in both}) == 1:
        for i, (lp, lq) in enumerate(zip(policy_rows, reference_rows)):
            if lp.hidden.shape != lq.hidden.shape:
                raise ValueError(f"full_reference_kl: sequence {i}: shapes differ: "
                                 f"{tuple(lp.hidden.shape)} vs {tuple(lq.hidden.shape)}")
        pol = torch.cat([r.hidden for r in policy_rows])
        if pol.shape[0] == 0:
            return pol.sum() * 0.0
        per_pos = head_full_kl(pol, torch.cat([r.hidden for r in reference_rows]), policy_rows[0].head, direction)
        return per_pos.sum() / pol.shape[0]
    policy_rows = [r.log_softmax() if isinstance(r, HeadStates) else r for r in policy_rows]
    reference_rows = [r.log_softmax() if isinstance(r, HeadStates) else r for r in reference_rows]
    total, n = None, 0
    for i, (lp, lq) in enumerate(zip(policy_rows, reference_rows)):
        if lp.shape != lq.shape:
            raise ValueError(f"full_reference_kl: sequence {i}: shapes differ: {tuple(lp.shape)} vs {tuple(lq.shape)}")
        if lp.shape[0] == 0:
            continue
        kl = kl_rows(lp, lq.detach(), direction).sum()
        total = kl if total is None else total + kl
        n += lp.shape[0]
    if total is None:
        return sum(r.sum() for r in policy_rows) * 0.0 if policy_rows else torch.zeros(())
    return total / n


def dpo_metrics(out: DPOOutput) -> dict[str, float]:
    """Scalar metrics of a batch of steers: mean reward margin, accuracy (margin > 0),
    mean chosen/rejected rewards."""
    margins = out.margins
    return {
        "rewards/margin": float(margins.mean()),
        "rewards/accuracy": float((margins > 0).float().mean()),
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
    }
