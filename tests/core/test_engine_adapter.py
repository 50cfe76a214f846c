"""LoRA adapters in the llama.cpp engine: loading (provenance in the tree), switching the
adapter off and on for the next continuation, and clear errors. The adapter is a tiny
random rank-2 LoRA on every attn_q / ffn_down weight, written with gguf-py."""

from __future__ import annotations

import numpy as np
import pytest

from steer_tui.core.engine import open_engine
from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling

gguf = pytest.importorskip("gguf")

GREEDY = Sampling(temperature=0)


def write_lora(path, n_layers=30, hidden=576, ffn=1536, rank=2, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    for i in range(n_layers):
        for name, n_in, n_out in ((f"blk.{i}.attn_q.weight", hidden, hidden), (f"blk.{i}.ffn_down.weight", ffn, hidden)):
            # numpy shapes are ggml's reversed: lora_a [r, in], lora_b [out, r]
            w.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
            w.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("lora") / "tiny-lora.gguf")


@pytest.fixture(scope="module")
def engine(model_path, lora):
    e = open_engine(model_path, n_ctx=512, adapter=lora)
    yield e
    e.close()


def ids(e, ctx, n=6):
    return [s.id for s in e.generate(ctx, GREEDY, max_tokens=n)]


def test_adapter_changes_the_model_and_toggles(engine, lora, model_path):
    base = open_engine(model_path, n_ctx=512)
    try:
        ctx = engine.tokenize(engine.render_chat([{"role": "user", "content": "Name a fruit."}]), special=True)
        assert engine.adapter["path"] == str(lora.resolve()) and len(engine.adapter["sha256"]) == 64
        with_adapter = engine.logits(ctx)
        assert not np.allclose(with_adapter, base.logits(ctx), atol=1e-2)
        engine.set_adapter_enabled(False)
        assert engine.adapter is None and engine.loaded_adapter is not None
        assert engine.cached_tokens == []  # the cache was computed with other weights
        assert ids(engine, ctx) == ids(base, ctx)
        np.testing.assert_allclose(engine.logits(ctx), base.logits(ctx), atol=1e-3)
        engine.set_adapter_enabled(True)
        np.testing.assert_allclose(engine.logits(ctx), with_adapter, atol=1e-3)
    finally:
        engine.set_adapter_enabled(True)
        base.close()


def test_session_records_the_adapter(engine, store_dir):
    from steer_tui import Session

    with Session.create(store=store_dir, prompt="Name a fruit.", model=engine, sampling={"temperature": 0, "seed": 1}) as s:
        assert s.tree.model["adapter"] == engine.adapter
        list(s.generate(max_tokens=3))
        assert s.tree.node(s.end).adapter == engine.adapter
        engine.set_adapter_enabled(False)
        try:
            s.rollback(1)
            list(s.generate(max_tokens=3))
            assert s.tree.node(s.end).adapter is None  # the base model wrote this branch
        finally:
            engine.set_adapter_enabled(True)


def test_no_adapter_to_enable(model_path):
    e = open_engine(model_path, n_ctx=256)
    try:
        with pytest.raises(EngineError, match="no adapter"):
            e.set_adapter_enabled(True)
        e.set_adapter_enabled(False)  # a no-op
    finally:
        e.close()


def test_adapter_that_is_not_a_lora(tmp_path, model_path):
    with pytest.raises(EngineError) as info:
        open_engine(model_path, adapter=model_path)  # a GGUF, but a whole model
    assert "adapter" in str(info.value)
