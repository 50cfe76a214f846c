"""LlamaEngine on the bundled SmolLM2 model: reproducibility, KV-cache reuse (counted in
evaluated tokens), scoring, the context limit and clear errors for bad model files."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from steer_tui.core.engine import open_engine
from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling

GREEDY = Sampling(temperature=0.0)
PROMPT_MESSAGES = [{"role": "user", "content": "Give four examples of fruit."}]


@pytest.fixture(scope="module")
def engine(model_path):
    e = open_engine(model_path, n_ctx=1024)
    yield e
    e.close()


@pytest.fixture(scope="module")
def fresh(model_path):
    """A second engine, used only as a reference that evaluates whole contexts cold."""
    e = open_engine(model_path, n_ctx=1024)
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.tokenize(engine.render_chat(PROMPT_MESSAGES), special=True)


def run(engine, context, sampling=GREEDY, **kw):
    gen = engine.generate(context, sampling, **kw)
    steps = list(gen)
    return steps, gen.end


def test_metadata(engine, model_path):
    assert engine.n_vocab == 49152
    assert engine.path == str(model_path.resolve())
    import hashlib

    assert engine.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()  # of the file's bytes
    assert len(engine.vocab_sha256) == 64
    im_end = engine.tokenize("<|im_end|>", special=True)
    assert len(im_end) == 1 and im_end[0] in engine.eos_ids
    assert engine.adapter is None
    info = engine.describe()
    assert info["n_vocab"] == 49152 and info["eos_ids"] == list(engine.eos_ids)


def test_chat_template_and_tokens(engine, prompt):
    text = engine.render_chat(PROMPT_MESSAGES)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Give four examples of fruit." in text
    # control tokens are single ids when special=True, plain text otherwise
    assert engine.tokenize("<|im_start|>", special=True) != engine.tokenize("<|im_start|>")
    assert engine.detokenize(prompt) == text


def test_greedy_is_reproducible_and_matches_a_cold_engine(engine, fresh, prompt):
    a, end_a = run(engine, prompt, max_tokens=12)
    b, end_b = run(engine, prompt, max_tokens=12)
    fresh.reset()
    c, _ = run(fresh, prompt, max_tokens=12)
    assert [s.id for s in a] == [s.id for s in b] == [s.id for s in c]
    assert end_a == end_b == "length"
    np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in c], atol=1e-3)
    for s in a:  # greedy picks the top-1 and reports the raw model log-prob of it
        assert s.id == s.top[0][0]
        assert s.logprob == pytest.approx(s.top[0][1])
        assert len(s.top) == 5 and all(s.top[i][1] >= s.top[i + 1][1] for i in range(4))
        assert s.logprob <= 0


def test_same_seed_same_tokens(engine, prompt):
    samp = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    runs = [[s.id for s in run(engine, prompt, samp, max_tokens=10)[0]] for _ in range(2)]
    assert runs[0] == runs[1]
    others = {
        tuple(s.id for s in run(engine, prompt, samp.replace(seed=seed), max_tokens=10)[0]) for seed in range(1, 6)
    }
    assert len(others) > 1  # the seed matters


def test_rollback_reuses_the_cache_and_gives_cold_results(engine, fresh, prompt):
    steps, _ = run(engine, prompt, max_tokens=20)
    ids = [s.id for s in steps]
    # the cache now holds prompt + ids[:-1]; roll back 10 tokens and continue
    context = prompt + ids[:10]
    before = engine.n_evaluated
    cont, _ = run(engine, context, max_tokens=6)
    # 1 token re-evaluated for fresh logits + 5 new tokens; the kept prefix is never redone
    assert engine.n_evaluated - before == 1 + 5
    assert [s.id for s in cont] == ids[10:16]
    fresh.reset()
    fb = fresh.n_evaluated
    cold, _ = run(fresh, context, max_tokens=6)
    assert fresh.n_evaluated - fb == len(context) + 5
    assert [s.id for s in cold] == [s.id for s in cont]
    # The cold engine prefilled prompt + ids[:10] as one batch; the warm one had evaluated
    # ids[:10] one token at a time. llama.cpp's batched and single-token kernels round
    # differently, by an amount that depends on the CPU (0.13 nats on one AMX Xeon, a few
    # hundredths on another), so their log-probs are not compared. Like with like: a fresh
    # engine that evaluates the same schedule as the warm one (the prompt as one batch, then
    # one token at a time) must give the warm engine's log-probs to float rounding.
    fresh.reset()
    fresh.logits(prompt)
    for k in range(1, 10):
        fresh.logits(prompt + ids[:k])
    same, _ = run(fresh, context, max_tokens=6)
    assert [s.id for s in same] == [s.id for s in cont]
    np.testing.assert_allclose([s.logprob for s in same], [s.logprob for s in cont], atol=1e-5)


def test_divergent_context_evaluates_only_the_suffix(engine, prompt):
    run(engine, prompt, max_tokens=8)
    other = prompt + engine.tokenize(" Mango")
    before = engine.n_evaluated
    run(engine, other, max_tokens=1)
    assert engine.n_evaluated - before == len(engine.tokenize(" Mango"))
    # exactly the same context again: the cached logits are used, nothing is evaluated
    engine.logits(other)
    before = engine.n_evaluated
    engine.logits(other)
    assert engine.n_evaluated == before


def test_score_matches_generation_and_leaves_the_cache_ready(engine, fresh, prompt):
    steps, _ = run(engine, prompt, max_tokens=8)
    ids = [s.id for s in steps]
    fresh.reset()
    scored = fresh.score(prompt, ids)
    assert [s.id for s in scored] == ids
    np.testing.assert_allclose([s.logprob for s in scored], [s.logprob for s in steps], atol=0.1)
    assert [s.top[0][0] for s in scored] == ids  # near-ties further down may swap (see above)
    assert fresh.cached_tokens == prompt + ids
    before = fresh.n_evaluated
    run(fresh, prompt + ids, max_tokens=1)
    assert fresh.n_evaluated == before  # generating right after a score evaluates nothing


def test_correction_tokens_are_what_the_engine_evaluated(engine, prompt):
    correction = engine.tokenize(" 1. Pear, 2. Plum")
    engine.score(prompt, correction)
    assert engine.cached_tokens == prompt + correction


def test_stop_event_pauses(engine, prompt):
    stop = threading.Event()
    gen = engine.generate(prompt, GREEDY, max_tokens=50, stop=stop)
    got = []
    for s in gen:
        got.append(s)
        if len(got) == 3:
            stop.set()
    assert gen.end == "paused" and len(got) == 3


def test_context_full_ends_with_context(model_path):
    e = open_engine(model_path, n_ctx=256)
    try:
        assert e.n_ctx == 256
        ctx = e.tokenize("one two three four " * 60)[: e.n_ctx - 5]
        steps, end = run(e, ctx, max_tokens=100)
        assert end == "context"
        assert len(ctx) + len(steps) == e.n_ctx
        # the whole path fits: continuing from it stops at once, never crashes
        steps2, end2 = run(e, ctx + [s.id for s in steps], max_tokens=5)
        assert steps2 == [] and end2 == "context"
        before = e.n_evaluated
        with pytest.raises(EngineError, match="context window"):
            e.generate(list(range(100, 100 + e.n_ctx + 1)), GREEDY)
        assert e.n_evaluated == before  # rejected before evaluating anything
    finally:
        e.close()


def test_bad_ids_are_rejected(engine):
    with pytest.raises(EngineError, match="vocabulary"):
        engine.score([1, 2], [engine.n_vocab])
    with pytest.raises(EngineError, match="empty"):
        engine.generate([], GREEDY)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.gguf", "does not exist"),
        (lambda p: p, "directory"),
        (lambda p: (p / "x.gguf").write_bytes(b"PK\x03\x04junk") and p / "x.gguf", "not a GGUF"),
        (lambda p: (p / "e.gguf").write_bytes(b"") or p / "e.gguf", "not a GGUF"),
    ],
)
def test_open_engine_bad_files(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(EngineError, match=message) as info:
        open_engine(path)
    assert str(path) in str(info.value)


def test_truncated_gguf_is_a_clear_error(tmp_path, model_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(model_path.read_bytes()[:4096])
    with pytest.raises(EngineError) as info:
        open_engine(bad)
    assert str(bad) in str(info.value)


def test_bad_adapter_path(tmp_path, model_path):
    with pytest.raises(EngineError, match="adapter"):
        open_engine(model_path, adapter=tmp_path / "nope.gguf")


# ------------------------------------------------------------------ batches and failures


def test_decode_over_several_batches_equals_one_batch(engine, model_path):
    """llama.cpp takes at most n_batch (512) tokens per decode: a 520-token evaluation is two
    batches. Scoring it (every row kept) and taking the last row only must both give what one
    1024-token batch gives."""
    from steer_tui.core.llama_engine import LlamaEngine

    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    ctx = engine.tokenize(text)[:520]
    assert len(ctx) == 520 and engine._n_batch == 512
    one = LlamaEngine(model_path, n_ctx=1024, n_batch=1024)
    try:
        engine.reset()
        got = engine.score(ctx[:1], ctx[1:])  # rows of both batches, concatenated
        want = one.score(ctx[:1], ctx[1:])
        assert len(got) == len(want) == 519
        np.testing.assert_allclose([s.logprob for s in got], [s.logprob for s in want], atol=1e-4)
        assert [s.top[0][0] for s in got] == [s.top[0][0] for s in want]
        engine.reset()
        np.testing.assert_allclose(engine.logits(ctx), one.logits(ctx), atol=1e-4)  # the last row of batch 2
        assert engine.cached_tokens == ctx and engine.n_ctx == 1024
    finally:
        one.close()
        engine.reset()


def test_a_failed_decode_leaves_the_engine_usable(model_path, fresh):
    """A decode that fails in its third batch raises EngineError, leaves the cache as it was
    before the call (llama.cpp's cells for the failed positions are dropped), and the next
    evaluation of the same context gives the cold engine's logits."""
    from steer_tui.core.llama_engine import LlamaEngine

    e = LlamaEngine(model_path, n_ctx=256, n_batch=16)
    try:
        ctx = e.tokenize("one two three four five six seven eight nine ten " * 6)[:80]
        e.logits(ctx[:20])
        real_decode, calls = e._ctx.decode, []

        def flaky(batch):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("llama_decode returned 1 (simulated: no KV slot)")
            return real_decode(batch)

        e._ctx.decode = flaky
        with pytest.raises(EngineError, match="llama.cpp failed to evaluate tokens: .*simulated"):
            e.logits(ctx)  # 60 new tokens: batches of 16, the third fails
        assert len(calls) == 3 and e.cached_tokens == ctx[:20]
        e._ctx.decode = real_decode
        np.testing.assert_allclose(e.logits(ctx), fresh.logits(ctx), atol=1e-4)
        assert e.cached_tokens == ctx
        steps, end = run(e, ctx, max_tokens=3)  # and it generates on from there
        assert [s.id for s in steps] == [s.id for s in run(fresh, ctx, max_tokens=3)[0]]
    finally:
        e.close()


# ------------------------------------------------------------------ a model without a chat template


@pytest.fixture(scope="module")
def no_template_model(model_path, tmp_path_factory):
    """The bundled GGUF with its tokenizer.chat_template removed (gguf-py's new-metadata copy)."""
    gguf = pytest.importorskip("gguf")
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata, get_field_data

    out = tmp_path_factory.mktemp("no-template") / "plain.gguf"
    reader = gguf.GGUFReader(str(model_path), "r")
    writer = gguf.GGUFWriter(str(out), arch=get_field_data(reader, gguf.Keys.General.ARCHITECTURE), endianess=reader.endianess)
    alignment = get_field_data(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    copy_with_new_metadata(reader, writer, {}, [gguf.Keys.Tokenizer.CHAT_TEMPLATE])
    return out


def test_a_model_without_a_chat_template(no_template_model, tmp_path):
    """Chat prompts need the model's template: without one, a clear error naming the model and
    what to do (a raw prompt), no task file; a raw prompt works."""
    from steer_tui import Session
    from steer_tui.core.store import Store

    e = open_engine(no_template_model, n_ctx=256)
    try:
        assert "tokenizer.chat_template" not in e.llm.metadata
        with pytest.raises(EngineError, match="has no chat template in its metadata; use a raw prompt") as info:
            e.render_chat(PROMPT_MESSAGES)
        assert str(no_template_model) in str(info.value)
        with pytest.raises(EngineError, match="no chat template"):
            Session.create(store=tmp_path, prompt="Give four examples of fruit.", model=e, sampling={"temperature": 0, "seed": 1})
        assert Store(tmp_path).list_tasks() == []
        with Session.create(store=tmp_path, prompt="Fruits: apple, pear,", raw=True, model=e, sampling={"temperature": 0, "seed": 1}) as s:
            assert s.tree.prompt["mode"] == "raw" and len(list(s.generate(max_tokens=3))) == 3
    finally:
        e.close()


def test_a_model_without_a_chat_template_via_cli(no_template_model, tmp_path):
    from tests.reliability.conftest import assert_user_error, run_cli

    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "x"\npattern = "zzz"\naction = "stop"\n')
    tasks = tmp_path / "q.jsonl"
    tasks.write_text('{"prompt": "Give four examples of fruit."}\n')
    proc = run_cli("auto", "--model", str(no_template_model), "--rules", str(rules), "--tasks", str(tasks),
                   "--store", str(tmp_path / "s"), "--max-tokens", "2", "--n-ctx", "256")
    assert_user_error(proc, str(no_template_model), "no chat template", "raw prompt")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
