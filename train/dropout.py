"""LoRA dropout that draws only the dropped positions.

peft applies ``nn.Dropout(p)`` to the input of every adapted projection, and on a CPU
``nn.Dropout`` draws one Bernoulli number per element: at ``p = 0.05`` that was 12% of a
SmolLM2 training step on 2 cores (`bench/train_step.py`, profiled). `SparseDropout` draws
the same mask from the gaps between dropped positions instead: i.i.d. Bernoulli(p) flags are
exactly a sequence of i.i.d. Geometric(p) gaps, ``P(gap = k) = (1 - p)^(k - 1) p``, and a
gap is ``floor(log U / log(1 - p)) + 1`` for one uniform ``U``. So it draws about ``p * n``
numbers instead of ``n``; kept elements are scaled by ``1 / (1 - p)`` as ``nn.Dropout``
does, and eval mode is the identity. On a GPU it calls the fused ``F.dropout``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseDropout", "dropped_positions", "use_sparse_dropout"]


def dropped_positions(n: int, p: float, device=None, generator: torch.Generator | None = None) -> Tensor:
    """The positions in ``range(n)`` an i.i.d. Bernoulli(``p``) mask drops, in order (int64)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    scale = 1.0 / math.log1p(-p)  # < 0
    parts, end = [], -1
    while True:
        mean = (n - 1 - end) * p
        m = int(mean + 6.0 * math.sqrt(mean + 1.0)) + 16  # enough gaps to pass n almost always
        u = 1.0 - torch.rand(m, device=device, generator=generator, dtype=torch.float64)  # (0, 1]
        gaps = torch.floor(torch.log(u) * scale).to(torch.int64) + 1
        pos = torch.cumsum(gaps, 0) + end
        parts.append(pos)
        end = int(pos[-1])
        if end >= n:
            break
    pos = torch.cat(parts)
    return pos[pos < n]


class SparseDropout(nn.Module):
    """``nn.Dropout(p)`` (same distribution, same scaling, identity in eval mode) whose mask is
    drawn from its dropped positions (`dropped_positions`)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.numel() == 0:
            return x
        if x.device.type != "cpu":  # a GPU's fused dropout is fast, and the loop here would sync
            return F.dropout(x, self.p, training=True)
        mask = torch.full((x.numel(),), 1.0 / (1.0 - self.p), dtype=x.dtype, device=x.device)
        mask[dropped_positions(x.numel(), self.p, device=x.device)] = 0.0
        return x * mask.view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_sparse_dropout(model) -> int:
    """Replace every ``nn.Dropout`` of the model's LoRA layers (peft's ``lora_dropout``) by a
    `SparseDropout` of the same ``p``; returns how many were replaced."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, d in drops.items():
            if type(d) is nn.Dropout and 0 < d.p < 1:  # p = 1 drops everything: nn.Dropout does it
                drops[name] = SparseDropout(d.p)
                n += 1
    return n
