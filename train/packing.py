"""Per-token log-probs of many sequences under a causal LM, optionally tree-packed.

`token_logprobs(model, sequences)` is the one entry point the trainer calls. This first
version implements the linearized path (`packing="none"`); tree packing follows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["token_logprobs"]

PACKINGS = ("tree", "none")


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _check_sequences(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    seqs = [list(s) for s in sequences]
    for i, s in enumerate(seqs):
        if len(s) < 1:
            raise ValueError(f"sequences[{i}] is empty; every sequence needs at least one token")
    return seqs


def _linear_rows(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into rows of at most `token_budget` padded tokens.

    Rows are padded to their longest member, so the cost of a row is
    n_members * max_len. A sequence longer than the budget gets a row of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = lengths[i]
        new_max = max(cur_max, n)
        if cur and new_max * (len(cur) + 1) > token_budget:
            rows.append(cur)
            cur, cur_max = [], 0
            new_max = n
        cur.append(i)
        cur_max = new_max
    if cur:
        rows.append(cur)
    return rows


def _gather_logprobs(logits: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits[src])[tgt] for flat index/target vectors, in fp32."""
    picked = logits[src].float()
    return picked.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)


def _linear_logprobs(model, seqs: list[list[int]], token_budget: int, device) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(seqs)
    lengths = [len(s) for s in seqs]
    live = [i for i in range(len(seqs)) if lengths[i] > 1]
    for i in range(len(seqs)):
        if lengths[i] == 1:  # nothing to predict: no forward pass for it
            out[i] = torch.zeros(0, dtype=torch.float32, device=device)
    rows = _linear_rows([lengths[i] for i in live], token_budget)
    for row in ([live[k] for k in r] for r in rows):
        width = max(lengths[i] for i in row)
        ids = torch.zeros((len(row), width), dtype=torch.long)
        attn = torch.zeros((len(row), width), dtype=torch.long)
        for r, i in enumerate(row):
            ids[r, : lengths[i]] = torch.tensor(seqs[i], dtype=torch.long)
            attn[r, : lengths[i]] = 1
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits  # [B, T, V]
        flat = logits.reshape(-1, logits.shape[-1])
        src, tgt, splits = [], [], []
        for r, i in enumerate(row):
            n = lengths[i] - 1
            src.extend(range(r * width, r * width + n))
            tgt.extend(seqs[i][1:])
            splits.append(n)
        lp = _gather_logprobs(
            flat,
            torch.tensor(src, dtype=torch.long, device=device),
            torch.tensor(tgt, dtype=torch.long, device=device),
        )
        for i, part in zip(row, torch.split(lp, splits)):
            out[i] = part
    return out  # type: ignore[return-value]


def token_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    packing: str = "tree",
    token_budget: int = 4096,
    device=None,
    fallback: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probs of each sequence under `model`.

    out[i][j] = log p(sequences[i][j+1] | sequences[i][:j+1]), fp32, shape [len(seq_i) - 1].
    A length-1 sequence gets an empty tensor. Differentiable: call under torch.no_grad()
    for reference log-probs.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    seqs = _check_sequences(sequences)
    dev = _model_device(model, device)
    # Tree packing is not implemented yet in this version; the linearized path is exact.
    return _linear_logprobs(model, seqs, token_budget, dev)
