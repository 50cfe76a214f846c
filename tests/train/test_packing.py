"""train.packing + train.logprobs: tree-packed log-probs equal the linearized ones (values and LoRA
gradients), no leakage between branches, and the packing plan's rows, positions and masks
are right at trie and row boundaries."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from train.logprobs import TreePackingUnsupported, ancestor_mask, check_tree_packing, token_logprobs  # noqa: E402
from train.packing import pack_stats, plan_packing  # noqa: E402

VOCAB = 64
TOL = 1e-4


def tiny_config(cls=None, attn: str = "eager", **kw):
    cls = cls or transformers.LlamaConfig
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    base.update(kw)
    cfg = cls(**base)
    cfg._attn_implementation = attn
    return cfg


def tiny_llama(seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(attn=attn)).eval()


def lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so both A and B get non-zero gradients.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def reference_logprobs(model, seq):
    """One unpadded, unpacked forward of one sequence: the ground truth."""
    logits = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return logits[:-1].gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)


def steer_sequences(rng: random.Random, n_steers: int = 6, prompt: int = 6, gen: int = 30):
    """What the trainer builds from a steer tree: SFT paths, prefix+chosen, prefix+rejected."""
    path = [rng.randrange(VOCAB) for _ in range(prompt + gen)]
    seqs = [path]
    for _ in range(n_steers):
        cut = rng.randrange(prompt, prompt + gen)
        k = rng.randint(1, 5)
        seqs.append(path[:cut] + path[cut : cut + k])  # chosen (on the path)
        seqs.append(path[:cut] + [rng.randrange(VOCAB) for _ in range(k)])  # rejected
    at = rng.randrange(1, len(path))
    seqs.append(path[:at] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))])
    return seqs


def max_diff(a, b) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if len(x)), default=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llama(attn="sdpa")


# --------------------------------------------------------------------------- exactness


def test_linear_matches_one_forward_per_sequence(model):
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [5, 5]]
    with torch.no_grad():
        out = token_logprobs(model, seqs, packing="none", token_budget=12)
        for s, o in zip(seqs, out):
            assert o.shape == (len(s) - 1,) and o.dtype == torch.float32
            assert torch.allclose(o, reference_logprobs(model, s), atol=1e-5)


@pytest.mark.parametrize("budget", [4096, 40, 7])
@pytest.mark.parametrize("which", ["model", "sdpa_model"])
def test_tree_matches_one_forward_per_sequence(which, budget, request):
    m = request.getfixturevalue(which)
    seqs = steer_sequences(random.Random(budget)) + [[3], [3, 4], [3, 4], [60, 61, 62]]
    with torch.no_grad():
        out = token_logprobs(m, seqs, packing="tree", token_budget=budget)
        ref = [reference_logprobs(m, s) if len(s) > 1 else torch.zeros(0) for s in seqs]
    assert [len(o) for o in out] == [len(s) - 1 for s in seqs]
    assert max_diff(out, ref) <= TOL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=10),
    budget=st.integers(1, 60),
)
def test_tree_equals_linear_random(model, seqs, budget):
    # A 4-letter alphabet makes shared prefixes, duplicates and prefix-of-another common.
    with torch.no_grad():
        tree = token_logprobs(model, seqs, packing="tree", token_budget=budget)
        lin = token_logprobs(model, seqs, packing="none", token_budget=budget)
    assert [len(t) for t in tree] == [len(s) - 1 for s in seqs]
    assert max_diff(tree, lin) <= TOL


def _lora_grads(m, seqs, packing, weights, budget, logprobs_out=None):
    m.zero_grad(set_to_none=True)
    out = token_logprobs(m, seqs, packing=packing, token_budget=budget)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    loss.backward()
    if logprobs_out is not None:
        logprobs_out.extend(o.detach() for o in out)
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn,budget", [("eager", 4096), ("sdpa", 25)])
def test_lora_gradients_equal(attn, budget):
    m = lora(tiny_llama(seed=3, attn=attn))
    rng = random.Random(7)
    seqs = steer_sequences(rng, n_steers=5)
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(len(s) - 1, generator=g) for s in seqs]
    tree = _lora_grads(m, seqs, "tree", weights, budget)
    lin = _lora_grads(m, seqs, "none", weights, budget)
    assert tree.keys() == lin.keys() and any("lora_A" in n for n in tree) and any("lora_B" in n for n in tree)
    for n in tree:
        assert tree[n].abs().max() > 0, n
        assert torch.allclose(tree[n], lin[n], atol=TOL, rtol=1e-4), (n, float((tree[n] - lin[n]).abs().max()))


# --------------------------------------------------------------------------- leakage


@pytest.mark.parametrize("which", ["model", "sdpa_model"])
def test_no_leakage_between_sibling_branches(which, request):
    m = request.getfixturevalue(which)
    prefix = [5, 6, 7, 8]
    a = prefix + [10, 11, 12, 13]
    b = prefix + [20, 21, 22]
    b2 = prefix + [30, 31, 32, 33, 34, 35]  # the sibling branch changed (and longer)
    c = [40, 41, 42]  # another trie in the same row
    with torch.no_grad():
        one = token_logprobs(m, [a, b, c], packing="tree")
        two = token_logprobs(m, [a, b2, c], packing="tree")
        assert plan_packing([a, b, c]).rows.__len__() == 1  # really one packed row
        assert torch.allclose(one[0], two[0], atol=1e-6)
        assert torch.allclose(one[2], two[2], atol=1e-6)
        # ...and the shared prefix is what the sibling sees: its first tokens agree.
        assert torch.allclose(one[1][:3], two[1][:3], atol=1e-6)
        assert not torch.allclose(one[1][3:], two[1][3:6])


def test_a_causal_mask_would_leak(model, monkeypatch):
    """The leakage test can fail: with a plain causal mask the result changes."""
    import train.logprobs as logprobs

    def causal(end, dtype):
        n = end.shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    seqs = [[5, 6, 7, 10, 11], [5, 6, 7, 20, 21, 22]]
    with torch.no_grad():
        good = token_logprobs(model, seqs)
        monkeypatch.setattr(logprobs, "ancestor_mask", causal)
        bad = token_logprobs(model, seqs)
    assert torch.allclose(good[0], bad[0])  # the first branch precedes the second in DFS
    assert not torch.allclose(good[1][2:], bad[1][2:], atol=1e-3)


# --------------------------------------------------------------------------- plan / masks


def _brute_ancestors(parent: np.ndarray) -> np.ndarray:
    n = len(parent)
    allowed = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j = i
        while j >= 0:
            allowed[i, j] = True
            j = parent[j]
    return allowed


def _check_plan(seqs, budget):
    plan = plan_packing(seqs, token_budget=budget)
    flat_rows = []
    for row in plan.rows:
        n = len(row)
        assert len(row.child) >= 1  # every row predicts at least one token
        assert row.depth[0] == 0 and row.parent[0] == -1  # a row starts at a trie root
        roots = row.parent < 0
        assert (row.depth[roots] == 0).all()
        nonroot = ~roots
        assert (row.parent[nonroot] < np.flatnonzero(nonroot)).all()  # ancestors first (DFS)
        assert (row.depth[nonroot] == row.depth[row.parent[nonroot]] + 1).all()
        mask = ancestor_mask(torch.from_numpy(row.end), torch.float32)[0, 0] == 0
        assert mask.shape == (n, n)
        assert (mask.numpy() == _brute_ancestors(row.parent)).all()
        # a trie forest: siblings (and roots) have different tokens
        pairs = set(zip(row.parent.tolist(), row.tokens.tolist()))
        assert len(pairs) == n
        flat_rows.append(row)
    # each sequence reads its own tokens: follow seq_index back to nodes
    offsets = np.cumsum([0] + [len(r.child) for r in flat_rows])
    start = 0
    for s, count in zip(seqs, plan.seq_counts):
        assert count == len(s) - 1
        idx = plan.seq_index[start : start + count]
        start += count
        if not count:
            continue
        r = int(np.searchsorted(offsets, idx[0], side="right") - 1)
        row = flat_rows[r]
        assert (offsets[r] <= idx).all() and (idx < offsets[r + 1]).all()  # one row per sequence
        nodes = row.child[idx - offsets[r]]
        assert row.tokens[nodes].tolist() == list(s[1:])
        assert row.depth[nodes].tolist() == list(range(1, len(s)))
        root = row.parent[nodes[0]]
        assert row.depth[root] == 0 and row.tokens[root] == s[0]
    assert start == len(plan.seq_index)
    longest = max((len(s) for s in seqs if len(s) > 1), default=0)
    assert all(len(r) <= max(budget, longest) for r in plan.rows)
    return plan


@settings(max_examples=200, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=15), min_size=1, max_size=15),
    budget=st.integers(1, 50),
)
def test_plan_rows_positions_masks(seqs, budget):
    _check_plan(seqs, budget)


def test_plan_shares_prefixes_and_fills_rows():
    rng = random.Random(0)
    seqs = steer_sequences(rng, n_steers=10)
    stats = pack_stats(seqs, 4096)
    trie_nodes = len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})
    assert stats["tokens_tree"] == trie_nodes  # each unique prefix forwarded once
    assert stats["tokens_linear"] == sum(len(s) for s in seqs)
    assert stats["rows"] == 1
    # Two tries that fit together share a row; a tight budget splits a trie by sequence.
    two = [[1, 2, 3], [1, 2, 4], [7, 8]]
    plan = _check_plan(two, 6)
    assert len(plan.rows) == 1 and plan.rows[0].tokens.tolist() == [1, 2, 3, 4, 7, 8]
    assert plan.rows[0].depth.tolist() == [0, 1, 2, 2, 0, 1]
    plan = _check_plan(two, 4)
    assert sorted(len(r) for r in plan.rows) == [2, 4]
    split = _check_plan([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]], 5)
    assert sorted(len(r) for r in split.rows) == [4, 5]  # prefix [1, 2] re-emitted in the 2nd


def test_oversized_sequence_gets_its_own_row(model):
    seqs = [list(range(20)), [1, 2], [1, 3]]
    plan = _check_plan(seqs, 8)
    assert sorted(len(r) for r in plan.rows) == [3, 20]
    with torch.no_grad():
        assert max_diff(token_logprobs(model, seqs, token_budget=8),
                        token_logprobs(model, seqs, packing="none", token_budget=8)) <= TOL


def test_length_one_sequences_are_not_forwarded(model):
    assert plan_packing([[7], [8]]).rows == ()
    out = token_logprobs(model, [[7], [1, 2], [9]])
    assert [o.numel() for o in out] == [0, 1, 0]
    out = token_logprobs(model, [[7]])
    assert out[0].numel() == 0
    out = token_logprobs(model, [[7], [8]], packing="none")
    assert [o.numel() for o in out] == [0, 0]


def test_plan_reuse(model):
    seqs = steer_sequences(random.Random(3))
    plan = plan_packing(seqs, token_budget=50)
    with torch.no_grad():
        a = token_logprobs(model, seqs, token_budget=50, plan=plan)
        b = token_logprobs(model, seqs, token_budget=50)
    assert max_diff(a, b) == 0
    with pytest.raises(ValueError, match="plan was built for other sequences"):
        token_logprobs(model, seqs[:-1], plan=plan)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(packing="zip"), "packing must be one of"),
        (dict(token_budget=0), "token_budget"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(model, [[1, 2]], **kwargs)


@pytest.mark.parametrize(
    "seqs,match",
    [
        ([[1, 2], []], r"sequences\[1\] must be a non-empty"),
        ([[1, -2]], r"sequences\[0\] holds a negative"),
        ([[1, VOCAB]], rf"sequences\[0\] holds token id {VOCAB} >= vocab size {VOCAB}"),
    ],
)
def test_bad_sequences(model, seqs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(model, seqs)


# --------------------------------------------------------------------------- refusals


def test_supported_models_pass(model, sdpa_model):
    assert check_tree_packing(model) is None
    assert check_tree_packing(sdpa_model) is None
    assert check_tree_packing(lora(tiny_llama())) is None


def test_flash_attention_refused():
    m = tiny_llama()
    m.config._attn_implementation = "flash_attention_2"  # the check reads the config only
    reason = check_tree_packing(m)
    assert reason and "flash_attention_2" in reason
    with pytest.raises(TreePackingUnsupported, match="tree packing refused: attention backend"):
        token_logprobs(m, [[1, 2, 3], [1, 2, 4]])


def test_sliding_window_refused_when_rows_are_longer():
    torch.manual_seed(0)
    m = transformers.MistralForCausalLM(tiny_config(transformers.MistralConfig, sliding_window=8)).eval()
    assert "sliding-window" in check_tree_packing(m, row_tokens=20)
    assert "sliding-window" in check_tree_packing(m)
    assert check_tree_packing(m, row_tokens=8) is None
    short = [[1, 2, 3], [1, 2, 4]]
    with torch.no_grad():
        assert max_diff(token_logprobs(m, short), token_logprobs(m, short, packing="none")) <= TOL
        long = [list(range(12)), list(range(6)) + [50]]
        with pytest.raises(TreePackingUnsupported, match="sliding-window"):
            token_logprobs(m, long)
        with pytest.warns(UserWarning, match="using packing='none'"):
            got = token_logprobs(m, long, fallback=True)
        assert max_diff(got, token_logprobs(m, long, packing="none")) == 0
    qwen = transformers.Qwen2ForCausalLM(
        tiny_config(transformers.Qwen2Config, sliding_window=8, use_sliding_window=False)
    )
    assert check_tree_packing(qwen, row_tokens=100) is None


def test_hybrid_and_recurrent_models_refused():
    m = tiny_llama()
    m.config.layer_types = ["linear_attention", "full_attention"]
    assert "not softmax attention" in check_tree_packing(m)
    torch.manual_seed(0)
    mamba = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    assert "recurrent" in check_tree_packing(mamba)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = token_logprobs(mamba, [[1, 2, 3], [1, 2, 4]], fallback=True)
    assert [len(o) for o in out] == [2, 2]


def test_no_position_ids_refused():
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2)
    )
    reason = check_tree_packing(bloom)
    assert reason and "position_ids" in reason


# --------------------------------------------------------------------------- flex / real model


def test_flex_attention_block_mask_forward():  # ~8 s: it left the slow set for CI
    """The BlockMask path, forward only: FlexAttention has no CPU backward; the GPU path
    (forward + backward) is not exercised in CI."""
    m = tiny_llama(attn="flex_attention")
    seqs = steer_sequences(random.Random(5), n_steers=3)
    with torch.no_grad():
        tree = token_logprobs(m, seqs)
        m.set_attn_implementation("eager")
        lin = token_logprobs(m, seqs, packing="none")
    assert max_diff(tree, lin) <= TOL


@pytest.fixture(scope="module")
def smollm(model_path):
    """The bundled model in float64. Tree and linear packing run the same math through
    different matrix shapes, so in fp32 they differ by the CPU's summation order (measured:
    LoRA grads 5e-4 apart on an AMX Xeon, under 1e-4 elsewhere): no fixed fp32 bound holds on
    every CPU. In fp64 the model's own noise is ~1e-12; what is left is the fp32
    log-softmax that token_logprobs computes in (relative ~1e-7, measured: grads up to 450
    differ by 9e-5, 7% of allclose's atol 1e-4 + rtol 1e-4 bound). That bound does not
    depend on SIMD kernels, while a real packing bug (a wrong mask, position or edge) moves
    log-probs by 1e-2 or more."""
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    m.set_attn_implementation("sdpa")
    return lora(m).double()


def test_bundled_model_tree_equals_linear(smollm):
    rng = random.Random(11)
    vocab = smollm.config.vocab_size
    path = [rng.randrange(vocab) for _ in range(40)]
    seqs = [path, path[:25] + path[25:31], path[:25] + [rng.randrange(vocab) for _ in range(6)],
            path[:12] + [rng.randrange(vocab) for _ in range(4)]]
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(len(s) - 1, generator=g, dtype=torch.float64) for s in seqs]
    tree_lp, lin_lp = [], []
    tree = _lora_grads(smollm, seqs, "tree", weights, 4096, tree_lp)
    lin = _lora_grads(smollm, seqs, "none", weights, 4096, lin_lp)
    assert all(p.dtype == torch.float64 for p in smollm.parameters())
    used = max(float(((tree[n] - lin[n]).abs() / (TOL + 1e-4 * lin[n].abs())).max()) for n in tree)
    print(f"fp64 tree vs linear: log-probs {max_diff(tree_lp, lin_lp):.1e}, grads use {used:.2f} of the bound")
    assert max_diff(tree_lp, lin_lp) <= TOL
    for n in tree:
        assert torch.allclose(tree[n], lin[n], atol=TOL, rtol=1e-4), (n, float((tree[n] - lin[n]).abs().max()))


# --------------------------------------------------------------------------- full rows (full KL)


def full_rows(model, seq):
    return model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)[:-1]


@pytest.mark.parametrize("packing", ["tree", "none"])
def test_dist_masks_return_the_full_rows_at_flagged_predictions(model, packing):
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7], [1, 2, 3, 4, 5], [6, 5, 4]]
    masks = [[True, False, True, True], [False, True, True], [], [False, False, False, True], [False, False]]
    with torch.no_grad():
        plain = token_logprobs(model, seqs, packing=packing, token_budget=7)
        logps, dists = token_logprobs(model, seqs, packing=packing, token_budget=7, dist_masks=masks)
    assert max_diff(logps, plain) == 0
    for s, m, d in zip(seqs, masks, dists):
        assert d.shape == (sum(m), VOCAB)
        if len(s) > 1:
            want = full_rows(model, s)[torch.tensor(m, dtype=torch.bool)]
            assert torch.allclose(d, want, atol=1e-5)


def test_dist_masks_carry_gradients_and_match_between_packings(model):
    m = lora(model)
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6, 7], [1, 2, 3, 8]]
    masks = [[False, True, True], [True, True, False, True], [False, False, True]]
    grads = {}
    for packing in ("tree", "none"):
        m.zero_grad(set_to_none=True)
        _, dists = token_logprobs(m, seqs, packing=packing, dist_masks=masks)
        sum((d.exp() * d).sum() for d in dists).backward()  # minus the entropy: touches every row
        grads[packing] = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    for a, b in zip(grads["tree"], grads["none"]):
        assert torch.allclose(a, b, atol=TOL)
        assert a.abs().sum() > 0


def test_dist_masks_must_match_the_sequences(model):
    with pytest.raises(ValueError, match="dist_masks has 1 entries for 2 sequences"):
        token_logprobs(model, [[1, 2], [3, 4]], dist_masks=[[True]])
    with pytest.raises(ValueError, match=r"dist_masks\[0\] has 2 flags; sequences\[0\] predicts 1"):
        token_logprobs(model, [[1, 2]], dist_masks=[[True, True]])
