"""`train.dropout.SparseDropout`: peft's LoRA dropout drawn from its dropped positions. It
must be nn.Dropout's distribution exactly (i.i.d. Bernoulli(p) flags, kept values scaled by
1/(1-p)), not roughly.

Bounds: every draw is seeded, so the tests are deterministic; the statistical checks allow 5
standard deviations of the quantity they test (computed from the binomial variance of that
many draws), so a correct sampler passes with any seed, and a sampler off by a few percent
in rate or in pair correlation fails (each check's sd is well under 1% of its mean).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from train.dropout import SparseDropout, dropped_positions, use_sparse_dropout  # noqa: E402


def within(observed: float, expected: float, sd: float) -> bool:
    return abs(observed - expected) <= 5 * sd


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropped_positions_are_independent_bernoulli_flags(p):
    g = torch.Generator().manual_seed(1)
    n = 2_000_000
    pos = dropped_positions(n, p, generator=g)
    assert pos.dtype == torch.int64 and int(pos.min()) >= 0 and int(pos.max()) < n
    assert bool((torch.diff(pos) > 0).all())  # sorted, no position twice
    rate = len(pos) / n
    assert within(rate, p, math.sqrt(p * (1 - p) / n)), rate
    flags = torch.zeros(n, dtype=torch.bool)
    flags[pos] = True
    pairs = float((flags[1:] & flags[:-1]).float().mean())  # adjacent flags: p^2 if independent
    assert within(pairs, p * p, math.sqrt(p * p * (1 - p * p) / (n - 1) * 3)), (pairs, p * p)


def test_dropped_counts_of_short_rows_follow_the_binomial():
    """Many short rows: the number dropped per row has the Binomial(7, p) distribution, so the
    row's ends (the first gap, the cut at n) are drawn right too."""
    g = torch.Generator().manual_seed(2)
    n, p, rows = 7, 0.3, 20_000
    counts = torch.tensor([len(dropped_positions(n, p, generator=g)) for _ in range(rows)])
    for k in range(n + 1):
        pk = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        freq = float((counts == k).float().mean())
        assert within(freq, pk, math.sqrt(pk * (1 - pk) / rows)), (k, freq, pk)


def test_sparse_dropout_keeps_scales_and_passes_gradients_like_nn_dropout():
    torch.manual_seed(3)
    p = 0.2
    x = torch.randn(4, 50, 24, requires_grad=True)
    d = SparseDropout(p).train()
    y = d(x)
    dropped = y == 0
    assert 0 < int(dropped.sum()) < x.numel()
    torch.testing.assert_close(y[~dropped], (x / (1 - p))[~dropped], rtol=1e-6, atol=0)
    y.backward(torch.ones_like(y))
    expect = torch.where(dropped, 0.0, 1 / (1 - p))
    torch.testing.assert_close(x.grad, expect, rtol=1e-6, atol=0)
    assert d.eval()(x) is x
    assert SparseDropout(0.0).train()(x) is x


def test_peft_models_get_sparse_dropout_of_the_same_p(tmp_path):
    pytest.importorskip("peft")
    from tests.train.tiny import tiny_llama
    from train.config import make_config
    from train.model_setup import build_peft_model

    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.05)
    model = build_peft_model(tiny_llama(), cfg)
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, SparseDropout) and d.p == 0.05 for d in drops)
    none = build_peft_model(tiny_llama(), make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.0))
    assert use_sparse_dropout(none) == 0
