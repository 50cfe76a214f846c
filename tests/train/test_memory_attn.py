"""Gradient checkpointing with tree packing (the 4D ancestor mask and the depth position ids
survive the recomputation: same gradients), and --attn-impl: eager, sdpa and flex agree on a
tree-packed row; what FlexAttention cannot do on the CPU is refused with the reason, not
skipped."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.train.test_packing import lora, steer_sequences, tiny_config, tiny_llama  # noqa: E402
from train.config import ConfigError  # noqa: E402
from train.logprobs import token_logprobs  # noqa: E402
from train.model_setup import resolve_attn_impl  # noqa: E402

TOL = 1e-5  # fp32 noise of the same computation run twice (see test_memory_logits)


def grads(m, seqs, weights):
    m.zero_grad(set_to_none=True)
    out = token_logprobs(m, seqs, packing="tree", token_budget=4096)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradient_checkpointing_with_tree_packing_gives_the_same_gradients(attn):
    rng = random.Random(3)
    seqs = steer_sequences(rng, n_steers=5)
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(len(s) - 1, generator=g) for s in seqs]
    base = tiny_llama(seed=1, attn=attn)
    m = lora(base)
    m.train()
    lp0, g0 = grads(m, seqs, weights)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    calls = []
    hook = base.model.layers[0].self_attn.register_forward_hook(lambda mod, i, o: calls.append(1))
    lp1, g1 = grads(m, seqs, weights)
    hook.remove()
    assert len(calls) == 2  # the layer really ran again in backward (checkpointing is on)
    assert max(float((a - b).abs().max()) for a, b in zip(lp0, lp1)) <= TOL
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=TOL, rtol=1e-4, msg=n)


def test_eager_and_sdpa_agree_on_a_tree_row_forward_and_backward():
    rng = random.Random(8)
    seqs = steer_sequences(rng, n_steers=4)
    g = torch.Generator().manual_seed(2)
    weights = [torch.rand(len(s) - 1, generator=g) for s in seqs]
    res = {}
    for attn in ("eager", "sdpa"):
        m = lora(tiny_llama(seed=5, attn=attn))
        res[attn] = grads(m, seqs, weights)
    (le, ge), (ls, gs) = res["eager"], res["sdpa"]
    assert max(float((a - b).abs().max()) for a, b in zip(le, ls)) <= 1e-4
    for n in ge:
        torch.testing.assert_close(gs[n], ge[n], atol=1e-4, rtol=1e-3, msg=n)


def test_flex_forward_agrees_and_its_missing_cpu_backward_is_refused():
    """FlexAttention runs forward on the CPU (compiled, ~1 min here) and must equal eager on
    a tree row; its backward exists only on GPUs, so on the CPU `--attn-impl flex` is refused
    with that reason and the raw backward raises (both asserted, nothing skipped). The GPU
    forward + backward comparison is in bench/gpu_check.py."""
    seqs = steer_sequences(random.Random(5), n_steers=2)
    m = tiny_llama(attn="flex_attention")
    with torch.no_grad():
        flex = token_logprobs(m, seqs)
        m.set_attn_implementation("eager")
        eager = token_logprobs(m, seqs)
    assert max(float((a - b).abs().max()) for a, b in zip(flex, eager)) <= 1e-4
    with pytest.raises(ConfigError, match="no backward on cpu"):
        resolve_attn_impl(m, "flex", "cpu")
    m.set_attn_implementation("flex_attention")
    m.train()
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        sum(o.sum() for o in token_logprobs(m, seqs)).backward()


def test_auto_attention_choice_per_model_and_device():
    llama = tiny_llama()
    assert resolve_attn_impl(llama, "auto", "cpu") == "sdpa"
    assert resolve_attn_impl(llama, "auto", "cuda") == "sdpa"
    assert resolve_attn_impl(llama, "eager", "cpu") == "eager"
    assert resolve_attn_impl(llama, "flex", "cuda") == "flex_attention"
    gemma = transformers.Gemma2ForCausalLM(tiny_config(transformers.Gemma2Config, head_dim=8, sliding_window=512,
                                                       attn_logit_softcapping=50.0))
    assert resolve_attn_impl(gemma, "auto", "cpu") == "eager"  # SDPA cannot softcap scores
    assert resolve_attn_impl(gemma, "auto", "cuda") == "flex_attention"
    with pytest.raises(ConfigError, match="softcaps attention"):
        resolve_attn_impl(gemma, "sdpa", "cpu")
