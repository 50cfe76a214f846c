"""Loss functions against values computed by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from train.losses import (  # noqa: E402
    chosen_nll,
    dpo_loss,
    dpo_metrics,
    full_reference_kl,
    log_odds,
    pad_logps,
    reference_kl,
    span_logps,
    weighted_nll,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_weighted_nll_sequence_and_token_normalization():
    logps = t([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    w = t([[0, 1, 1], [1, 0, 0]])
    # per sequence: (2+3)/2 = 2.5 and 0.5/1 = 0.5 -> mean 1.5
    assert weighted_nll(logps, w).item() == pytest.approx(1.5)
    # per token: (2 + 3 + 0.5) / 3
    assert weighted_nll(logps, w, normalize="token").item() == pytest.approx(5.5 / 3)


def test_weighted_nll_fractional_weights_and_empty_sequences():
    logps = t([[-1.0, -2.0], [-4.0, -4.0]])
    w = t([[1.0, 0.5], [0.0, 0.0]])
    # (1*1 + 0.5*2) / 1.5; the all-zero row is skipped, not averaged in as 0
    assert weighted_nll(logps, w).item() == pytest.approx(2.0 / 1.5)
    zero = weighted_nll(logps, torch.zeros_like(w))
    assert zero.item() == 0.0


def test_weighted_nll_rejects_shape_mismatch_and_bad_mode():
    with pytest.raises(ValueError, match="logps"):
        weighted_nll(t([[0.0]]), t([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="normalize"):
        weighted_nll(t([[0.0]]), t([[1.0]]), normalize="batch")


def test_pad_and_span_logps():
    a, b = t([0.0, -1.0, -2.0, -3.0]), t([-0.25, -0.5])
    padded = pad_logps([a, b])
    assert padded.shape == (2, 4) and padded[1].tolist() == [-0.25, -0.5, 0.0, 0.0]
    sums, lens = span_logps([a, b], [(1, 3), (0, 2)])
    assert sums.tolist() == [-3.0, -0.75]
    assert lens.tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="outside"):
        span_logps([b], [(1, 3)])


def test_dpo_sigmoid_by_hand():
    # h = (-2 - -2.5) - (-3 - -2.5) = 0.5 + 0.5 = 1 ; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    pc = t([-2.0]).requires_grad_()
    out = dpo_loss(pc, t([-3.0]), t([-2.5]), t([-2.5]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.rejected_rewards.item() == pytest.approx(-0.05)
    assert out.margins.item() == pytest.approx(0.1)
    out.losses.sum().backward()
    # d/dpc -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))
    m = dpo_metrics(out)
    assert m["rewards/accuracy"] == 1.0 and m["rewards/margin"] == pytest.approx(0.1)


def test_dpo_label_smoothing_and_ipo_by_hand():
    args = (t([-2.0]), t([-3.0]), t([-2.5]), t([-2.5]))
    ls = dpo_loss(*args, beta=0.1, label_smoothing=0.1).losses.item()
    assert ls == pytest.approx(0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)))
    # IPO: (h - 1/(2 beta))^2 = (1 - 5)^2
    assert dpo_loss(*args, beta=0.1, loss_type="ipo").losses.item() == pytest.approx(16.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)


def test_first_token_weight_scales_only_the_first_span_token():
    a = t([0.0, -1.0, -2.0, -3.0])
    # span (1, 3) holds -1 (the first divergent token) and -2: 3 * -1 + -2
    assert span_logps([a], [(1, 3)], first_weight=3.0)[0].item() == pytest.approx(-5.0)
    assert span_logps([a], [(2, 2)], first_weight=3.0)[0].item() == 0.0  # an empty span stays 0


def test_apo_zero_by_hand():
    # chosen reward beta*(pc - rc) = 0.1 * 0.5, rejected 0.1 * -0.5:
    # (1 - sigmoid(0.05)) + sigmoid(-0.05) = 2 * sigmoid(-0.05)
    pc = t([-2.0]).requires_grad_()
    out = dpo_loss(pc, t([-3.0]), t([-2.5]), t([-2.5]), beta=0.1, loss_type="apo_zero")
    assert out.losses.item() == pytest.approx(2 / (1 + math.exp(0.05)))
    out.losses.sum().backward()
    # d/dpc (1 - sigmoid(beta x)) = -beta sigmoid(beta x) (1 - sigmoid(beta x)): anchored, not relative:
    # raising the chosen lowers the loss whatever the rejected does
    s = 1 / (1 + math.exp(-0.05))
    assert pc.grad.item() == pytest.approx(-0.1 * s * (1 - s))


def test_orpo_by_hand_ignores_the_reference():
    # chosen span: 2 tokens, sum -1 -> mean m = -0.5, p = e^-0.5; rejected: 1 token, m = -2
    pc, pr, lens = t([-1.0]), t([-2.0]), (t([2.0]), t([1.0]))

    def odds(m):
        return math.log(math.exp(m) / (1 - math.exp(m)))

    assert log_odds(pc, lens[0]).item() == pytest.approx(odds(-0.5))
    want = -0.1 * math.log(1 / (1 + math.exp(-(odds(-0.5) - odds(-2.0)))))
    for ref in (t([0.0]), t([-9.0])):  # reference-free
        out = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type="orpo", lengths=lens)
        assert out.losses.item() == pytest.approx(want)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, pc, pr, loss_type="orpo")
    # p -> 1 (mean log-prob 0) stays finite
    assert math.isfinite(log_odds(t([0.0]), t([3.0])).item())


def test_dpo_zero_when_policy_equals_reference():
    # at initialization (adapter = identity) every steer has loss log 2 and margin 0
    x = t([-1.0, -7.0])
    out = dpo_loss(x, x + 1, x, x + 1, beta=0.5)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert dpo_metrics(out)["rewards/accuracy"] == 0.0


def test_chosen_nll_is_per_steer_mean():
    assert chosen_nll(t([-6.0, -1.0]), t([3.0, 1.0])).tolist() == [2.0, 1.0]


def test_reference_kl_k3_by_hand():
    pol = t([[math.log(2.0), 0.0, -5.0]])
    ref = t([[0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0]])
    # k3(d) = e^d - 1 - d: d=log2 -> 1 - log 2 ; d=0 -> 0 ; third token masked
    assert reference_kl(pol, ref, mask).item() == pytest.approx((1 - math.log(2)) / 2)
    assert reference_kl(pol, ref, torch.zeros_like(mask)).item() == 0.0
    # non-negative for any difference
    d = torch.linspace(-5, 5, 11, dtype=torch.float64)[None]
    assert reference_kl(d, torch.zeros_like(d), torch.ones_like(d)).item() >= 0


def test_full_reference_kl_by_hand_and_zero_at_the_reference():
    p = torch.log(t([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    q = torch.log(t([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]]))
    row0 = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)  # KL(p||q) of the first row
    # mean over all positions of both sequences: (row0 + 0) / 2, then the empty one adds none
    assert full_reference_kl([p, p[:0]], [q, q[:0]]).item() == pytest.approx(row0 / 2)
    assert full_reference_kl([q], [q]).item() == pytest.approx(0.0)
    # a policy that moves mass onto a token the reference almost never writes pays for it
    eos_up = torch.log(t([[0.45, 0.25, 0.2, 0.1]]))
    ref = torch.log(t([[0.5, 0.25, 0.25 - 1e-6, 1e-6]]))
    assert full_reference_kl([eos_up], [ref]).item() > 0.9


def test_full_reference_kl_forward_and_symmetric_by_hand():
    """KL(q ‖ p) and KL(p ‖ q) + KL(q ‖ p) of the rows above; the forward KL is the one that
    notices a policy dropping a token the reference writes (here from 0.25 to 1e-6)."""
    p = torch.log(t([[0.5, 0.25, 0.25]]))
    q = torch.log(t([[0.25, 0.25, 0.5]]))
    rev = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    fwd = 0.25 * math.log(0.5) + 0.5 * math.log(2)
    assert full_reference_kl([p], [q], "forward").item() == pytest.approx(fwd)
    assert full_reference_kl([p], [q], "symmetric").item() == pytest.approx(rev + fwd)
    dropped = torch.log(t([[0.75 - 1e-6, 0.25, 1e-6]]))
    ref = torch.log(t([[0.5, 0.25, 0.25]]))
    f, r = (full_reference_kl([dropped], [ref], d).item() for d in ("forward", "reverse"))
    assert f > 2.5 and r < 0.31  # forward: 0.25 * log(0.25 / 1e-6) dominates; reverse barely sees it
    with pytest.raises(ValueError, match="KL direction must be one of"):
        full_reference_kl([p], [q], "backward")


def test_full_reference_kl_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="1 policy vs 2 reference"):
        full_reference_kl([t([[0.0]])], [t([[0.0]]), t([[0.0]])])
    with pytest.raises(ValueError, match="shapes differ"):
        full_reference_kl([t([[0.0, 0.0]])], [t([[0.0]])])
    assert full_reference_kl([], []).item() == 0.0
