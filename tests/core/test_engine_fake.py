"""Sampling, cache bookkeeping and UTF-8 handling, on the deterministic FakeEngine (the same
BaseEngine code the llama.cpp engine runs)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steer_tui.core.engine_base import Engine
from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling, logsumexp, rank_of, sample_token, top_k_of
from steer_tui.core.fake_engine import EOS, FakeEngine
from steer_tui.core.text import TextDecoder, pieces

GREEDY = Sampling(temperature=0)


def test_fake_engine_satisfies_the_protocol():
    assert isinstance(FakeEngine(), Engine)


# ---------------------------------------------------------------- Sampling


def test_sampling_roundtrip_and_defaults():
    s = Sampling(seed=3)
    assert Sampling.from_dict(s.to_dict()) == s
    assert s.to_dict() == {
        "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
        "repeat_penalty": 1.0, "seed": 3, "max_tokens": 512,
    }
    assert Sampling.from_dict(None) == Sampling()


@pytest.mark.parametrize(
    "data, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"seed": True}, "seed"),
        ({"temprature": 1}, "temprature"),
    ],
)
def test_sampling_rejects_bad_values_naming_the_field(data, field):
    with pytest.raises(EngineError, match=field):
        Sampling.from_dict(data)


def test_rank_of_is_one_based_and_none_when_missing():
    top = [[7, -0.1], [3, -1.0], [9, -2.0]]
    assert [rank_of(top, t) for t in (7, 3, 9, 4)] == [1, 2, 3, None]
    assert rank_of(None, 7) is None and rank_of([], 7) is None


def test_sample_token_filters():
    logits = np.array([5.0, 4.9, 1.0, -3.0, 4.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(logits, GREEDY, rng) == 0
    assert all(sample_token(logits, Sampling(temperature=1, top_k=1), rng) == 0 for _ in range(20))
    drawn = {sample_token(logits, Sampling(temperature=1, top_k=2, top_p=1, min_p=0), rng) for _ in range(200)}
    assert drawn == {0, 1}
    # min_p 0.3 keeps ids with p >= 0.3 * p_max: 0, 1 and 4 (e^-1 = 0.37)
    drawn = {sample_token(logits, Sampling(temperature=1, top_k=0, top_p=1, min_p=0.3), rng) for _ in range(400)}
    assert drawn == {0, 1, 4}
    # repeat penalty pushes a repeated greedy choice down
    assert sample_token(logits, Sampling(temperature=0, repeat_penalty=1.5), rng, recent=[0]) == 1
    s = Sampling(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    a = [sample_token(logits, s, np.random.default_rng(5)) for _ in range(5)]
    b = [sample_token(logits, s, np.random.default_rng(5)) for _ in range(5)]
    assert a == b


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    rng = np.random.default_rng(1)
    s = Sampling(temperature=1, top_k=0, top_p=1, min_p=0)
    counts = np.bincount([sample_token(logits, s, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


@given(st.lists(st.floats(-30, 30, width=32), min_size=1, max_size=60), st.integers(1, 8))
@settings(max_examples=150, deadline=None)
def test_top_k_is_exact(values, k):
    x = np.array(values, dtype=np.float32)
    lse = logsumexp(x)
    got = top_k_of(x, k, lse)
    want = sorted(range(len(x)), key=lambda i: (-x[i], i))[:k]
    assert [i for i, _ in got] == want
    for i, lp in got:
        assert lp == pytest.approx(float(x[i]) - lse)


# ---------------------------------------------------------------- cache + generation


def test_fake_generation_end_reasons():
    e = FakeEngine()
    prompt = e.tokenize(e.render_chat([{"role": "user", "content": "fruit"}]), special=True)
    gen = e.generate(prompt, GREEDY)
    text = e.detokenize([s.id for s in gen])
    assert gen.end == "eos" and text == "1. Apple\n2. Banana\n3. Cherry\n4. Mango<|im_end|>"
    gen = e.generate(prompt, GREEDY, max_tokens=3)
    assert len(list(gen)) == 3 and gen.end == "length"
    stop = threading.Event()
    stop.set()
    gen = e.generate(prompt, GREEDY, stop=stop)
    assert list(gen) == [] and gen.end == "paused"


def test_fake_context_limit():
    e = FakeEngine(n_ctx=40)
    prompt = e.tokenize("x" * 30)
    gen = e.generate(prompt, GREEDY, max_tokens=100)
    steps = list(gen)
    assert gen.end == "context" and len(prompt) + len(steps) == 40
    with pytest.raises(EngineError, match="n_ctx"):
        e.generate(e.tokenize("x" * 41), GREEDY)


def test_cache_counts_only_new_tokens():
    e = FakeEngine()
    p = e.tokenize("hello")
    ids = [s.id for s in e.generate(p, GREEDY, max_tokens=10)]
    assert e.n_evaluated == len(p) + 9  # the last token is never evaluated
    before = e.n_evaluated
    again = [s.id for s in e.generate(p + ids[:4], GREEDY, max_tokens=3)]
    assert e.n_evaluated - before == 1 + 2  # rollback: 1 token for logits, then 2 more
    assert again == ids[4:7]
    before = e.n_evaluated
    e.score(p + ids[:7], e.tokenize(" the"))
    # ids[6] was generated last, so never evaluated; " the" is one merge token
    assert e.n_evaluated - before == 2
    assert e.cached_tokens == p + ids[:7] + e.tokenize(" the")
    assert e.kv_tokens == e.cached_tokens  # the fake's own KV cache followed every truncation


def test_rollback_truncates_the_fakes_kv_cache():
    """The fake keeps its own KV cache, as llama.cpp does: a rollback must drop the cut tail
    from it (``_kv_truncate``), or the next evaluation is refused instead of silently using
    a context the caller no longer has."""
    e = FakeEngine()
    p = e.tokenize("The caf")
    ids = [s.id for s in e.generate(p, GREEDY, max_tokens=12)]
    assert e.kv_tokens == p + ids[:-1]
    e.logits(p + ids[:3])  # a rollback: keep 3 tokens, re-evaluate the last for its logits
    assert e.kv_tokens == e.cached_tokens == p + ids[:3]
    e.score(p + ids[:2], e.tokenize("xy"))  # a rollback, then a correction
    assert e.kv_tokens == e.cached_tokens == p + ids[:2] + e.tokenize("xy")
    e.reset()
    assert e.kv_tokens == [] == e.cached_tokens
    with pytest.raises(EngineError, match="decode at position 4, but its KV cache holds 0 tokens"):
        e._decode([1], 4, False)  # what a skipped truncation looks like from inside


def test_fresh_engine_agrees_after_any_history():
    a, b = FakeEngine(), FakeEngine()
    p = a.tokenize("The caf")
    s = Sampling(temperature=0.7, seed=11)
    list(a.generate(p + a.tokenize("xyz"), s, max_tokens=5))
    r1 = [x.id for x in a.generate(p, s, max_tokens=8)]
    r2 = [x.id for x in b.generate(p, s, max_tokens=8)]
    assert r1 == r2
    assert a.kv_tokens == a.cached_tokens == p + r1[:-1]


# ---------------------------------------------------------------- UTF-8


def test_split_multibyte_characters_never_emit_broken_utf8():
    e = FakeEngine()
    text = "5€ 🙂 crème"
    ids = e.tokenize(text)
    assert len(ids) > len(text)  # € and 🙂 are several byte tokens
    ps = pieces(e.token_bytes, ids)
    assert "".join(ps) == text
    assert "\ufffd" not in "".join(ps)
    euro = ids[1:4]
    assert [e.token_bytes(t) for t in euro] == list(map(bytes, ([0xE2], [0x82], [0xAC])))
    assert ps[1:4] == ["", "", "€"]


def test_generated_pieces_concatenate_to_the_detokenized_text():
    e = FakeEngine()
    p = e.tokenize("The café")
    steps = list(e.generate(p, GREEDY, max_tokens=80))
    dec = TextDecoder()
    ps = [dec.feed(e.token_bytes(s.id)) for s in steps]
    assert "".join(ps) == e.detokenize([s.id for s in steps])
    assert "🙂" in "".join(ps)


def test_decoder_holds_back_then_replaces_invalid_bytes():
    d = TextDecoder()
    assert d.feed(b"\xf0\x9f") == "" and d.pending() == b"\xf0\x9f"
    assert d.feed(b"\x99\x82") == "🙂"
    assert d.feed(b"\xff") == "\ufffd"  # never valid: replaced at once
    d.feed(b"\xc3")
    assert d.flush() == "\ufffd"


def test_tokenize_specials():
    e = FakeEngine()
    assert e.tokenize("<|im_end|>", special=True) == [EOS]
    assert EOS not in e.tokenize("<|im_end|>")
    assert e.tokenize("a", add_bos=True)[0] == e.bos_id


def test_generation_survives_other_calls_between_steps():
    """The UI may ask for top-k of another context while a generation is paused between
    steps; the generation must notice the cache changed and still produce the same tokens."""
    e = FakeEngine()
    p = e.tokenize("The caf")
    want = [s.id for s in FakeEngine().generate(p, GREEDY, max_tokens=12)]
    got = []
    for i, s in enumerate(e.generate(p, GREEDY, max_tokens=12)):
        got.append(s.id)
        if i == 3:
            e.top(e.tokenize("1. Apple"), 5)
    assert got == want
    before = e.n_evaluated
    list(e.generate(p + want[:5], GREEDY, max_tokens=4))
    assert e.n_evaluated - before == 1 + 3  # O(1) per token after the first
