"""The chunked output layer (train/chunked.py): the same numbers as the plain path (log-probs,
the full KL, the trainer's loss terms, and every gradient, tree and linear packing), and what
it is for: backward keeps [T, H] hidden states instead of fp32 [T, V] rows.

Tolerances. The chunked path runs the same operations per row as the plain one; the only
difference is that the output matmul and the KL's sums run over chunks of rows instead of all
rows at once, which changes the fp32 summation order. Log-probs here are O(10) in magnitude
and logits are sums of 32-64 products, so a reordering moves them by a few ulp of 10, ~1e-6;
measured differences are printed by the tests that compare them (typically 0-5e-7). The bound
1e-5 (abs) on values and 1e-5 (abs) + 1e-4 (rel) on gradients is 10-20x that noise, and far
below what a real mistake gives (a wrong row, a missing softcap or a dropped gradient term
moves values by > 1e-2).
"""

from __future__ import annotations

import random
import warnings

import pytest

from tests.bench import load_bench

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.train.test_packing import lora, steer_sequences, tiny_config  # noqa: E402
from train.chunked import LMHead, head_full_kl, head_token_logprobs  # noqa: E402
from train.losses import full_reference_kl  # noqa: E402
from train.logprobs import lm_head_of, token_logprobs  # noqa: E402

VAL_TOL = 1e-5


def tiny(seed=0, attn="eager", cls=None, config_cls=None, **kw):
    torch.manual_seed(seed)
    cls = cls or transformers.LlamaForCausalLM
    return cls(tiny_config(config_cls, attn=attn, **kw)).eval()


def grads_of(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        assert a[n].abs().max() > 0, n
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)


def loss_and_grads(m, seqs, masks, packing, fused, chunk=3, budget=4096):
    """-sum(logps) + full KL (reference = the adapter-disabled model, no grad)."""
    m.zero_grad(set_to_none=True)
    with torch.no_grad(), m.disable_adapter():
        _, ref = token_logprobs(m, seqs, packing=packing, token_budget=budget, dist_masks=masks, dist_states=True,
                                fused=fused, head_chunk=chunk)
    logps, dists = token_logprobs(m, seqs, packing=packing, token_budget=budget, dist_masks=masks, dist_states=True,
                                  fused=fused, head_chunk=chunk)
    kl = full_reference_kl(dists, ref)
    g = torch.Generator().manual_seed(1)
    loss = sum((lp * torch.rand(len(lp), generator=g)).sum() for lp in logps) + 3.0 * kl
    loss.backward()
    return [lp.detach() for lp in logps], kl.detach(), grads_of(m), dists


@pytest.mark.parametrize("packing,budget", [("tree", 4096), ("tree", 25), ("none", 4096), ("none", 30)])
def test_chunked_equals_plain_values_and_gradients(packing, budget):
    m = lora(tiny(seed=2))
    with torch.no_grad():  # a moved adapter: the KL is not 0 and has a gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    rng = random.Random(4)
    seqs = steer_sequences(rng, n_steers=4) + [[3, 4]]
    masks = [[rng.random() < 0.7 for _ in s[1:]] for s in seqs]
    lp_c, kl_c, g_c, dists = loss_and_grads(m, seqs, masks, packing, fused=True, budget=budget)
    lp_p, kl_p, g_p, plain_rows = loss_and_grads(m, seqs, masks, packing, fused=False, budget=budget)
    assert type(dists[0]).__name__ == "HeadStates" and isinstance(plain_rows[0], torch.Tensor)
    diff = max(float((a - b).abs().max()) for a, b in zip(lp_c, lp_p) if len(a))
    print(f"{packing}/{budget}: max |logp chunked - plain| = {diff:.2e}, kl {float(kl_c):.6f} vs {float(kl_p):.6f}")
    assert diff <= VAL_TOL
    assert float(kl_p) > 1e-3 and abs(float(kl_c) - float(kl_p)) <= VAL_TOL
    assert_grads_close(g_c, g_p)


def test_head_functions_against_plain_autograd_with_weight_and_bias_grads():
    """The autograd.Function alone, also where the head itself trains (weight and bias get
    gradients), with a softcap and more chunks than rows."""
    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(11, 8, dtype=torch.float64)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    src = torch.tensor([0, 3, 3, 10, 2, 7, 7, 7])
    tgt = torch.tensor([1, 49, 0, 5, 5, 2, 3, 4])
    for cap, chunk in ((None, 4), (5.0, 3), (None, 100)):
        head = LMHead(w, b, cap, chunk)
        got = head_token_logprobs(h, head, src, tgt)
        kl = head_full_kl(h, r, head)
        (got * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward(retain_graph=True)
        kl.sum().backward()
        g_got = [t.grad.clone() for t in (h, w, b)]
        for t in (h, w, b):
            t.grad = None
        z = h @ w.T + b
        with torch.no_grad():  # the reference side: no gradient, as in the trainer
            zr = r @ w.T + b
        if cap:
            z, zr = torch.tanh(z / cap) * cap, torch.tanh(zr / cap) * cap
        lp, lq = z.float().log_softmax(-1), zr.float().log_softmax(-1)
        want = lp[src, tgt]
        want_kl = (lp.exp() * (lp - lq)).sum(-1)
        (want * torch.arange(1.0, 9.0)).sum().backward(retain_graph=True)
        want_kl.sum().backward()
        torch.testing.assert_close(got, want, atol=VAL_TOL, rtol=0)
        torch.testing.assert_close(kl, want_kl, atol=VAL_TOL, rtol=0)
        for a, t in zip(g_got, (h, w, b)):
            torch.testing.assert_close(a, t.grad.to(a.dtype), atol=1e-5, rtol=1e-4)
            t.grad = None


@pytest.mark.parametrize("direction", ["forward", "symmetric"])
def test_head_full_kl_other_directions_against_plain_autograd(direction):
    """The forward and symmetric KLs chunked: values and gradients equal the materialised
    form written out here (not through `kl_rows`). The head computes its softmax in fp32
    whatever the input dtype, as the reference here does, so the bounds are the fp32 ones
    of the test above."""
    torch.manual_seed(1)
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 8, dtype=torch.float64)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    kl = head_full_kl(h, r, LMHead(w, None, None, 3), direction)
    kl.sum().backward()
    g = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    lp = (h @ w.T).float().log_softmax(-1)
    with torch.no_grad():
        lq = (r @ w.T).float().log_softmax(-1)
    fwd = (lq.exp() * (lq - lp)).sum(-1)
    want = fwd if direction == "forward" else fwd + (lp.exp() * (lp - lq)).sum(-1)
    want.sum().backward()
    torch.testing.assert_close(kl, want, atol=VAL_TOL, rtol=0)
    for a, t in zip(g, (h, w)):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="direction must be one of"):
        head_full_kl(h, r, LMHead(w, None, None, 3), "backward")


@pytest.mark.parametrize("direction", ["reverse", "forward", "symmetric"])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_frozen_head_kl_gradient_by_hand_equals_autograd(direction, cap):
    """With the output layer frozen (LoRA), `head_full_kl` computes each row's gradient in
    forward from the softmax Jacobian written by hand (no recomputation in backward). Values
    and the gradient reaching the hidden states equal the materialised form's autograd, with
    a bias, a softcap and uneven chunks; the per-row upstream gradients differ so that a
    gradient not scaled per row would show. fp32 bounds as above (the head's softmax is fp32)."""
    torch.manual_seed(2)
    h = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 8, dtype=torch.float64)
    w, b = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    up = torch.linspace(-1.0, 2.0, 9)
    kl = head_full_kl(h, r, LMHead(w, b, cap, 4), direction)
    assert type(kl.grad_fn).__name__ == "_KLHeadBackward"  # the by-hand path, not the recomputing one
    (kl * up).sum().backward()
    got = h.grad.clone()
    h.grad = None
    z, zr = h @ w.T + b, r @ w.T + b
    if cap:
        z, zr = torch.tanh(z / cap) * cap, torch.tanh(zr / cap) * cap
    lp, lq = z.float().log_softmax(-1), zr.detach().float().log_softmax(-1)
    rev, fwd = (lp.exp() * (lp - lq)).sum(-1), (lq.exp() * (lq - lp)).sum(-1)
    want = {"reverse": rev, "forward": fwd, "symmetric": rev + fwd}[direction]
    (want * up).sum().backward()
    torch.testing.assert_close(kl, want, atol=VAL_TOL, rtol=0)
    torch.testing.assert_close(got, h.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_frozen_head_token_logprob_gradient_by_hand_equals_autograd(cap):
    """With the output layer frozen, `head_token_logprobs` keeps ``(p * c) @ W`` per row from
    forward and gathers ``W_t`` in backward. Several edges read one row (a branch point),
    rows read by none, uneven chunks, a bias and a softcap; each edge has its own upstream
    gradient. Bounds: the fp32 ones of the tests above."""
    torch.manual_seed(3)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    src = torch.tensor([9, 0, 3, 3, 3, 7, 2, 2])
    tgt = torch.tensor([1, 39, 0, 5, 5, 2, 3, 4])
    up = torch.linspace(-2.0, 1.5, 8)
    got = head_token_logprobs(h, LMHead(w, b, cap, 3), src, tgt)
    assert type(got.grad_fn.next_functions[0][0]).__name__ == "_TokenHeadBackward"
    (got * up).sum().backward()
    g = h.grad.clone()
    h.grad = None
    z = h @ w.T + b
    if cap:
        z = torch.tanh(z / cap) * cap
    want = z.float().log_softmax(-1)[src, tgt]
    (want * up).sum().backward()
    torch.testing.assert_close(got, want, atol=VAL_TOL, rtol=0)
    torch.testing.assert_close(g, h.grad, atol=1e-5, rtol=1e-4)


def test_softcapped_head_is_chunked_and_exact():
    """Gemma-2 caps its logits after the output layer; `LMHead` applies the same cap."""
    m = tiny(cls=transformers.Gemma2ForCausalLM, config_cls=transformers.Gemma2Config, head_dim=8,
             final_logit_softcapping=0.05, sliding_window=512, query_pre_attn_scalar=8)
    found = lm_head_of(m)
    assert found is not None and found[1].softcap == 0.05
    seqs = steer_sequences(random.Random(1), n_steers=3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the tap's check passed
        a = token_logprobs(m, seqs, head_chunk=4)
        b = token_logprobs(m, seqs, fused=False)
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    assert diff <= VAL_TOL
    # without the cap the numbers are different: the check above has teeth
    with torch.no_grad():
        m.config.final_logit_softcapping = None
        c = token_logprobs(m, seqs, fused=False)
    assert max(float((x - y).abs().max()) for x, y in zip(b, c)) > 1e-2


def test_a_model_that_rescales_its_logits_falls_back_to_the_plain_path():
    """Cohere multiplies the output layer's logits by ``logit_scale``: the tap's check sees
    that, warns once, and the plain path gives the model's own numbers."""
    m = tiny(cls=transformers.CohereForCausalLM, config_cls=transformers.CohereConfig, logit_scale=0.25)
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]]
    with torch.no_grad():
        with pytest.warns(UserWarning, match="chunked log-probs off"):
            got = token_logprobs(m, seqs)
        want = token_logprobs(m, seqs, fused=False)
        for s, g, w in zip(seqs, got, want):
            ref = m(input_ids=torch.tensor([s])).logits[0, :-1].float().log_softmax(-1)
            torch.testing.assert_close(g, ref[torch.arange(len(s) - 1), torch.tensor(s[1:])], atol=1e-5, rtol=0)
            assert torch.equal(g, w)
        assert lm_head_of(m) is None  # remembered: no second warning, no second try
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            token_logprobs(m, seqs)


def test_trainer_loss_terms_equal_with_and_without_chunking(monkeypatch, tmp_path):
    """SFT + DPO + RPO + full KL through SteerTrainer.compute_loss: loss, metrics and LoRA
    gradients with the chunked head equal the plain path's."""
    from tests.train.tiny import synthetic_tree, tiny_llama
    from train import logprobs
    from train.config import make_config
    from train.data import DataOptions, build_task
    from train.model_setup import build_peft_model
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    cfg = make_config(data=["x"], out=str(tmp_path), objective="sft+dpo", lora_r=4, lora_dropout=0.0,
                      kl_weight=2.0, rpo_alpha=0.5, progress=False)
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(2)]
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2)
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    real = logprobs.lm_head_of
    out = {}
    for mode in ("chunked", "plain"):
        if mode == "plain":
            monkeypatch.setattr(logprobs, "lm_head_of", lambda *a, **k: None)
        else:
            monkeypatch.setattr(logprobs, "lm_head_of", lambda m, chunk=None: real(m, 5))
        model.zero_grad(set_to_none=True)
        trainer._metrics.clear()
        loss = trainer.compute_loss(model, {"tasks": tasks})
        loss.backward()
        out[mode] = (float(loss), {k: v[-1] for k, v in trainer._metrics.items()}, grads_of(model))
    (lc, mc, gc), (lpl, mpl, gpl) = out["chunked"], out["plain"]
    assert {"sft_loss", "dpo_loss", "rpo_loss", "kl"} <= mc.keys() and mc["kl"] > 1e-4
    assert lc == pytest.approx(lpl, abs=VAL_TOL)
    for k in mc:
        assert mc[k] == pytest.approx(mpl[k], abs=VAL_TOL), k
    assert_grads_close(gc, gpl)


def _bench():
    return load_bench("logits_memory")


def test_saved_bytes_scale_with_tokens_not_vocab():
    """bench/logits_memory.py's measurement, small: on the head path the plain loss saves
    ~3 x T x V x 4 bytes; the chunked one saves a few hidden-sized rows per token, whatever V."""
    bench = _bench()
    res = {(t, v): bench.measure(t, v, 32, "cpu") for t in (64, 128) for v in (2048, 8192)}
    for (t, v), r in res.items():
        before, after = r["before"]["head"], r["after"]["head"]
        assert before >= 2.9 * t * v * 4, (t, v, before)  # the 3 x T x V x 4 of the issue
        assert after * 8 <= before, (t, v, before, after)
        assert r["after"]["ref_held"] * 8 <= r["before"]["ref_held"]
    # after: independent of V, linear in T
    assert res[(128, 2048)]["after"]["head"] == res[(128, 8192)]["after"]["head"]
    assert res[(128, 2048)]["after"]["head"] == pytest.approx(2 * res[(64, 2048)]["after"]["head"], rel=0.02)


def test_logp_masks_compute_only_the_flagged_log_probs_and_keep_their_values_and_gradients(monkeypatch):
    """``logp_masks``: flagged log-probs (and their gradients) equal the unmasked call's, the
    others are 0, and the output layer runs on the rows the flagged edges read, no others
    (what makes it cheaper; counted at `head_token_logprobs`)."""
    from train import logprobs

    m = lora(tiny(seed=4))
    seqs = steer_sequences(random.Random(5), n_steers=3)
    rng = random.Random(6)
    read = [[rng.random() < 0.3 for _ in range(len(s) - 1)] for s in seqs]
    read[0] = [False] * (len(seqs[0]) - 1)  # a sequence none of whose log-probs is read
    rows_seen = []
    real = logprobs.head_token_logprobs

    def counting(hidden, head, src, tgt):
        rows_seen.append(int(hidden.shape[0]))
        return real(hidden, head, src, tgt)

    monkeypatch.setattr(logprobs, "head_token_logprobs", counting)
    out = {}
    for mode in ("all", "masked"):
        m.zero_grad(set_to_none=True)
        rows_seen.clear()
        lps = token_logprobs(m, seqs, head_chunk=3, logp_masks=read if mode == "masked" else None)
        sum((lp * torch.tensor(f, dtype=torch.float32) * (1 + torch.arange(len(lp)))).sum()
            for lp, f in zip(lps, read)).backward()
        out[mode] = ([lp.detach() for lp in lps], grads_of(m), sum(rows_seen))
    (full, g_full, rows_full), (masked, g_masked, rows_masked) = out["all"], out["masked"]
    zeros = 0
    for lp_f, lp_m, f in zip(full, masked, read):
        f = torch.tensor(f)
        torch.testing.assert_close(lp_m[f], lp_f[f], atol=VAL_TOL, rtol=0)
        # unflagged: 0, or the value where another sequence through the same prefix flagged it
        rest = lp_m[~f]
        assert ((rest == 0) | ((rest - lp_f[~f]).abs() <= VAL_TOL)).all()
        zeros += int((rest == 0).sum())
    assert zeros > 0
    assert_grads_close(g_masked, g_full)
    # distinct (row) positions read: a shared prefix is one row of the tree
    assert 0 < rows_masked < rows_full / 2, (rows_masked, rows_full)


@pytest.mark.parametrize("opts", [
    {"objective": "dpo"},  # the defaults: DPO spans + full KL
    {"objective": "sft+dpo", "kl_mode": "token", "first_token_weight": 3.0},
    {"objective": "dpo", "loss_type": "orpo", "length_normalize": True, "chosen_continuation": 2},
    {"objective": "sft", "kl_mode": "token", "model_token_weight": 0.3},
    {"objective": "dpo", "rejected_tokens": 5},
], ids=["defaults", "sft-token-kl-first-weight", "orpo-continuation", "sft-model-weight", "rejected-5"])
def test_the_trainer_reads_only_log_probs_it_asked_for(monkeypatch, tmp_path, opts):
    """The trainer asks `token_logprobs` for the log-probs its loss reads (`Batch.logp_masks`),
    the policy's and the reference cache's. Loss, metrics and LoRA gradients must equal a run
    that computes every log-prob: a loss term that read an unrequested position (0 there)
    would move them by far more than the bound (see the module docstring)."""
    from tests.train.tiny import synthetic_tree, tiny_llama
    from train.batching import Batch
    from train.config import make_config
    from train.data import DataOptions, build_task
    from train.model_setup import build_peft_model
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    data_keys = ("chosen_continuation", "rejected_tokens", "model_token_weight")
    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.0, kl_weight=2.0, progress=False,
                      **opts)
    dopts = DataOptions(**{k: v for k, v in opts.items() if k in data_keys})
    tasks = [build_task(synthetic_tree(f"t{i}", i, n_steers=3), dopts) for i in range(2)]
    assert all(t.pairs for t in tasks)
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2)
    real = Batch.logp_masks
    out = {}
    for mode in ("masked", "all"):
        if mode == "all":
            monkeypatch.setattr(Batch, "logp_masks",
                                lambda self, **k: [[True] * len(f) for f in real(self, **k)])
        trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path / mode),
                               train_dataset=TaskDataset(tasks), steer_config=cfg)
        trainer.prepare_reference(tasks)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, {"tasks": tasks})
        loss.backward()
        out[mode] = (float(loss), {k: v[-1] for k, v in trainer._metrics.items()}, grads_of(model))
    (lm, mm, gm), (la, ma, ga) = out["masked"], out["all"]
    assert lm == pytest.approx(la, abs=VAL_TOL) and abs(la) > 1e-3
    assert mm.keys() == ma.keys()
    for k in ma:
        assert mm[k] == pytest.approx(ma[k], abs=VAL_TOL), k
    assert_grads_close(gm, ga)
